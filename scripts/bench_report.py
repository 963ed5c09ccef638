"""The table and JSON lines that `scripts/bench` prints: one column per run, and
their median when there are several. Not a command of its own."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class Figure:
    workload: str
    name: str
    value: float
    unit: str
    target: str = ""


def _value(value: float) -> str:
    return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"


def _median(values: Iterable[float]) -> float:
    """The median of the values that are numbers (a failed peer's are NaN)."""
    numbers = [v for v in values if not math.isnan(v)]
    return statistics.median(numbers) if numbers else float("nan")


def report(header: str, runs: list[list[Figure]], seconds: list[float]) -> None:
    """The table (one column per run and their median when there are several), then JSON lines."""
    print()
    print(header)
    several = len(runs) > 1
    columns = [f"run {n + 1}" for n in range(len(runs))] + ["median"] if several else ["value"]
    width = max(58, *(len(f.name) for f in runs[0]))
    print(f"{'figure':<{width}} " + " ".join(f"{c:>9}" for c in columns) + f" {'unit':<8} target")
    workload = ""
    for n, f in enumerate(runs[0]):
        if f.workload != workload:
            workload = f.workload
            print(f"[{workload}]")
        values = [run[n].value for run in runs]
        if several:
            values.append(_median(values))
        cells = " ".join(f"{_value(v):>9}" for v in values)
        print(f"{f.name:<{width}} {cells} {f.unit:<8} {f.target}")
    print("wall time per run: " + ", ".join(f"{s:.0f} s" for s in seconds))
    print()
    for r, run in enumerate(runs):
        for f in run:
            line = {
                "bench": "taskq",
                "run": r + 1,
                "workload": f.workload,
                "figure": f.name.strip(),
            }
            print(json.dumps({**line, "value": round(f.value, 4), "unit": f.unit}))
    if several:
        for n, f in enumerate(runs[0]):
            value = _median(run[n].value for run in runs)
            line = {"bench": "taskq", "run": "median", "workload": f.workload}
            print(json.dumps({**line, "figure": f.name.strip(), "value": round(value, 4),
                              "unit": f.unit}))  # fmt: skip

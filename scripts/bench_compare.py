"""Compare two outputs of `scripts/bench`: a Markdown table, before and after.

    scripts/bench-ab REF [bench options]    runs both and prints this table
    .venv/bin/python scripts/bench_compare.py BEFORE.txt AFTER.txt

Each output's JSON lines give the figures; with several runs their medians are
used, else the one run's values. A figure whose name its workload repeats is
named after the last figure before it with a name of its own ("Dramatiq: end to
end → taskq / peer", "Celery: chain … → worker CPU per 1000 tasks"). Rows
follow the second output's order; a figure only one side has shows "-" on the
other. Ratios are after / before.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable
from pathlib import Path

Key = tuple[str, str]


def figures(lines: Iterable[str]) -> tuple[dict[Key, tuple[float, str]], int]:
    """The figures of one output (medians if it has them) and how many runs it had."""
    by_run: dict[object, dict[Key, tuple[float, str]]] = {}
    previous: dict[object, str] = {}
    for line in lines:
        if not line.startswith('{"bench": "taskq"'):
            continue
        record = json.loads(line)
        run, name = record["run"], record["figure"]
        figures = by_run.setdefault(run, {})
        key = (record["workload"], name)
        if key in figures:
            # A name a workload repeats (a ratio after each peer figure, the
            # latency of each app, a peer's CPU lines) is told apart by the last
            # figure before it whose name was its own (the peer's headline).
            key = (record["workload"], f"{previous[run]} → {name}")
        else:
            previous[run] = name
        figures[key] = (float(record["value"]), record["unit"])
    if not by_run:
        raise SystemExit("no figures: is this the output of scripts/bench?")
    runs = sum(1 for run in by_run if run != "median")
    return by_run.get("median") or next(iter(by_run.values())), runs


def cell(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"


def table(before: dict[Key, tuple[float, str]], after: dict[Key, tuple[float, str]]) -> list[str]:
    out = [
        "| workload | figure | before | after | after / before |",
        "| --- | --- | --- | --- | --- |",
    ]
    keys = list(after) + [key for key in before if key not in after]
    for workload, name in keys:
        old = before.get((workload, name), (None, ""))
        new = after.get((workload, name), (None, ""))
        unit = new[1] or old[1]
        ratio = None
        if old[0] is not None and new[0] is not None and old[0] != 0:
            ratio = new[0] / old[0]
        label = f"{name} ({unit})" if unit else name
        out.append(f"| {workload} | {label} | {cell(old[0])} | {cell(new[0])} | {cell(ratio)} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--before-label", default="")
    parser.add_argument("--after-label", default="")
    args = parser.parse_args()
    before, runs_before = figures(args.before.read_text().splitlines())
    after, runs_after = figures(args.after.read_text().splitlines())
    print(
        f"before: {args.before_label or args.before} ({runs_before} runs),"
        f" after: {args.after_label or args.after} ({runs_after} runs);"
        + (" medians" if max(runs_before, runs_after) > 1 else "")
    )
    print()
    print("\n".join(table(before, after)))


if __name__ == "__main__":
    main()

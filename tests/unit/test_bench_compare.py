"""scripts/bench_compare.py: medians win over single runs, figures line up by name."""

from __future__ import annotations

import importlib.util
import json
from types import ModuleType

import pytest

from tests.support import ROOT

SCRIPT = ROOT / "scripts" / "bench_compare.py"


@pytest.fixture(scope="module")
def compare() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_compare", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def line(run: object, figure: str, value: float, workload: str = "3 end to end") -> str:
    record = {"bench": "taskq", "run": run, "workload": workload, "figure": figure}
    return json.dumps({**record, "value": value, "unit": "s"})


def test_medians_are_taken_when_there_are_several_runs(compare: ModuleType) -> None:
    lines = ["a table line", line(1, "cpu", 1.0), line(2, "cpu", 3.0), line("median", "cpu", 2.0)]
    values, runs = compare.figures(lines)
    assert (values, runs) == ({("3 end to end", "cpu"): (2.0, "s")}, 2)
    single, runs = compare.figures([line(1, "cpu", 5.0)])
    assert (single[("3 end to end", "cpu")][0], runs) == (5.0, 1)


def test_rows_pair_by_workload_and_figure_with_the_ratio(compare: ModuleType) -> None:
    before, _ = compare.figures([line(1, "cpu", 0.4), line(1, "gone", 1.0)])
    after, _ = compare.figures([line(1, "cpu", 0.3), line(1, "new", 7.0, "4 start latency")])
    rows = compare.table(before, after)
    assert rows[2] == "| 3 end to end | cpu (s) | 0.400 | 0.300 | 0.750 |"
    assert rows[3] == "| 4 start latency | new (s) | - | 7.00 | - |"
    assert rows[4] == "| 3 end to end | gone (s) | 1.00 | - | - |"


def test_a_repeated_name_is_told_apart_by_the_figure_before_it(compare: ModuleType) -> None:
    lines = [line(1, "A: rate", 1.0), line(1, "ratio", 2.0), line(1, "B: rate", 3.0)]
    values, _ = compare.figures([*lines, line(1, "ratio", 4.0)])
    assert values[("3 end to end", "ratio")] == (2.0, "s")
    assert values[("3 end to end", "B: rate → ratio")] == (4.0, "s")


def test_a_peers_repeated_lines_are_all_named_after_its_headline(compare: ModuleType) -> None:
    # taskq's figure, its CPU line, then a peer's headline and the same two lines.
    names = ["taskq: chain", "per step", "worker CPU", "Celery: chain", "per step", "worker CPU"]
    values, _ = compare.figures([line(1, name, n) for n, name in enumerate(names)])
    assert values[("3 end to end", "Celery: chain → per step")] == (4.0, "s")
    assert values[("3 end to end", "Celery: chain → worker CPU")] == (5.0, "s")
    assert values[("3 end to end", "worker CPU")] == (2.0, "s")


def test_an_output_without_figures_is_refused(compare: ModuleType) -> None:
    with pytest.raises(SystemExit, match="no figures"):
        compare.figures(["Traceback (most recent call last):"])

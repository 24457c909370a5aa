"""Benchmark summaries: the per-NFE pivot table and one metric-vs-NFE plot per problem."""

from flowdistill.eval.sweep import by_nfe_table, plot_by_problem


def _sw2(model: str, nfe: int, value: float, ratio: float) -> dict:
    return {"problem": "p", "model": model, "nfe": nfe, "metric": "sw2", "value": value, "floor": 0.01,
            "ratio": ratio}


ROWS = [
    _sw2("teacher", 1, 0.5, 10.0),
    _sw2("teacher", 128, 0.05, 1.0),
    _sw2("student", 1, 0.06, 1.2),
    {"problem": "p", "model": "student", "nfe": 128, "metric": "straightness", "value": 3e-6, "floor": None},
    {"problem": "q", "model": "teacher", "nfe": 2, "metric": "fid", "value": 8.5, "floor": 0.8,
     "ratio": float("nan")},
]


def test_by_nfe_table_pivots_values_and_ratios_and_skips_straightness():
    lines = by_nfe_table(ROWS).splitlines()
    assert lines[0] == "| problem | model | NFE 1 | NFE 2 | NFE 128 |"
    assert lines[2] == "| p | teacher | 0.5 (10.00×) |  | 0.05 (1.00×) |"
    assert lines[3] == "| p | student | 0.06 (1.20×) |  |  |"  # the straightness row is not a quality cell
    assert lines[4] == "| q | teacher |  | 8.5 |  |"  # no ratio when it is undefined
    assert len(lines) == 5


def test_plot_by_problem_writes_one_png_per_problem(tmp_path):
    paths = plot_by_problem(ROWS, tmp_path, "quality")
    assert [p.name for p in paths] == ["quality_p.png", "quality_q.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)

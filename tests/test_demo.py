"""``flowdistill demo`` (the README's default job) runs end to end and writes what it promises."""

from tests.helpers import cli


def test_demo_quick_runs_end_to_end(tmp_path):
    r = cli("demo", "--quick", "--out", str(tmp_path / "demo"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "demo"
    for name in ("demo.md", "demo.json", "demo_samples.png", "demo_sw2_vs_nfe.png"):
        assert (out / name).is_file(), name
    table = (out / "demo.md").read_text()
    assert "teacher (Euler)" in table and "FreeFlow student" in table
    assert (out / "student" / "student" / "config.json").is_file()

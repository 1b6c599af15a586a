"""The demo (the README's first command) runs and reports honest numbers."""

import pytest

from clairstat import demo

pytest.importorskip("torch")
pytest.importorskip("matplotlib")


def test_demo_writes_report_and_figure(tmp_path):
    numbers = demo.run(tmp_path, seed=0)
    assert (tmp_path / "report.md").read_text().startswith("# clairstat")
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert numbers["exact"] and numbers["refined_error"] < numbers["ols_error"]
    assert numbers["relative_gap"] <= 1e-6


def test_demo_command_line(tmp_path, capsys):
    demo.main(["--output", str(tmp_path), "--seed", "1"])
    out = capsys.readouterr().out
    assert "flagged clients" in out and "duality gap" in out

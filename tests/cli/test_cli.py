"""The console scripts (`pointavatar`, `pointavatar-synthetic`) and their wrappers in scripts/."""

import subprocess
import sys
from pathlib import Path

import pytest

from pointavatar.cli import exp_runner, make_synthetic_subject
from pointavatar.errors import PointAvatarError

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "command",
    [[str(BIN / "pointavatar")], [sys.executable, str(ROOT / "scripts" / "exp_runner.py")]],
    ids=["console_script", "wrapper"],
)
def test_exp_runner_reports_a_bad_conf_without_traceback(command, tmp_path):
    if not Path(command[0]).exists():
        pytest.skip("console script not installed (pip install -e .)")
    bad = tmp_path / "bad.conf"
    bad.write_text("train { learning_rat = 1.0 }\n")
    proc = subprocess.run(command + ["--conf", str(bad)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "learning_rate" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_exp_runner_main_returns_exit_codes(monkeypatch, capsys):
    def fail(args):
        raise PointAvatarError("broken")

    monkeypatch.setattr(exp_runner, "run", fail)
    assert exp_runner.main(["--conf", "x.conf"]) == 1
    assert capsys.readouterr().err == "error: broken\n"

    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(exp_runner, "run", interrupt)
    assert exp_runner.main(["--conf", "x.conf"]) == 130
    assert "resume with --is_continue" in capsys.readouterr().err


def test_synthetic_cli_reports_bad_arguments(tmp_path, capsys):
    assert make_synthetic_subject.main(["--data_folder", str(tmp_path), "--res", "4"]) == 1
    assert capsys.readouterr().err.startswith("error: make_synthetic_subject: res must be >= 16")
    assert not (tmp_path / "synthetic").exists()

"""`pointavatar-viewer` (cli/viewer.py): its flags, its messages, and the missing optional extra."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from pointavatar.cli import viewer as cli
from pointavatar.config import save_conf

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
INSTALL = 'pip install -e ".[viewer]"'  # README's install style: the package is installed editable


def test_flags_and_defaults():
    args = cli.parse_args(["--conf", "c.conf"])
    assert (args.host, args.port, args.device, args.checkpoint, args.json, args.fps) == (
        "127.0.0.1",  # this machine only, unless asked
        8080,
        "auto",
        "latest",
        None,  # the run's test frames
        25.0,
    )
    args = cli.parse_args(["--conf", "c.conf", "--port", "0", "--json", "x.json", "--device", "cpu"])
    assert (args.port, args.json, args.device) == (0, "x.json", "cpu")


def test_missing_extra_is_one_line_with_the_install_command_and_exit_code_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(
        sys.modules, "viser", None
    )  # `import viser` raises ImportError, as when not installed
    # Said before anything else is looked at: the conf does not even exist.
    assert cli.main(["--conf", str(tmp_path / "missing.conf")]) == cli.MISSING_EXTRA == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: the viewer needs the optional extra viewer (viser)")
    assert captured.err.count("\n") == 1 and INSTALL in captured.err, captured.err
    assert captured.out == ""


@pytest.mark.parametrize(
    "command",
    [[str(BIN / "pointavatar-viewer")], [sys.executable, str(ROOT / "scripts" / "viewer.py")]],
    ids=["console_script", "wrapper"],
)
def test_commands_without_viser_exit_2_without_traceback(command, tmp_path):
    if not Path(command[0]).exists():
        pytest.skip("console script not installed (pip install -e .)")
    # A viser that fails to import, first on the path: the command sees what a missing install gives.
    fake = tmp_path / "fake" / "viser"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'viser'\")\n")
    proc = subprocess.run(
        command + ["--conf", str(tmp_path / "c.conf")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "fake"), "PATH": str(BIN)},
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: the viewer needs") and INSTALL in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_errors_are_one_line(tiny_run, sequence_json, tmp_path, capsys):
    pytest.importorskip("viser", reason="the viewer's optional extra is not installed")
    conf, conf_path = tiny_run

    def fails(args, match):
        assert cli.main(["--device", "cpu", "--port", "0"] + args) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err

    fails(["--conf", str(conf_path), "--json", str(tmp_path / "missing.json")], "no such file")
    empty = tmp_path / "empty.conf"
    save_conf(conf.override({"train.exps_folder": str(tmp_path / "no_runs")}), empty)
    fails(["--conf", str(empty), "--json", str(sequence_json)], "pointavatar-viewer: no checkpoint")
    fails(["--conf", str(conf_path), "--fps", "0"], "--fps 0")
    fails(["--conf", str(conf_path), "--host", "192.0.2.1"], "--host 192.0.2.1: cannot serve")  # not ours
    fails(["--conf", str(conf_path), "--host", "no-such-host.invalid"], "cannot serve")


def test_console_script_serves_the_page_and_stops_on_ctrl_c(tiny_run, sequence_json):
    pytest.importorskip("viser", reason="the viewer's optional extra is not installed")
    script = BIN / "pointavatar-viewer"
    if not script.exists():
        pytest.skip("console script not installed (pip install -e .)")
    _, conf_path = tiny_run
    proc = subprocess.Popen(
        [
            str(script),
            "--conf",
            str(conf_path),
            "--json",
            str(sequence_json),
            "--device",
            "cpu",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        url, output = None, []
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                output.append(lines.get(timeout=0.5))
            except queue.Empty:
                continue
            if match := re.search(r"Viewer at (http://127\.0\.0\.1:\d+)", output[-1]):
                url = match.group(1)
        assert url is not None, "".join(output)
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200
            page = response.read().decode()
        # viser's built client, in one file: nothing on the page comes from another host.
        assert "<title>Viser</title>" in page
        assert not re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the normal way to stop a server
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

"""Progress output: plain lines when stderr is not a terminal, live bars when it is."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = """
from tasks.run.progress import StageProgress
for name in ("frames e01", "frames e02", "segment"):
    with StageProgress(name, 2000) as bar:
        for _ in range(2000):
            bar.advance()
with StageProgress("train", None) as bar:
    for _ in range(500):
        bar.advance()
"""


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EPISODE2LORA_NO_PROGRESS", None)
    return env


def test_non_terminal_output_is_a_few_plain_lines_per_unit():
    done = subprocess.run([sys.executable, "-c", WORK], env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert "\r" not in done.stderr and "\x1b" not in done.stderr  # no redraws, no cursor control
    for name in ("frames e01", "frames e02", "segment"):
        mine = [line for line in lines if line.startswith(f"{name}:")]
        assert mine[0] == f"{name}: started (2000 items)"
        assert mine[-1].startswith(f"{name}: finished 2000 in ")
        assert 3 <= len(mine) <= 6, mine
    train = [line for line in lines if line.startswith("train:")]
    assert train[0] == "train: started (total unknown)" and train[-1].startswith("train: finished 500")
    assert len(lines) <= 3 * 6 + 3


def test_silenced_progress_writes_nothing():
    env = {**_env(), "EPISODE2LORA_NO_PROGRESS": "1"}
    done = subprocess.run([sys.executable, "-c", WORK], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == ""


def test_terminal_output_draws_live_bars():
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", WORK], env={**_env(), "TERM": "xterm", "COLUMNS": "100"},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=120) == 0
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert "\x1b[" in text  # cursor control: bars redrawn in place
    assert "frames e01" in text and "started" not in text

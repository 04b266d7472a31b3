"""The run directory (-o) under misuse and faults, as a new user meets them: two trainers on one
directory, checkpoints that are not whole, resuming a finished run or with flags that change what
the data position means, a full disk and a read-only directory."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["-e", "d1", "-b", "2", "-t", "32", "-s", "0", "-v", "0"]  # 1 layer, C=64


def run(*args, cwd, check=True):
    result = subprocess.run([sys.executable, str(REPO / "train_gpt2.py"), *args], cwd=cwd, capture_output=True,
                            text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def wait_for(condition, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


# ----------------------------------------------------------------------------- two trainers on one -o

def test_a_second_trainer_on_a_run_directory_in_use_is_refused_naming_the_first(data, tmp_path):
    """The first run keeps no checkpoints (-n 0), so a second one with the same flags used to start
    as well and replace its main.log. Once the first is killed (SIGKILL: no clean-up of its own),
    the kernel has released its lock and a new run starts."""
    cmd = [*TINY, *data, "-n", "0", "-o", "run"]
    first = subprocess.Popen([sys.executable, str(REPO / "train_gpt2.py"), *cmd, "-x", "100000"], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "run" / "main.log"
    try:
        wait_for(lambda: log.exists() and log.read_text().count("\n") >= 2, "main.log lines from the first run")
        second = run(*cmd, "-x", "2", cwd=tmp_path, check=False)
        assert second.returncode == 1 and second.stdout == ""
        assert second.stderr.splitlines() == [
            f"error: -o run: another trainer (pid {first.pid} on {socket.gethostname()}) is using this run "
            f"directory: wait for it to end, or give another -o"], second.stderr
        assert log.read_text().startswith("s:0 trl:")  # the first run's log, still growing, not replaced
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    third = run(*cmd, "-x", "2", cwd=tmp_path)
    assert "run/main.log: an earlier run's log, with no checkpoint to resume from, is replaced by this run's" \
        in third.stdout.splitlines()
    assert [line.split()[0] for line in log.read_text().splitlines()] == ["s:0", "s:1"]

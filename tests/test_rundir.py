"""The run directory (-o) under misuse and faults, as a new user meets them: two trainers on one
directory, checkpoints that are not whole, resuming a finished run or with flags that change what
the data position means, a full disk and a read-only directory."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fileformats
import train_gpt2 as gpt

REPO = Path(__file__).resolve().parents[1]
TINY = ["-e", "d1", "-b", "2", "-t", "32", "-s", "0", "-v", "0"]  # 1 layer, C=64


def run(*args, cwd, check=True, prefix=()):
    result = subprocess.run([*prefix, sys.executable, str(REPO / "train_gpt2.py"), *args], cwd=cwd, capture_output=True,
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


# ----------------------------------------------------------------------------- checkpoints that are not whole

STRAIGHT = [*TINY, "-v", "2", "-m", "1", "-x", "4", "-n", "2"]


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """One process, checkpoints at steps 2 and 4, val loss at 0, 2 and 4."""
    cwd = tmp_path_factory.mktemp("straight")
    run(*STRAIGHT, *data, "-o", "run", cwd=cwd)
    return cwd / "run"


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory):
    """Two processes (built-in launcher), checkpoints at steps 2 and 4."""
    cwd = tmp_path_factory.mktemp("two_ranks")
    run(*TINY, *data, "-x", "4", "-n", "2", "-pn", "2", "--device", "cpu", "-o", "run", cwd=cwd)
    return cwd / "run"


def test_a_truncated_newest_model_file_is_passed_over_for_the_checkpoint_before_and_said(straight, data, tmp_path):
    """A disk that lost data in a crash: DONE_4 is there, its model file is torn. -y 1 goes on from
    step 2, says why in one line, and writes step 4's files anew: the same bytes as the first time."""
    copy = shutil.copytree(straight, tmp_path / "run")
    torn = copy / "model_00000004.bin"
    torn.write_bytes(torn.read_bytes()[:5000])
    result = run(*STRAIGHT, *data, "-o", "run", "-y", "1", cwd=tmp_path)
    size = (straight / "model_00000004.bin").stat().st_size
    assert f"-o run: the checkpoint at step 4 is not whole (run/model_00000004.bin: file is 5000 bytes, expected " \
           f"1024 + 4 * {(size - 1024) // 4} = {size} for {(size - 1024) // 4} fp32 parameters): going on from the " \
           f"newest whole one, at step 2" in result.stdout.splitlines()
    assert "resuming from run/model_00000002.bin at step 2" in result.stdout
    for name in ("model_00000004.bin", "state_00000004_00000.bin", "main.log"):
        assert (copy / name).read_bytes() == (straight / name).read_bytes(), name


def test_a_torn_only_checkpoint_is_one_line_naming_the_file(straight, data, tmp_path):
    copy = shutil.copytree(straight, tmp_path / "run")
    for name in ("DONE_00000002", "model_00000002.bin", "state_00000002_00000.bin"):
        os.remove(copy / name)
    state = copy / "state_00000004_00000.bin"
    state.write_bytes(state.read_bytes()[:-5])
    before = sorted(os.listdir(copy))
    result = run(*TINY, *data, "-x", "6", "-n", "2", "-o", "run", "-y", "1", cwd=tmp_path, check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: -o run: the checkpoint at step 4 is not whole (run/state_00000004_00000.bin: file is "
        f"{state.stat().st_size} bytes: not the 1024-byte header, 2 fp32 arrays of one length (m, v) and our "
        f"{fileformats.TRAILER_BYTES}-byte trailer), and no earlier one is: restore its files, or start again in "
        f"another -o"], result.stderr
    assert sorted(os.listdir(copy)) == before


def test_a_missing_state_file_of_the_newest_checkpoint_is_named_and_the_one_before_goes_on(two_ranks, data,
                                                                                            tmp_path):
    """One rank's state file deleted used to read as a process-count mismatch, with advice to resume
    on -pn 1."""
    copy = shutil.copytree(two_ranks, tmp_path / "run")
    os.remove(copy / "state_00000004_00001.bin")
    result = run(*TINY, *data, "-x", "4", "-n", "2", "-pn", "2", "--device", "cpu", "-o", "run", "-y", "1",
                 cwd=tmp_path)
    assert "-o run: the checkpoint at step 4 is not whole (run/state_00000004_00001.bin: no such file, although the " \
           "checkpoint's other state files are of a run of 2 processes): going on from the newest whole one, at " \
           "step 2" in result.stdout.splitlines()
    for name in ("model_00000004.bin", "state_00000004_00000.bin", "state_00000004_00001.bin", "main.log"):
        assert (copy / name).read_bytes() == (two_ranks / name).read_bytes(), name


@pytest.mark.parametrize("removed, expected", [
    (["state_00000004_00000.bin"], "run/state_00000004_00000.bin: no such file, although the checkpoint's other "
                                   "state files are of a run of 2 processes"),
    (["state_00000004_00000.bin", "state_00000004_00001.bin"],
     "run/state_00000004_00000.bin: no such file: the checkpoint has no state file at all"),
], ids=["rank 0's", "every rank's"])
def test_missing_state_files_of_the_only_checkpoint_are_one_line_naming_one(two_ranks, data, tmp_path, removed,
                                                                             expected):
    """...and with every one gone, as a run of 0 processes (-pn 0)."""
    copy = shutil.copytree(two_ranks, tmp_path / "run")
    for name in ["DONE_00000002", "model_00000002.bin", "state_00000002_00000.bin", "state_00000002_00001.bin",
                 *removed]:
        os.remove(copy / name)
    before = sorted(os.listdir(copy))
    result = run(*TINY, *data, "-x", "6", "-pn", "2", "--device", "cpu", "-o", "run", "-y", "1", cwd=tmp_path,
                 check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: -o run: the checkpoint at step 4 is not whole ({expected}), and no "
                                          f"earlier one is: restore its files, or start again in another -o"]
    assert sorted(os.listdir(copy)) == before


# ----------------------------------------------------------------------------- another -b with the same -d

def losses(stdout):
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"^step +(\d+)/\d+ \| loss (\S+)", stdout, re.M)}


def test_another_b_with_the_same_d_is_said_and_trains_on_the_same_rows(straight, data, tmp_path):
    """-b 1 on a run of -b 2 and -d 64 (the default): gradient accumulation 2 instead of 1 over the
    same rows as the run that never stopped, so the same losses but for float rounding (the rows a
    loader of B=1 reads in its own order give a step-5 loss 0.05 away)."""
    never_stopped = losses(run(*STRAIGHT, *data, "-x", "6", "-o", "never", cwd=tmp_path).stdout)
    shutil.copytree(straight, tmp_path / "run")
    result = run(*STRAIGHT, *data, "-x", "6", "-b", "1", "-o", "run", "-y", "1", cwd=tmp_path)
    assert "resuming on 1 process(es) with -b 1 -z 0 from a checkpoint written by 1 with -b 2 -z 0: the total batch " \
           "stays 64 tokens (gradient accumulation 1 -> 2), the data goes on in the order of the run's first start " \
           "(1 process(es) with -b 2), none of the epoch repeated or skipped" in result.stdout.splitlines()
    resumed = losses(result.stdout)
    assert sorted(resumed) == [5, 6]
    for step in (5, 6):
        assert resumed[step] == pytest.approx(never_stopped[step], rel=1e-6, abs=0)


def test_a_b_the_total_batch_does_not_split_into_is_one_line(straight, data, tmp_path):
    copy = shutil.copytree(straight, tmp_path / "run")
    result = run(*STRAIGHT, *data, "-x", "6", "-b", "3", "-o", "run", "-y", "1", cwd=tmp_path, check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == ["error: -b 3: the total batch of the checkpoint at step 4, 64 tokens (-d), "
                                          "does not split into B*T*processes = 96: choose -b and the number of "
                                          "processes so that it does"], result.stderr
    assert files(copy) == files(straight)


# ----------------------------------------------------------------------------- a finished run

def files(run_dir):
    """Every file of a run directory and its bytes, but the lock's (the pid of its last holder)."""
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != "lock"}


@pytest.mark.parametrize("args", [[], ["-b", "1"]], ids=["same flags", "another -b"])
def test_resuming_a_finished_run_says_there_is_nothing_to_train_and_changes_nothing(straight, data, tmp_path, args):
    """It used to evaluate again and rewrite main.log's last val line (with -b 1, to another value)."""
    copy = shutil.copytree(straight, tmp_path / "run")
    before = files(copy)
    result = run(*STRAIGHT, *data, *args, "-o", "run", "-y", "1", cwd=tmp_path)
    assert result.stdout.splitlines() == ["-o run: the run is finished: its newest checkpoint is at step 4, the last "
                                          "one: nothing to train, and nothing is changed (raise -x to train on)"]
    assert files(copy) == before


# ----------------------------------------------------------------------------- a full disk, a read-only directory

def test_a_full_disk_while_checkpointing_names_the_file_and_the_step_and_leaves_no_partial_file(data, tmp_path,
                                                                                                monkeypatch, capsys):
    """The step-4 state file goes to /dev/full, which answers every write as a full disk does: the
    run used to end in '[Errno 28] No space left on device' alone, with the step-4 model's partial
    file left behind."""
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        return real_open("/dev/full" if "state_00000004" in str(path) else path, mode, *args, **kwargs)

    monkeypatch.setattr(fileformats, "open", full_disk, raising=False)
    with pytest.raises(SystemExit) as exit:
        gpt.main([*STRAIGHT, *data, "-x", "6", "-o", str(tmp_path / "run")])
    assert exit.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: step 4: writing {tmp_path}/run/state_00000004_00000.bin: No space left on device; its partial files "
        f"are removed, and the newest whole checkpoint is at step 2, where -y 1 goes on"]
    assert sorted(os.listdir(tmp_path / "run")) == ["DONE_00000002", "lock", "main.log", "model_00000002.bin",
                                                    "state_00000002_00000.bin"]


def as_a_user():
    """A command prefix under which file permissions hold: none for a user; for root, setpriv
    dropping its capabilities (root writes in a read-only directory otherwise)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root writes in a read-only directory, and setpriv is not here to stop it")
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]


def test_a_read_only_run_directory_is_named_not_a_temporary_file(data, tmp_path):
    """It used to be 'error: run/main.log.tmp<pid>: Permission denied'."""
    (tmp_path / "run").mkdir(mode=0o555)
    result = run(*TINY, *data, "-x", "2", "-o", "run", cwd=tmp_path, check=False, prefix=as_a_user())
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["error: -o run: this directory cannot be written (Permission denied): give "
                                          "one you can write to"], result.stderr
    assert not any((tmp_path / "run").iterdir())

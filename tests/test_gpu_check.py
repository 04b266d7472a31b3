"""dev/gpu_check.py (make gpu-check, make gpu-prep) without a GPU: it stops at once with one line that says
so (before anything about CuPy), which comes back in the fetch folder too; its stages run each in its own
slot, a failed or hung one not stopping the next; what a remote caller fetches is at most 8 files, flat,
all logs in one tarball; the commit given with --commit reaches every record; a skipped GPU test fails
the tests stage; the summary screen reads what the stages recorded (junit XML from a real pytest run,
JSON records as dev/bench/kernels.py, dev/bench/train.py and dev/loss_parity.py write them on a GPU, and
one from a real CPU run of dev/bench/train.py); the stage limits hold the plan of a 15-minute lease; the
prep folder's wheels are installed only where the machine lacks them."""
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "dev"))
import gpu_check as gc  # noqa: E402
import records  # noqa: E402  (dev/bench, which gpu_check put on sys.path)

SCRIPT = str(REPO / "dev/gpu_check.py")
PREFLIGHT = {"device": "NVIDIA H200", "arch": "sm_90a", "driver": 13000, "cubins_built": 0, "python": "3.12.3",
             "versions": {"cupy-cuda13x": "14.2.0", "nvmath-python": "1.0.0", "torch": "2.11.0"},
             "seconds": {"device": 0.8, "kernels": 0.1, "wheels": 1.0, "backend": 3.2}, "commit": "c585677"}


NO_GPU_HERE = not glob.glob("/dev/nvidia[0-9]*") and shutil.which("nvidia-smi") is None


@pytest.mark.skipif(not NO_GPU_HERE, reason="a GPU is here: gpu-check would run for real")
def test_without_a_gpu_run_ends_in_one_line_and_exit_1(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, "run", str(tmp_path / "out"), "--fetch", str(tmp_path / "back")],
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    # the machine's lack first, whatever Python packages it has: this interpreter may well have CuPy
    assert re.fullmatch(r"error: no GPU on this machine: .+\n", result.stderr), result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.txt"]  # nothing ran, no stage
    # the same line comes back, in the tarball too
    assert (tmp_path / "back/summary.txt").read_text() == \
        f"gpu-check: stopped in the preflight: {result.stderr.removeprefix('error: ')}"
    with tarfile.open(tmp_path / "back/logs.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["out", "out/summary.txt"]
    # the same through make, which adds its own line on the failed recipe
    result = subprocess.run(["make", "-s", "gpu-check", f"GPU_CHECK_OUT={tmp_path / 'make_out'}",
                             f"PYTHON={sys.executable}", f"DIR={tmp_path / 'no_prep'}"], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 2 and result.stdout == ""
    # make names itself make[N] when a make runs it (make test, in CI)
    assert re.match(r"error: no GPU on this machine: .+\nmake(\[\d+\])?: \*\*\* \[Makefile:\d+: gpu-check\] "
                    r"Error 1\n\Z", result.stderr), result.stderr
    assert (tmp_path / "make_out/summary.txt").exists()


def fake_nvidia_smi(folder, rc, output):
    """An nvidia-smi in folder that prints output and exits rc."""
    folder.mkdir(exist_ok=True)
    smi = folder / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\nprintf '%s\\n' {shlex.quote(output)}\nexit {rc}\n")
    smi.chmod(0o755)


@pytest.mark.parametrize("device_file, smi, missing", [
    (None, None, "no GPU on this machine: no /dev/nvidia<N> device and no nvidia-smi"),
    ("nvidia0", None, None),
    ("nvidiactl", None, "no GPU on this machine: no /dev/nvidia<N> device and no nvidia-smi"),  # the driver, no GPU
    (None, (0, "GPU 0: NVIDIA H200 (UUID: GPU-0c1ab2de-0000-1111-2222-333344445555)"), None),  # WSL: no device files
    (None, (6, "No devices were found"),
     "no GPU on this machine: no /dev/nvidia<N> device, and nvidia-smi -L says No devices were found"),
    (None, (9, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."),
     "no GPU on this machine: no /dev/nvidia<N> device, and nvidia-smi -L says NVIDIA-SMI has failed because it "
     "couldn't communicate with the NVIDIA driver."),
])
def test_a_gpu_is_its_device_file_or_nvidia_smis_list(tmp_path, monkeypatch, device_file, smi, missing):
    dev = tmp_path / "dev"
    dev.mkdir()
    if device_file:
        (dev / device_file).touch()
    monkeypatch.setattr(gc, "GPU_DEVICE_FILES", str(dev / "nvidia[0-9]*"))
    if smi:
        fake_nvidia_smi(tmp_path / "bin", *smi)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert gc.gpu_missing() == missing


# what the device probe says on a machine without CuPy
NO_CUPY_PROBE = 'import json; print(json.dumps({"cupy": False, "device_error": None}))'


def test_the_preflight_says_there_is_no_gpu_before_what_python_lacks(tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "DEVICE_PROBE", NO_CUPY_PROBE)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no nvidia-smi
    monkeypatch.setattr(gc, "GPU_DEVICE_FILES", str(tmp_path / "dev/nvidia[0-9]*"))
    with pytest.raises(gc.PreflightError, match=r"^no GPU on this machine: no /dev/nvidia<N> device and no "
                                                r"nvidia-smi$"):
        gc.preflight(tmp_path, None, tmp_path / "site", dict(os.environ))
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/nvidia0").touch()  # a GPU is here: now what Python lacks
    with pytest.raises(gc.PreflightError, match=r"^no usable GPU backend: CuPy is not installed"):
        gc.preflight(tmp_path, None, tmp_path / "site", dict(os.environ))


def test_make_gpu_check_ignores_the_environments_out():
    """A GPU machine of the device tool sets OUT in the environment: the Makefile's own folder stays."""
    result = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check", "PYTHON=python3"], cwd=REPO,
                            capture_output=True, text=True, env=dict(os.environ, OUT="/the/device/tools/out"))
    assert result.returncode == 0 and result.stdout.startswith("python3 dev/gpu_check.py run log_gpu_check "), \
        result.stdout


def test_an_unknown_stage_is_one_line_and_exit_1(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, "run", str(tmp_path), "--stages", "tests,nope"],
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"error: --stages nope: not one of {', '.join(s.name for s in gc.STAGES)}\n"


@pytest.mark.parametrize("flags, message", [
    (["--commit", "main"], "--commit main: give a commit id as git prints it"),
    (["--commit", "c585677-dirty"], "--commit c585677-dirty: give a commit id"),
    (["--fetch", "{out}/back"], "--fetch {out}/back: must lie outside {out}"),
    (["--fetch", "{full}"], "--fetch {full}: not an empty folder"),
])
def test_a_bad_commit_or_fetch_folder_is_one_line_before_the_preflight(tmp_path, flags, message):
    out, full = tmp_path / "out", tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("a file of the user's")
    flags = [f.format(out=out, full=full) for f in flags]
    result = subprocess.run([sys.executable, SCRIPT, "run", str(out), *flags], capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: " + message.format(out=out, full=full)) and result.stderr.count("\n") == 1
    assert not (out / "preflight.log").exists() and (full / "mine.txt").exists()


# ----------------------------------------------------------------------------- stages in their slots

def toy_stage(name, limit_s, code):
    return gc.Stage(name, limit_s, lambda slot: slot.command([sys.executable, "-c", code]).rc == 0,
                    lambda folder, record: [f"{name} summary"], "a toy")


def test_stages_run_in_their_slots_and_a_failed_or_hung_one_does_not_stop_the_next(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gc, "GRACE_S", 1)
    marker = tmp_path / "interrupted"
    stages = [
        toy_stage("fails", 30, "raise SystemExit(3)"),
        toy_stage("hangs", 2, "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"),
        toy_stage("interrupted", 2, "import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
                                    f"    open({str(marker)!r}, 'w').write('SIGINT first')"),
        toy_stage("passes", 30, "print('ok')"),
    ]
    out = tmp_path / "out"
    out.mkdir()
    start = time.monotonic()
    assert gc.run_stages(out, stages, ["fails", "hangs", "interrupted", "passes"], PREFLIGHT, dict(os.environ), []) \
        is False
    assert time.monotonic() - start < 10  # two 2 s slots, the last second of each a grace
    record = json.loads((out / "gpu_check.json").read_text())
    assert {name: r["status"] for name, r in record["stages"].items()} == \
        {"fails": "failed", "hangs": "timed out", "interrupted": "timed out", "passes": "passed"}
    assert 2 <= record["stages"]["hangs"]["seconds"] < 2 + 1  # SIGINT ignored: killed at the slot's end
    assert marker.read_text() == "SIGINT first"  # pytest writes its junit XML on SIGINT
    assert "ok" in (out / "passes/log.txt").read_text()
    text = capsys.readouterr().out
    assert text.endswith("gpu-check: FAILED: fails, hangs, interrupted\n")
    assert (out / "summary.txt").read_text() == text[text.rindex("gpu-check on"):]
    assert "== passes: PASSED" in text and "   passes summary" in text

    # a rerun of one stage into the same folder keeps the others' records, marked as earlier
    stages[0] = toy_stage("fails", 30, "pass")
    assert gc.run_stages(out, stages, ["fails"], PREFLIGHT, dict(os.environ), []) is False
    text, passed = gc.summary(out, stages)
    assert re.search(r"== fails: PASSED in \d+ s of 30 s\n", text)
    assert re.search(r"== passes: PASSED in \d+ s of 30 s \(an earlier run\)\n", text)
    assert text.endswith("gpu-check: FAILED: hangs, interrupted") and not passed


def test_a_command_leaves_nothing_running(tmp_path):
    """A process the command started and left behind (a compile worker, say) ends with it, not in a
    later stage's slot."""
    pid_file = tmp_path / "pid"
    code = (f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid))")
    slot = gc.Slot("leaves", tmp_path, time.monotonic() + 30, dict(os.environ), [])
    assert slot.command([sys.executable, "-c", code]).rc == 0
    pid = int(pid_file.read_text())
    for _ in range(100):
        if ended(pid):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"process {pid}, started by the command, still runs")


def ended(pid):
    """Gone, or a zombie (killed, not yet reaped by whoever adopted it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


FAKE_TESTS = {
    "test_cuda_fake.py": """
        import pytest
        pytestmark = pytest.mark.gpu
        @pytest.mark.parametrize("x", ["one token", "two"])
        def test_passes(x): pass
        def test_also_passes(): pass
        def test_fails(): assert 1 == 2
    """,
    "test_gpu_fake.py": """
        import pytest
        @pytest.fixture
        def broken(): raise RuntimeError("set-up fails")
        @pytest.mark.gpu
        def test_passes(): pass
        @pytest.mark.gpu
        def test_passes_too(): pass
        @pytest.mark.gpu
        @pytest.mark.skipif(True, reason="nvmath-python is not installed")
        def test_skipped(): pass
        @pytest.mark.gpu
        @pytest.mark.skipif(True, reason="nvmath-python is not installed")
        def test_skipped_too(): pass
        @pytest.mark.gpu
        def test_errors(broken): pass
        def test_on_the_cpu_deselected(): assert False
    """,
}
FAKE_COUNTS = {"tests/test_cuda_fake.py": dict(passed=3, failed=1, skipped=0),
               "tests/test_gpu_fake.py": dict(passed=2, failed=1, skipped=2)}


def fake_test_files(root, files):
    (root / "tests").mkdir(parents=True)
    (root / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a CUDA device\n")
    for name, code in files.items():
        (root / "tests" / name).write_text(textwrap.dedent(code))
    return [str(root / "tests" / name) for name in files]


def slot_for_tests(tmp_path, test_files):
    folder = tmp_path / "out/tests"
    folder.mkdir(parents=True)
    return gc.Slot("tests", folder, time.monotonic() + 120, dict(os.environ), test_files)


def test_the_tests_stage_counts_skipped_gpu_tests_as_failures(tmp_path):
    all_pass = {"test_gpu_fake.py": "import pytest\n@pytest.mark.gpu\ndef test_passes(): pass\n"
                                    "def test_on_the_cpu_deselected(): assert False\n"}
    assert gc.run_tests(slot_for_tests(tmp_path / "a", fake_test_files(tmp_path / "a/repo", all_pass)))
    one_skip = {"test_gpu_fake.py": all_pass["test_gpu_fake.py"] + "@pytest.mark.gpu\n@pytest.mark.skipif(True, "
                                                                   "reason='no nvmath')\ndef test_skipped(): pass\n"}
    slot = slot_for_tests(tmp_path / "b", fake_test_files(tmp_path / "b/repo", one_skip))
    assert not gc.run_tests(slot)
    assert slot.record["commands"][0]["rc"] == 0  # pytest itself passed: the skip alone fails the stage
    assert gc.junit_counts(slot.dir / "tests.xml") == {"tests/test_gpu_fake.py": dict(passed=1, failed=0, skipped=1)}


def test_the_default_tests_are_every_file_pytest_finds_a_gpu_test_in():
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p",
                             "no:cacheprovider", "tests"], cwd=REPO, capture_output=True, text=True)
    collected = {line.split("::")[0] for line in result.stdout.splitlines() if "::" in line}
    assert collected and sorted(collected) == gc.gpu_test_files()


# ----------------------------------------------------------------------------- the summary, from records

def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def side(steps, tok_s, mfu, mfu_of_matmul, memory, first_step_s):
    """A side of dev/bench/train.py's record as it writes it (the figures need not agree: the summary
    only shows them)."""
    return {"setup_s": 3.2, "first_step_s": first_step_s, "warmup_ms": [45.0, 44.0], "step_ms": steps,
            "memory_mib": memory, "median_ms": sorted(steps)[len(steps) // 2], "min_ms": min(steps),
            "max_ms": max(steps), "tok_s": tok_s, "mfu": mfu, "mfu_of_matmul": mfu_of_matmul}


def train_record(B, status, sides, ratios):
    return {"device": "NVIDIA H200, torch 2.11.0, cupy 14.2.0", "status": status, "B": B, "T": 1024, "rounds": 30,
            "order": "alternating: each round a step of every side, the first side rotating by one each round",
            "peak_flops": 989.4e12, "matmul_flops": 788.0e12, "sides": sides, "ratios": ratios,
            "memory": "reserved against reserved, each side's growth over its set-up and warm-up: ours, ..."}


def recorded_run(tmp_path):
    out = tmp_path / "out"
    files = fake_test_files(tmp_path / "repo", FAKE_TESTS)
    subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-o",
                    "junit_family=xunit1", f"--junitxml={out / 'tests/tests.xml'}", *files],
                   cwd=tmp_path / "repo", capture_output=True)
    write(out / "tests/log.txt", "tests/test_cuda_fake.py::test_passes[one token] PASSED    [ 14%]\n"
                                 "tests/test_cuda_fake.py::test_passes[two] \n")
    write(out / "kernels/kernels_nvidia-h200.json", {
        "peaks": {"copy_GBps": 4300.0, "bf16_matmul_TFLOPs": 788.0},
        "kernels": [{"kernel": "layernorm_forward", "ours_ms": 0.01, "torch_eager_ms": 0.02,
                     "ratio_torch_eager_over_ours": 2.0},
                    {"kernel": "attention_backward", "ours_ms": 0.5, "torch_eager_ms": 0.3,
                     "ratio_torch_eager_over_ours": 0.6},
                    {"kernel": "adamw", "ours_ms": 0.1, "torch_eager_ms": 0.1, "ratio_torch_eager_over_ours": 1.0}]})
    write(out / "train/train_nvidia-h200_d12_b16_t1024.json", train_record(16, "complete", {
        "ours": side([40.0, 41.0, 50.0], 399_609.8, 0.2582, 0.3242, 20480.4, 1.5),
        "torch_compile": side([44.0, 45.5, 46.0], 360_087.9, 0.2327, 0.2921, 30720.0, 48.25)},
        {"ours / torch_compile": 1.11}))
    write(out / "train-max/train_nvidia-h200_d12_b64_t1024.json", train_record(64, "interrupted (SIGINT) at: ours "
                                                                                   "warmed up", {
        "ours": dict(side([1.0], 0, 0, 0, 75000.0, 2.0), step_ms=[], warmup_ms=[]),
        "torch_compile": {"setup_s": 4.1, "first_step_s": None, "warmup_ms": [], "step_ms": [], "memory_mib": None}},
        {}))
    for name in ("median_ms", "min_ms", "max_ms", "tok_s", "mfu", "mfu_of_matmul"):  # no timed step, no figures
        record = json.loads((out / "train-max/train_nvidia-h200_d12_b64_t1024.json").read_text())
        del record["sides"]["ours"][name]
        write(out / "train-max/train_nvidia-h200_d12_b64_t1024.json", record)
    run_figures = lambda seconds, first, median, val: {  # noqa: E731
        "seconds": seconds, "first_step_ms": first, "median_step_ms": median, "train": [10.9] * 50,
        "val_steps": [0, 10, 20, 30, 40, 50], "val": [10.9, 8.0, 7.1, 6.6, 6.4, val]}
    write(out / "parity/loss_parity_nvidia-h200.json", {
        "status": "complete", "steps": 50, "epochs": 2.684, "smooth": 10, "passed": True,
        "runs": {"ours": run_figures(21.5, 1234.5, 61.2, 6.3321),
                 "torch_fp32": run_figures(30.1, 2100.0, 301.0, 6.3102),
                 "torch_bf16": run_figures(12.0, 900.0, 48.6, 6.3187)},
        "gaps": {"ours_train": 0.0123, "ours_val": 0.0219, "torch_bf16_train": 0.0061, "torch_bf16_val": 0.0085},
        "bars": {"train": 0.02, "val": 0.0255}})
    run = "2026-11-29T15:00:00.000"
    stage = dict(seconds=30.0, run=run)
    write(out / "gpu_check.json", {"run": run, "commit": "c585677", "preflight": PREFLIGHT, "stages": {
        "tests": dict(stage, status="timed out", timed_out=True, limit_s=140),
        "kernels": dict(stage, status="passed", limit_s=40),
        "train": dict(stage, status="passed", limit_s=90),
        "train-max": dict(stage, status="timed out", timed_out=True, limit_s=90),
        "parity": dict(stage, status="passed", limit_s=60),
    }})
    return out


def test_summary_reads_every_stage_record(tmp_path):
    text, passed = gc.summary(recorded_run(tmp_path))
    lines = text.splitlines()
    assert not passed and lines[-1] == "gpu-check: FAILED: tests, train-max"
    assert lines[0] == ("gpu-check on NVIDIA H200 (sm_90a, driver 13000, Python 3.12.3, cupy-cuda13x 14.2.0, "
                        "nvmath-python 1.0.0, torch 2.11.0), commit c585677")
    assert lines[1] == "preflight: device 0.8 s, kernels 0.1 s, wheels 1.0 s, backend 3.2 s (0 cubins built here)"
    rows = {m[0]: dict(passed=int(m[1]), failed=int(m[2]), skipped=int(m[3]))
            for m in re.findall(r"^ +(\S+) +(\d+) +(\d+) +(\d+)", text, re.M)}
    assert rows == dict(FAKE_COUNTS, all=dict(passed=5, failed=2, skipped=2))
    assert re.search(r"tests/test_gpu_fake.py .*<- skipped GPU tests fail", text)
    assert "stopped at the slot's limit during tests/test_cuda_fake.py::test_passes[two]" in text
    assert text.count("log.txt ends:") == 1 and "   log.txt ends: tests/test_cuda_fake.py::test_passes[two]" in text
    assert ("3 kernels; ours as fast as PyTorch eager's or faster in 2; the furthest behind: attention_backward "
            "(torch eager/ours 0.60); card: copy 4300.0 GB/s, bf16 matmul 788.0 TFLOP/s") in text
    train = text[text.index("== train:"):text.index("== train-max:")].strip().splitlines()[1:]
    assert train == [
        "   B=16 T=1024, 30 rounds: complete; order: alternating: each round a step of every side, the first side "
        "rotating by one each round",
        "     MFU against datasheet 989.4 | measured matmul 788.0 TFLOP/s; memory: reserved against reserved, each "
        "side's growth over its set-up and warm-up",
        "     ours           median 41.00 ms (min 40.00, max 50.00, 3 steps), 399,610 tok/s, MFU 25.8% | 32.4%; "
        "memory 20,480 MiB; set-up 3.2 s, first step 1.5 s",
        "     torch_compile  median 45.50 ms (min 44.00, max 46.00, 3 steps), 360,088 tok/s, MFU 23.3% | 29.2%; "
        "memory 30,720 MiB; set-up 3.2 s, first step 48.2 s",
        "     ours / torch_compile (tok/s at the medians): 1.110"]
    train_max = text[text.index("== train-max:"):text.index("== parity:")].splitlines()
    assert train_max[1] == "   B=64 T=1024, 30 rounds: interrupted (SIGINT) at: ours warmed up; order: alternating: " \
                           "each round a step of every side, the first side rotating by one each round"
    assert train_max[3:5] == [
        "     ours           no timed step; memory 75,000 MiB; set-up 3.2 s, first step 2.0 s",
        "     torch_compile  no timed step; memory n/a MiB; set-up 4.1 s, first step n/a s"]
    parity = text[text.index("== parity:"):].splitlines()[1:5]
    assert parity == [
        "   50 steps (2.68 epochs): complete",
        "     ours       50 steps, 21.5 s (first step 1,234 ms, then 61 ms); last val loss 6.3321",
        "     torch_fp32 50 steps, 30.1 s (first step 2,100 ms, then 301 ms); last val loss 6.3102",
        "     torch_bf16 50 steps, 12.0 s (first step 900 ms, then 49 ms); last val loss 6.3187"]
    assert ("     largest gap to torch fp32, train loss (moving average of 10): ours 0.0123 | torch bf16 0.0061, bar "
            "0.0200; val loss: ours 0.0219 | torch bf16 0.0085, bar 0.0255: PASS") in lines


def test_summary_verb_prints_it_and_exits_by_the_verdict(tmp_path):
    out = recorded_run(tmp_path)
    result = subprocess.run([sys.executable, SCRIPT, "summary", str(out)], capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == gc.summary(out)[0] + "\n"
    record = json.loads((out / "gpu_check.json").read_text())
    record["stages"]["tests"]["status"] = record["stages"]["train-max"]["status"] = "passed"
    write(out / "gpu_check.json", record)
    result = subprocess.run([sys.executable, SCRIPT, "summary", str(out)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.endswith("gpu-check: PASSED (5 stages)\n")


def test_train_summary_reads_the_record_dev_bench_train_writes(tmp_path):
    """The record of a real (CPU) run of dev/bench/train.py: no datasheet MFU there, host memory."""
    result = subprocess.run([sys.executable, "dev/bench/train.py", "--device", "cpu", "-e", "d1", "-b", "2", "-t",
                             "16", "-n", "2", "-w", "1", "--torch", "eager", "-o", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    r = json.loads(next(tmp_path.glob("train_*.json")).read_text())
    lines = gc.summarise_train(tmp_path, {})
    assert lines[:2] == [f"B=2 T=16, 2 rounds: complete; order: {r['order']}",
                         f"  MFU against no datasheet peak | measured matmul {r['matmul_flops'] / 1e12:.1f} TFLOP/s; "
                         "memory: host memory, each side's growth over its set-up and warm-up"]
    for line, (name, f) in zip(lines[2:4], r["sides"].items()):
        assert line.startswith(f"  {name:14s} median {f['median_ms']:.2f} ms (min {f['min_ms']:.2f}, max "
                               f"{f['max_ms']:.2f}, 2 steps), {f['tok_s']:,.0f} tok/s, MFU n/a | ")
    assert lines[4] == f"  ours / torch_eager (tok/s at the medians): {r['ratios']['ours / torch_eager']:.3f}"


# ----------------------------------------------------------------------------- pure rules

def test_a_run_and_a_rerun_of_what_failed_fit_one_lease():
    """The plan of the module docstring: a machine's start, the whole run, a second start, and a rerun
    of the preflight and the longest stage (what a fix usually needs) within one lease; the run within
    the device tool's 10 minutes a command. A stage added for another check must take its time from
    the others."""
    run = gc.PREFLIGHT_LIMIT_S + sum(stage.limit_s for stage in gc.STAGES) + gc.OVERHEAD_S
    rerun = gc.PREFLIGHT_LIMIT_S + max(stage.limit_s for stage in gc.STAGES) + gc.OVERHEAD_S
    assert gc.MACHINE_START_S + run + gc.MACHINE_START_S + rerun <= gc.LEASE_S == 15 * 60
    assert run <= 600 - 60 and gc.MACHINE_START_S >= 120  # the device tool says 1-2 minutes to start
    assert all(stage.limit_s > gc.GRACE_S for stage in gc.STAGES)
    plan = dict(re.findall(r"^    ([a-z][\w-]*(?: [a-z_]+)*(?: \([^)]*\))?)\s{2,}(\d+)\b", gc.__doc__, re.M))
    assert {name.split(" (")[0]: int(s) for name, s in plan.items()} == dict(
        {"machine start": gc.MACHINE_START_S, "preflight": gc.PREFLIGHT_LIMIT_S, "gpu_check itself": gc.OVERHEAD_S},
        **{stage.name: stage.limit_s for stage in gc.STAGES})


def test_the_parity_stage_runs_a_fixed_plan_whatever_the_train_stage_measured(tmp_path):
    calls = []

    class FakeSlot:
        dir = tmp_path / "parity"

        def command(self, argv):
            calls.append(argv)
            return gc.Result(0, "", False)

    write(tmp_path / "train/train_nvidia-h200_d12_b16_t1024.json", {"B": 16})
    assert gc.run_loss_parity(FakeSlot())
    (tmp_path / "train/train_nvidia-h200_d12_b16_t1024.json").unlink()
    assert gc.run_loss_parity(FakeSlot())
    assert calls[0] == calls[1] == [sys.executable, "dev/loss_parity.py", "--device", "cuda", "-o",
                                    str(tmp_path / "parity/runs"), "--results", str(tmp_path / "parity")]


def test_only_the_wheels_the_machine_lacks_are_installed():
    wheels = [Path(name) for name in ("nvmath_python-1.0.0-cp312-cp312-manylinux_2_28_x86_64.whl",
                                      "cuda_core-1.2.2-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
                                      "cuda_pathfinder-1.9.1-py3-none-any.whl", "pytest_timeout-2.4.0-py3-none-any.whl")]
    machine = {"cuda-core": "0.3.2", "cuda-pathfinder": "1.9.0", "pytest-timeout": "2.4.0"}  # no nvmath, old core
    assert gc.wheels_to_install(wheels, machine.get) == wheels[:2]
    assert gc.wheels_to_install(wheels, {}.get) == wheels
    assert gc.wheels_to_install(wheels, dict(machine, **{"nvmath-python": "1.0.0", "cuda-core": "0.5.0"}).get) == []


def test_the_prep_folder_fills_in_missing_files_and_leaves_the_rest(tmp_path):
    write(tmp_path / "prep/data/tinyshakespeare/tiny_shakespeare_val.bin", "prep val")
    write(tmp_path / "prep/data/gpt2_tokenizer.bin", "prep tokenizer")
    write(tmp_path / "repo/data/gpt2_tokenizer.bin", "the repo's own")
    gc.copy_missing(tmp_path / "prep/data", tmp_path / "repo/data")
    assert (tmp_path / "repo/data/tinyshakespeare/tiny_shakespeare_val.bin").read_text() == "prep val"
    assert (tmp_path / "repo/data/gpt2_tokenizer.bin").read_text() == "the repo's own"


# ----------------------------------------------------------------------------- what comes back, and the commit

def test_what_comes_back_is_at_most_8_files_flat_with_every_log_in_one_tarball(tmp_path):
    out, fetch = tmp_path / "log_gpu_check", tmp_path / "back"
    fetch.mkdir()
    write(out / "summary.txt", "the summary\n")
    write(out / "gpu_check.json", {"stages": {}})
    write(out / "preflight.log", "probes\n")
    # in the stages' order, as they come back; a sixth does not fit
    stage_records = {"kernels/kernels_gpu.json": {"k": 1}, "train/train_gpu_d12_b16_t1024.json": {"t": 16},
                     "train-max/train_gpu_d12_b32_t1024.json": {"t": 32}, "train-max/train_gpu_d12_b64_t1024.json": {},
                     "parity/loss_parity_gpu.json": {"p": 1}, "parity/loss_parity_later.json": {"p": 2}}
    for name, record in stage_records.items():
        write(out / name, record)
    write(out / "parity/runs/ours/main.log", "s:0 tel:10.9\n")  # three folders down in OUT
    write(out / "tests/tests.xml", "<testsuites/>")
    gc.publish(out, fetch)
    files = sorted(fetch.rglob("*"))
    assert all(p.is_file() and p.parent == fetch for p in files) and len(files) == 8
    # summary, run record, tarball and the first 5 stage records; the sixth is in the tarball only
    kept = list(stage_records)[:5]
    assert sorted(p.name for p in files) == sorted(["summary.txt", "gpu_check.json", "logs.tar.gz"]
                                                   + [name.replace("/", "_") for name in kept])
    for name in kept:
        assert json.loads((fetch / name.replace("/", "_")).read_text()) == stage_records[name]
    with tarfile.open(fetch / "logs.tar.gz") as tar:
        inside = {m.name.removeprefix("log_gpu_check/") for m in tar.getmembers() if m.isfile()}
        assert inside == {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
        assert tar.extractfile("log_gpu_check/parity/runs/ours/main.log").read() == b"s:0 tel:10.9\n"
    # published again after the next stage: what is no longer chosen goes, nothing else is left
    (out / "kernels/kernels_gpu.json").unlink()
    gc.publish(out, fetch)
    names = {p.name for p in fetch.iterdir()}
    assert "kernels_kernels_gpu.json" not in names and "parity_loss_parity_later.json" in names and len(names) == 8


def test_the_commit_given_reaches_every_record_and_the_summary(tmp_path, monkeypatch):
    """A copy of the tree without .git, on a GPU machine: --commit is what the records say."""
    code = "import sys; sys.path[:0] = ['.', 'dev/bench']; import records; print('commit:', records.commit())"
    monkeypatch.setattr(gc, "STAGES", [toy_stage("records", 60, code)])
    monkeypatch.setattr(gc, "preflight", lambda out, prep, site, env: {k: v for k, v in PREFLIGHT.items()
                                                                       if k != "commit"})
    out = tmp_path / "out"
    assert gc.check(out, None, "", "", fetch=None, commit="0123abc+dirty") is True
    assert "commit: 0123abc+dirty\n" in (out / "records/log.txt").read_text()
    record = json.loads((out / "gpu_check.json").read_text())
    assert record["commit"] == record["preflight"]["commit"] == "0123abc+dirty"
    assert (out / "summary.txt").read_text().splitlines()[0].endswith("), commit 0123abc+dirty")


def test_bench_records_name_the_commit_they_are_given_or_unknown(tmp_path, monkeypatch):
    """Neither git nor .git on the copy of a tree: the records say 'unknown', or what the run was given."""
    monkeypatch.delenv(records.COMMIT_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on it
    assert records.commit() == "unknown"
    monkeypatch.setenv(records.COMMIT_ENV, "c585677")
    assert records.commit() == "c585677"


def test_bench_records_name_the_checkout_and_whether_it_is_dirty(tmp_path, monkeypatch):
    """A checkout of its own: the short commit, +dirty while a tracked or unignored file differs. A
    copy of the tree inside some other repository: not that repository's commit, but unknown."""
    monkeypatch.delenv(records.COMMIT_ENV, raising=False)
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    (repo / ".gitignore").write_text("log*/\n")
    (repo / "train_gpt2.py").write_text("print('v1')\n")
    git("add", ".")
    git("commit", "-q", "-m", "v1")
    head = git("rev-parse", "--short", "HEAD")
    monkeypatch.setattr(records, "REPO", repo)
    monkeypatch.setattr(records, "RESULTS", repo / "dev/bench/results")
    (repo / "log_run").mkdir()
    (repo / "log_run/main.log").write_text("s:0 tel:1.0\n")  # ignored: still clean
    assert records.commit() == head
    (repo / "dev/bench/results").mkdir(parents=True)
    (repo / "dev/bench/results/train_cpu_d2.json").write_text("{}")  # a record this run wrote: still clean
    assert records.commit() == head
    (repo / "train_gpt2.py").write_text("print('v2')\n")
    assert records.commit() == head + "+dirty"
    git("checkout", "-q", "train_gpt2.py")
    (repo / "new_test.py").write_text("")  # untracked, not ignored
    assert records.commit() == head + "+dirty"
    monkeypatch.setattr(records, "REPO", repo / "log_run")  # a tree copied into another checkout
    assert records.commit() == "unknown"

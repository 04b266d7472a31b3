"""dev/gpu_check.py (make gpu-check, make gpu-prep) without a GPU: it stops at once with one line;
its stages run each in its own slot, a failed or hung one not stopping the next; a skipped GPU test
fails the tests stage; the summary screen reads what the stages recorded (junit XML from a real
pytest run, JSON records as dev/bench/kernels.py, dev/bench/train.py and dev/loss_parity.py write
them on a GPU, and one from a real CPU run of dev/bench/train.py); the prep folder's wheels are
installed only where the machine lacks them."""
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kernels import cuda_unavailable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "dev"))
import gpu_check as gc  # noqa: E402

SCRIPT = str(REPO / "dev/gpu_check.py")
PREFLIGHT = {"reason": None, "cupy": True, "device_error": None, "device": "NVIDIA H200", "arch": "sm_90a",
             "driver": 13000, "python": "3.12.3", "versions": {"cupy": "14.2.0", "nvmath": "1.0.0", "torch": "2.11.0"}}


@pytest.mark.skipif(cuda_unavailable() is None, reason="a GPU is here: gpu-check would run for real")
def test_without_a_gpu_run_ends_in_one_line_and_exit_1(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, "run", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert re.fullmatch(r"error: no usable GPU backend: .+\n", result.stderr), result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["preflight.log"]  # no stage ran
    # the same through make, which adds its own line on the failed recipe
    result = subprocess.run(["make", "-s", "gpu-check", f"OUT={tmp_path / 'make_out'}", f"PYTHON={sys.executable}",
                             f"DIR={tmp_path / 'no_prep'}"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    # make names itself make[N] when a make runs it (make test, in CI)
    assert re.match(r"error: no usable GPU backend: .+\nmake(\[\d+\])?: \*\*\* \[Makefile:\d+: gpu-check\] "
                    r"Error 1\n\Z", result.stderr), result.stderr


def test_an_unknown_stage_is_one_line_and_exit_1(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, "run", str(tmp_path), "--stages", "tests,nope"],
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"error: --stages nope: not one of {', '.join(s.name for s in gc.STAGES)}\n"


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


def train_record(B, ours_tok_s, torch_tok_s, mfu, torch_mfu, ours_peak, torch_peak):
    """The fields dev/bench/train.py writes that the summary reads, as it writes them on a GPU."""
    return {"device": "NVIDIA H200, torch 2.11.0, cupy 14.2.0", "B": B, "T": 1024, "grad_accum_steps": 1,
            "tokens_per_step": B * 1024, "warmup_steps": 3, "steps_timed": 10, "ours_tok_s": ours_tok_s,
            "torch_tok_s": torch_tok_s, "ratio": round(ours_tok_s / torch_tok_s, 3),
            "ours_ms_per_step": round(1000 * B * 1024 / ours_tok_s, 2),
            "torch_ms_per_step": round(1000 * B * 1024 / torch_tok_s, 2), "mfu": mfu, "torch_mfu": torch_mfu,
            "peak_flops": 989.4e12, "ours_peak_mib": ours_peak, "torch_peak_mib": torch_peak,
            "torch_peak_reserved_mib": torch_peak + 1000.0}


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
        "kernels": [{"kernel": "layernorm_forward", "ours_ms": 0.01, "torch_ms": 0.02, "ratio_torch_over_ours": 2.0},
                    {"kernel": "attention_backward", "ours_ms": 0.5, "torch_ms": 0.3, "ratio_torch_over_ours": 0.6},
                    {"kernel": "adamw", "ours_ms": 0.1, "torch_ms": 0.1, "ratio_torch_over_ours": 1.0}]})
    write(out / "train/train_nvidia-h200_d12_b16_t1024.json",
          train_record(16, 1_234_567.8, 1_000_000.0, 0.4567, 0.37, 20480.4, 30720.0))
    write(out / "train-max/train_nvidia-h200_d12_b32_t1024.json",
          train_record(32, 1_300_000.0, 1_100_000.0, 0.481, 0.407, 38000.0, 60000.0))
    write(out / "parity/loss_parity_nvidia-h200.json", {
        "steps": 325, "ours_final_val": 4.6321, "torch_final_val": 4.6102, "rel_diff": 0.00475, "tol": 0.01,
        "passed": True, "ours_train": [10.9, 5.1, 4.5012], "torch_train": [10.9, 5.0, 4.4890]})
    run = "2026-11-29T15:00:00.000"
    stage = dict(seconds=30.0, run=run)
    write(out / "gpu_check.json", {"run": run, "preflight": PREFLIGHT, "stages": {
        "tests": dict(stage, status="timed out", timed_out=True, limit_s=140),
        "kernels": dict(stage, status="passed", limit_s=40),
        "train": dict(stage, status="passed", limit_s=60),
        "train-max": dict(stage, status="passed", limit_s=55, notes=[
            "-b 64: our trainer ran out of GPU memory at B=64, T=1024: lower -b (-d keeps the total batch)",
            "largest power-of-two B that fits: 32"]),
        "parity": dict(stage, status="passed", limit_s=85, notes=["325 steps (fitted to the train stage step times)"]),
    }})
    return out


def test_summary_reads_every_stage_record(tmp_path):
    text, passed = gc.summary(recorded_run(tmp_path))
    lines = text.splitlines()
    assert not passed and lines[-1] == "gpu-check: FAILED: tests"
    assert lines[0] == ("gpu-check on NVIDIA H200 (sm_90a, driver 13000, Python 3.12.3, cupy 14.2.0, nvmath 1.0.0, "
                        "torch 2.11.0)")
    rows = {m[0]: dict(passed=int(m[1]), failed=int(m[2]), skipped=int(m[3]))
            for m in re.findall(r"^ +(\S+) +(\d+) +(\d+) +(\d+)", text, re.M)}
    assert rows == dict(FAKE_COUNTS, all=dict(passed=5, failed=2, skipped=2))
    assert re.search(r"tests/test_gpu_fake.py .*<- skipped GPU tests fail", text)
    assert "stopped at the slot's limit during tests/test_cuda_fake.py::test_passes[two]" in text
    assert text.count("log.txt ends:") == 1 and "   log.txt ends: tests/test_cuda_fake.py::test_passes[two]" in text
    assert ("3 kernels; ours as fast as PyTorch's or faster in 2; the furthest behind: attention_backward "
            "(torch/ours 0.60); card: copy 4300.0 GB/s, bf16 matmul 788.0 TFLOP/s") in text
    assert ("B=16 T=1024: tok/s ours 1,234,568 | torch 1,000,000 | ratio 1.235; MFU ours 45.7% | torch 37.0%; "
            "peak MiB ours 20,480 | torch 30,720") in text
    assert ("B=32 T=1024: tok/s ours 1,300,000 | torch 1,100,000 | ratio 1.182; MFU ours 48.1% | torch 40.7%; "
            "peak MiB ours 38,000 | torch 60,000") in text
    assert "   largest power-of-two B that fits: 32" in text
    assert "325 steps; last step's train loss ours 4.5012 | torch 4.4890 (gap +0.0122)" in text
    assert ("final val loss ours 4.6321 | torch 4.6102: gap +0.0219, 0.47% (tolerance 1.00%): PASS") in text


def test_summary_verb_prints_it_and_exits_by_the_verdict(tmp_path):
    out = recorded_run(tmp_path)
    result = subprocess.run([sys.executable, SCRIPT, "summary", str(out)], capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == gc.summary(out)[0] + "\n"
    record = json.loads((out / "gpu_check.json").read_text())
    record["stages"]["tests"]["status"] = "passed"
    write(out / "gpu_check.json", record)
    result = subprocess.run([sys.executable, SCRIPT, "summary", str(out)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.endswith("gpu-check: PASSED (5 stages)\n")


def test_train_summary_reads_the_record_dev_bench_train_writes(tmp_path):
    """The record of a real (CPU) run of dev/bench/train.py: no MFU there, host memory."""
    result = subprocess.run([sys.executable, "dev/bench/train.py", "--device", "cpu", "-e", "d1", "-b", "2", "-t",
                             "16", "-n", "1", "-w", "0", "-o", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    record = json.loads(next(tmp_path.glob("train_*.json")).read_text())
    [line] = gc.summarise_train(tmp_path, {})
    assert line == (f"B=2 T=16: tok/s ours {record['ours_tok_s']:,.0f} | torch {record['torch_tok_s']:,.0f} | ratio "
                    f"{record['ratio']:.3f}; MFU ours n/a | torch n/a; peak MiB ours {record['ours_peak_mib']:,.0f} | "
                    f"torch {record['torch_peak_mib']:,.0f}")


# ----------------------------------------------------------------------------- pure rules

def test_the_whole_run_fits_in_7_minutes():
    """The issue's bound, so that a 15-minute lease holds a run, a fix and a rerun: a stage added
    for another check must take its time from the others."""
    assert gc.PREFLIGHT_LIMIT_S + sum(stage.limit_s for stage in gc.STAGES) <= 7 * 60
    assert all(stage.limit_s > gc.GRACE_S for stage in gc.STAGES)


def test_parity_steps_fill_their_share_of_the_slot_in_whole_val_intervals():
    fast = {"ours_ms_per_step": 40.0, "torch_ms_per_step": 60.0}  # 0.1 s a step for both
    assert gc.parity_steps(fast, 85) == int(gc.PARITY_STEP_SHARE * 85 / 0.1) // 25 * 25
    assert gc.parity_steps(fast, 85) % gc.PARITY_VAL_EVERY == 0
    slow = {"ours_ms_per_step": 400.0, "torch_ms_per_step": 600.0}
    assert gc.parity_steps(slow, 85) == gc.parity_steps(None, 85) == gc.PARITY_MIN_STEPS == 100


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


def test_bench_records_need_no_git(tmp_path, monkeypatch):
    """A copy of the tree on a GPU machine may have neither .git nor git: the records then name no commit."""
    monkeypatch.syspath_prepend(str(REPO / "dev/bench"))
    import records
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on it
    assert records.commit() == ""

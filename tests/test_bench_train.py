"""dev/bench/train.py on the CPU: tiny models through our trainer and PyTorch eager, the table printed
and a record per model written with every field the GPU run is judged on (every step's time, median,
min and max, both MFUs, memory and how it was measured, what PyTorch ran); the sides alternate, or run
one after another when they do not fit together, and say so; a run cut short leaves its record;
--device cuda without a GPU is one line. The MFU peak table matches exact device names. Beside it,
what the other benchmarks share: each runs as a file and with -m, and dev/bench/data.py takes no bad
flag (it would overwrite the committed record with nonsense)."""
import importlib.util
import json
import re
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

import train_gpt2
from kernels import cuda_unavailable

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "dev/bench/train.py"
sys.path.insert(0, str(SCRIPT.parent))  # its records.py
spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)  # "train" would be a vague module name
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
TINY = ["--device", "cpu", "-e", "d1", "-b", "2", "-t", "32", "-n", "3", "-w", "1", "--torch", "eager"]  # C=64


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cpu_run_prints_the_table_and_writes_a_record_per_model(tmp_path):
    args = [*TINY, "-e", "d1", "d2", "-d", "128", "-o", str(tmp_path)]  # grad accumulation 2: 128 tokens per step
    result = run(*args)
    assert result.returncode == 0, result.stderr
    assert "CPU comparison, all fp32" in result.stdout
    assert "\nattention: ours: kernels/reference.py (NumPy); torch: F.scaled_dot_product_attention" in result.stdout
    assert "\nmemory: host memory, each side's growth over its set-up and warm-up" in result.stdout
    for label in ("median ms", "min ms", "max ms", "tok/s", "MFU sheet", "MFU matmul", "memory MiB", "ours",
                  "torch_eager", "ours / torch_eager"):
        assert label in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_cpu_d1_b2_t32.json", "train_cpu_d2_b2_t32.json"]
    for model, layers in (("d1", 1), ("d2", 2)):
        record = json.loads((tmp_path / f"train_cpu_{model}_b2_t32.json").read_text())
        assert record["device"].startswith("CPU") and record["commit"] and record["status"] == "complete"
        assert record["command"] == "python dev/bench/train.py " + " ".join(args)
        assert (record["model"], record["B"], record["T"], record["rounds"]) == (model, 2, 32, 3)
        assert (record["grad_accum_steps"], record["tokens_per_step"]) == (2, 128)
        assert record["order"].startswith("alternating")
        assert "fp32" in record["precision"] and "scaled_dot_product_attention" in record["attention"]
        assert record["memory"].startswith("host memory") and "VmHWM" in record["memory"]
        assert record["peak_flops"] is None and record["matmul_flops"] > 1e8  # no datasheet for a CPU
        config = train_gpt2.config_from_descriptor(model)
        assert config.num_layers == layers and record["flops_per_token"] == train_gpt2.flops_per_token(config, 32)
        assert set(record["sides"]) == {"ours", "torch_eager"}
        for side in record["sides"].values():
            steps = side["step_ms"]
            assert len(steps) == 3 and len(side["warmup_ms"]) == 0 and side["first_step_s"] > 0
            assert side["median_ms"] == pytest.approx(statistics.median(steps), abs=0.01)
            assert (side["min_ms"], side["max_ms"]) == (min(steps), max(steps))
            assert side["tok_s"] == pytest.approx(128 / (side["median_ms"] / 1000), rel=1e-3)
            assert side["mfu"] is None
            assert side["mfu_of_matmul"] == pytest.approx(
                record["flops_per_token"] * side["tok_s"] / record["matmul_flops"], rel=1e-2)
            assert side["memory_mib"] is None or 0 < side["memory_mib"] < 1e5
        ratio = record["sides"]["ours"]["tok_s"] / record["sides"]["torch_eager"]["tok_s"]
        assert record["ratios"] == {"ours / torch_eager": pytest.approx(ratio, abs=1e-3)}


def test_figures_are_the_median_min_and_max_of_every_step():
    side = bench.Side("ours", "ours", None, None, figures={"step_ms": [5.0, 1.0, 3.0, 100.0], "memory_mib": 1.0})
    figures = bench.side_figures(side, tokens_per_step=1000, flops_per_token=6.0, peak=1e6, matmul=2e6)
    assert (figures["median_ms"], figures["min_ms"], figures["max_ms"]) == (4.0, 1.0, 100.0)  # not the mean, 27.25
    assert figures["tok_s"] == 250_000.0  # 1000 tokens in the median's 4 ms
    assert (figures["mfu"], figures["mfu_of_matmul"]) == (1.5, 0.75)


class FakeSides:
    """Sides whose steps only log themselves; `tight`: B does not fit while A is set up."""

    def __init__(self, tight=False):
        self.log = []
        self.a = bench.Side("a", "side A", self.build("a"), lambda: None)
        self.b = bench.Side("b", "side B", self.build("b", needs_alone=tight), lambda: None)

    def build(self, name, needs_alone=False):
        def make():
            if needs_alone and self.a.step is not None:
                raise MemoryError(f"{name} does not fit beside a")
            return lambda i: self.log.append((name, i))
        return make


def test_the_sides_alternate_the_first_one_rotating():
    fake = FakeSides()
    statuses = []
    order = bench.run_sides([fake.a, fake.b], Namespace(w=2, n=4), False, statuses.append)
    assert order.startswith("alternating")
    warmup = [("a", 0), ("a", 1), ("b", 0), ("b", 1)]  # each set up and warmed up in turn
    rounds = [("a", 2), ("b", 2), ("b", 3), ("a", 3), ("a", 4), ("b", 4), ("b", 5), ("a", 5)]
    assert fake.log == warmup + rounds
    assert [len(s.figures["step_ms"]) for s in (fake.a, fake.b)] == [4, 4]
    assert statuses[-1] == "running: 4 of 4 rounds" and fake.a.step is None and fake.b.step is None  # released


def test_sides_that_do_not_fit_together_run_one_after_another_and_say_so(capsys):
    fake = FakeSides(tight=True)
    order = bench.run_sides([fake.a, fake.b], Namespace(w=1, n=3), False, lambda status: None)
    assert order.startswith("one side after another: side B ran out of memory beside side A")
    assert capsys.readouterr().out == order + "\n"
    # a warmed up (0), then set up again alone: its warm-up and 3 steps, then b's
    assert fake.log == [("a", 0), ("a", 0), ("a", 1), ("a", 2), ("a", 3), ("b", 0), ("b", 1), ("b", 2), ("b", 3)]
    assert [len(s.figures["step_ms"]) for s in (fake.a, fake.b)] == [3, 3]


def test_a_side_that_does_not_fit_alone_is_reported():
    fake = FakeSides()
    fake.a.build = lambda: (_ for _ in ()).throw(MemoryError("too big"))
    with pytest.raises(bench.DoesNotFit) as e:
        bench.run_sides([fake.a, fake.b], Namespace(w=1, n=3), False, lambda status: None)
    assert e.value.args[0] is fake.a


def test_each_sides_memory_is_what_it_took_itself():
    """Like for like on the CPU: the growth of the resident set over each side's set-up and warm-up,
    not the process's total, nor what the side set up before it holds."""
    held = []

    def build(mib):
        def make():
            held.append(np.ones(mib * 2**20 // 8))  # written, so resident; kept, as a model is
            return lambda i: None
        return make

    a, b = bench.Side("a", "a", build(64), lambda: None), bench.Side("b", "b", build(160), lambda: None)
    for side in (a, b):
        bench.prepare(side, Namespace(w=1), False)
    if a.figures["memory_mib"] is None:
        pytest.skip("/proc/self/clear_refs cannot be written here: no host memory figures")
    assert a.figures["memory_mib"] == pytest.approx(64, abs=10)
    assert b.figures["memory_mib"] == pytest.approx(160, abs=10)


def test_a_run_cut_short_by_sigint_leaves_its_record(tmp_path):
    """What dev/gpu_check.py's slot does at its limit: SIGINT. The record written so far stays, says
    so, and holds the steps timed until then."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *TINY, "-n", "100000", "-o", str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = tmp_path / "train_cpu_d1_b2_t32.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            status = json.loads(path.read_text())["status"] if path.exists() else ""
        except json.JSONDecodeError:  # not possible with an atomic write: this would be a bug
            raise
        rounds = re.match(r"running: (\d+) of", status)
        if rounds and int(rounds.group(1)) >= 2:  # a round takes a fraction of the 0.2 s between looks
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail(f"no record of two rounds within 240 s: {proc.communicate()}")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1 and stderr == f"error: interrupted: {tmp_path}/{path.name} holds what was measured " \
                                              "until then\n", stderr
    record = json.loads(path.read_text())
    assert record["status"].startswith("interrupted (SIGINT) at: ")
    ours, theirs = record["sides"]["ours"]["step_ms"], record["sides"]["torch_eager"]["step_ms"]
    assert len(ours) >= 2 and len(theirs) >= 2 and abs(len(ours) - len(theirs)) <= 1
    assert record["sides"]["ours"]["median_ms"] == pytest.approx(statistics.median(ours), abs=0.01)


# Datasheet bf16 tensor-core figures, as NVIDIA quotes them: with sparsity, twice the dense rate.
SPARSE_BF16_TFLOPS = {"NVIDIA H100 80GB HBM3": 1979, "NVIDIA H100 PCIe": 1513, "NVIDIA H100 NVL": 1671,
                      "NVIDIA H200": 1979, "NVIDIA H200 NVL": 1671, "NVIDIA A100-SXM4-80GB": 624,
                      "NVIDIA A100-PCIE-40GB": 624}


@pytest.mark.parametrize("device", sorted(SPARSE_BF16_TFLOPS))
def test_mfu_peaks_match_the_exact_device_name(device):
    assert train_gpt2.peak_flops(device) == pytest.approx(SPARSE_BF16_TFLOPS[device] * 1e12 / 2, rel=1e-3)


@pytest.mark.parametrize("device", ["CPU", "NVIDIA GeForce RTX 4090", "NVIDIA H100", "NVIDIA H20", "H100"])
def test_an_unlisted_device_has_no_mfu_peak(device):
    assert train_gpt2.peak_flops(device) is None


@pytest.mark.parametrize("args, names", [(["-d", "100"], "-d 100"), (["-t", "2048"], "-t 2048"),
                                         (["-e", "x12"], "x12"), (["-n", "0"], "-n 0"), (["-w", "0"], "-w 0"),
                                         (["--torch", "jit"], "--torch jit")])
def test_a_bad_flag_is_one_line(args, names, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        bench.main([*TINY, *args, "-o", str(tmp_path)])
    assert exit.value.code == 1
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and names in stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(cuda_unavailable() is None, reason="a GPU is present: --device cuda runs")
def test_cuda_without_a_gpu_is_one_line(tmp_path):
    result = run("--device", "cuda", "-o", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: --device cuda")
    assert result.stdout == "" and not any(tmp_path.iterdir())


@pytest.mark.parametrize("module", ["dev.bench.train", "dev.bench.kernels", "dev.bench.data"])
def test_each_benchmark_runs_with_dash_m_as_well_as_a_file(module):
    for command in (["-m", module], [str(REPO / (module.replace(".", "/") + ".py"))]):
        result = subprocess.run([sys.executable, *command, "--help"], cwd=REPO, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0 and result.stdout.startswith("usage: "), (command, result.stderr)


def data_bench(*args, out):
    """dev/bench/data.py with its record sent to `out`, and whether the committed one was left alone."""
    committed = (REPO / "dev/bench/results/data_cpu.json").read_bytes()
    result = subprocess.run([sys.executable, str(REPO / "dev/bench/data.py"), *args, "-o", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    return result, (REPO / "dev/bench/results/data_cpu.json").read_bytes() == committed


def missing(folder):
    return folder / "missing.tar.gz", "is missing"


def not_a_tar(folder):
    (folder / "a.jsonl").write_text('{"text": "hello"}\n')
    return folder / "a.jsonl", "not a tar archive"


def no_text(folder):
    (folder / "notes.md").write_text("no .txt here\n")
    with tarfile.open(folder / "empty.tar.gz", "w:gz") as tar:
        tar.add(folder / "notes.md", arcname="notes.md")
    return folder / "empty.tar.gz", "holds no text"


@pytest.mark.parametrize("args", [["--repeat", "0"], ["--processes", "0"], ["--rounds", "0"], ["--batches", "-1"],
                                  ["--batches", "x"]], ids=" ".join)
def test_a_data_bench_count_below_1_is_one_line_and_writes_no_record(args, tmp_path):
    result, untouched = data_bench(*args, out=tmp_path / "out")
    lines = result.stderr.splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and args[0] in lines[0], \
        result.stderr
    assert result.stdout == "" and not (tmp_path / "out").exists() and untouched


@pytest.mark.parametrize("make", [missing, not_a_tar, no_text])
def test_a_data_bench_tarball_without_texts_is_one_line_and_writes_no_record(make, tmp_path):
    tarball, problem = make(tmp_path)
    result, untouched = data_bench("--tarball", str(tarball), out=tmp_path / "out")
    lines = result.stderr.splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"error: --tarball {tarball}") \
        and problem in lines[0], result.stderr
    assert result.stdout == "" and not (tmp_path / "out").exists() and untouched

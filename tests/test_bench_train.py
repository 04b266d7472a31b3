"""dev/bench/train.py on the CPU: a tiny model through both trainers, the table printed and the
record written with every field the GPU run is judged on; --device cuda without a GPU is one line.
Beside it, what the other benchmarks share: each runs as a file and with -m, and dev/bench/data.py
takes no bad flag (it would overwrite the committed record with nonsense). The MFU peak table matches
exact device names."""
import importlib.util
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import train_gpt2
from kernels import cuda_unavailable

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "dev/bench/train.py"
sys.path.insert(0, str(SCRIPT.parent))  # its records.py
spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)  # "train" would be a vague module name
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
TINY = ["--device", "cpu", "-e", "d1", "-b", "2", "-t", "32", "-n", "2", "-w", "1"]  # 1 layer, C=64


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cpu_run_prints_the_table_and_writes_the_record(tmp_path):
    args = [*TINY, "-d", "128", "-o", str(tmp_path)]  # grad accumulation 2: 128 tokens per step
    result = run(*args)
    assert result.returncode == 0, result.stderr
    assert "CPU comparison" in result.stdout
    for label in ("tok/s", "ms/step", "MFU", "peak MiB", "ours", "pytorch", "ratio"):
        assert label in result.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["train_cpu_d1_b2_t32.json"]
    record = json.loads((tmp_path / "train_cpu_d1_b2_t32.json").read_text())

    assert isinstance(record["device"], str) and record["device"].startswith("CPU")
    assert isinstance(record["commit"], str)
    assert record["command"] == "python dev/bench/train.py " + " ".join(args)
    assert (record["B"], record["T"], record["steps_timed"]) == (2, 32, 2)
    assert (record["grad_accum_steps"], record["tokens_per_step"]) == (2, 128)
    assert record["ours_tok_s"] > 0 and record["torch_tok_s"] > 0
    assert record["ratio"] == pytest.approx(record["ours_tok_s"] / record["torch_tok_s"], abs=1e-3)
    for name in ("ours", "torch"):  # tok/s counts every micro-step's tokens
        assert record[f"{name}_ms_per_step"] == pytest.approx(1000 * 128 / record[f"{name}_tok_s"], rel=1e-2)
    assert record["mfu"] is None and record["torch_mfu"] is None  # no bf16 peak for a CPU
    for name in ("ours_peak_mib", "torch_peak_mib"):  # host RSS, or null where it cannot be reset
        assert record[name] is None or 10 < record[name] < 1e6
    assert record["torch_compile"] is False and "fp32" in record["precision"]


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
                                         (["-e", "x12"], "x12"), (["-n", "0"], "-n 0")])
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

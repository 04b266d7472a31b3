"""dev/test_gpt2.py, llm.c's debug-state test as a command, on a debug state the PyTorch reference
(dev/torch_gpt2.py) writes: green as it comes, red on the one gradient tensor perturbed by 1%."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
L, NH, C, MAXT, V, VP, B, T = 2, 2, 64, 32, 50257, 50304, 2, 16
GRAD_SHAPES = {"wte": (VP, C), "wpe": (MAXT, C), "ln1w": (L, C), "ln1b": (L, C), "qkvw": (L, 3 * C, C),
               "qkvb": (L, 3 * C), "attprojw": (L, C, C), "attprojb": (L, C), "ln2w": (L, C), "ln2b": (L, C),
               "fcw": (L, 4 * C, C), "fcb": (L, 4 * C), "fcprojw": (L, C, 4 * C), "fcprojb": (L, C), "lnfw": (C,),
               "lnfb": (C,)}  # DESIGN.md's checkpoint order


def run(script, *args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    result = run("dev/torch_gpt2.py", "--depth", str(L), "--heads", str(NH), "--channels", str(C), "--max-seq-len",
                 str(MAXT), "-b", str(B), "-t", str(T), "--steps", "10", "--lr", "1e-3", "--weight-decay", "0.1",
                 "--model-out", str(d / "model.bin"), "--state-out", str(d / "state.bin"))
    assert result.returncode == 0, result.stderr
    torch_losses = [float(line.split()[-1]) for line in result.stdout.splitlines() if line.startswith("step")]
    return d, torch_losses


def test_our_model_passes_on_the_references_debug_state(reference):
    d, torch_losses = reference
    result = run("dev/test_gpt2.py", "-e", str(d / "model.bin"), "-s", str(d / "state.bin"), "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("OK ") and ": max_diff" in line] == \
        [f"OK {name}" for name in GRAD_SHAPES]
    assert any(line.startswith("OK (LOGITS)") for line in lines) and any(line.startswith("OK (LOSS)") for line in lines)
    steps = [line for line in lines if " step " in f" {line}"]
    assert len(steps) == 10 and all(line.startswith("OK step") for line in steps)
    # the reference's losses beside ours are the ones PyTorch printed
    assert [float(line.split("reference ")[1].split()[0]) for line in steps] == pytest.approx(torch_losses, abs=1e-6)
    assert torch_losses[-1] < torch_losses[0] - 0.5  # the steps moved the model
    assert lines[-1] == "overall okay: 1" and "NOT OK" not in result.stdout


@pytest.mark.parametrize("tensor", ["fcw", "ln2b"])
def test_one_gradient_tensor_off_by_one_percent_is_not_ok_and_fails(reference, tmp_path, tensor):
    d, _ = reference
    state = bytearray((d / "state.bin").read_bytes())
    grads_at = 1024 + 4 * (2 * B * T + B * T * V + 1)  # header, x, y, logits, loss
    offset = grads_at + 4 * sum(math.prod(s) for s in list(GRAD_SHAPES.values())[:list(GRAD_SHAPES).index(tensor)])
    n = math.prod(GRAD_SHAPES[tensor])
    grads = np.frombuffer(state, dtype="<f4", count=n, offset=offset).copy()
    state[offset:offset + 4 * n] = (grads * np.float32(1.01)).astype("<f4").tobytes()
    (tmp_path / "state.bin").write_bytes(bytes(state))
    result = run("dev/test_gpt2.py", "-e", str(d / "model.bin"), "-s", str(tmp_path / "state.bin"), "--device", "cpu")
    assert result.returncode == 1
    not_ok = [line for line in result.stdout.splitlines() if line.startswith("NOT OK")]
    assert len(not_ok) == 1 and not_ok[0].startswith(f"NOT OK {tensor}:"), result.stdout
    assert result.stdout.splitlines()[-1] == "overall okay: 0"


def test_missing_or_mismatched_files_are_one_line(reference, tmp_path):
    d, _ = reference
    for args, expected in [(["-e", str(tmp_path / "none.bin"), "-s", str(d / "state.bin")], "none.bin"),
                           (["-e", str(d / "model.bin"), "-s", str(tmp_path / "none.bin")], "none.bin"),
                           (["-e", str(d / "model.bin"), "-s", str(d / "model.bin")], "model.bin")]:
        result = run("dev/test_gpt2.py", *args, "--device", "cpu", cwd=tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and expected in lines[0], result.stderr
        assert result.stdout == ""


def test_the_reference_started_from_a_model_file_writes_the_same_debug_state(reference, tmp_path):
    """dev/torch_gpt2.py --model-in (how the state for OpenAI's weights is made) loads the file exactly:
    the same tokens through the same weights give the same bytes."""
    d, _ = reference
    result = run("dev/torch_gpt2.py", "--model-in", str(d / "model.bin"), "-b", str(B), "-t", str(T), "--steps",
                 "10", "--lr", "1e-3", "--weight-decay", "0.1", "--state-out", str(tmp_path / "state.bin"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "state.bin").read_bytes() == (d / "state.bin").read_bytes()

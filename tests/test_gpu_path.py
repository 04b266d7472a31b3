"""train_gpt2.py's GPU path: bf16 parameters, gradients and activations, fp32 master weights,
version 5 checkpoints, resume, recompute (-r) and GELU fusion (-ge), against the PyTorch reference.

Every test runs on three backends: the CUDA kernels on a GPU (GPT-2 124M, marked gpu, skipped
without one); the same kernels and kernels/cuda.py on the emulated device, in CI (a 2-layer model,
d2: every line of the GPU path but the device's own); and tests/bf16_twins.py, the CUDA backend's
interface over the NumPy twins rounding to bf16 where the kernels store (a 4-layer model). The bars
are llm.c's for its bf16 build (test_gpt2.cu): logits within 25, the loss within 0.05, each gradient
element within thr + 0.079 |torch| with a threshold per tensor, ten AdamW steps within 0.05 of
PyTorch's fp32 losses. We add tighter bars of our own on the logits and on each gradient tensor as a
whole (LOGITS_REL_ERR, GRAD_REL_ERR): llm.c's absolute ones cannot fail for a fresh model, whose
gradients are ~1e-3. The bars live in dev/llmc_thresholds.py, which dev/test_gpt2.py reads too."""
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import train_gpt2 as gpt
from cuda_testing import backend, requires_gpu
from fileformats import num_parameters, param_shapes, read_model, read_state
from pytorch_case import pytorch_case

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dev"))
import torch_gpt2 as ref  # noqa: E402
from llmc_thresholds import (GRAD_REL_ERR, LLMC_BF16_EPS, LLMC_GRAD_THRESHOLDS, LLMC_LOGITS_ATOL,  # noqa: E402
                             LLMC_LOSS_ATOL, LLMC_STEP_LOSS_ATOL, LOGITS_REL_ERR)

B, T = 4, 64
ADAMW_STEPS, ADAMW_LR, ADAMW_WD = 10, 1e-4, 0.1  # llm.c's test steps at lr 1e-4; decay on, to cover its groups

BACKENDS = [pytest.param("bf16_twins", id="bf16-twins"), pytest.param("emulated", id="emulated"),
            pytest.param("gpu", id="gpu", marks=requires_gpu)]
MODELS = {"bf16_twins": dict(num_layers=4, num_heads=4, channels=256),  # {}: d12, GPT-2 124M
          "emulated": dict(num_layers=2, num_heads=2, channels=128), "gpu": {}}
# (-r, -ge): llm.c's default on Hopper, everything stored and unfused, and the rest of the corners
VARIANTS = [(1, 2), (0, 0), (2, 1)]


@pytest.fixture(scope="module", params=BACKENDS)
def device(request):
    return request.param


@pytest.fixture(scope="module")
def K(device):
    if device == "bf16_twins":
        import bf16_twins
        return bf16_twins
    return backend(device)


@pytest.fixture(scope="module")
def case(device, tmp_path_factory):
    """The PyTorch reference's model file, debug state (random init, B=4, T=64) and ten losses."""
    return pytorch_case(ref.Config(**MODELS[device]), B, T, tmp_path_factory.mktemp(device), ADAMW_STEPS,
                        ADAMW_LR, ADAMW_WD)


def model_for(K, case, recompute=1, gelu_fusion=2, master_weights=True):
    return gpt.GPT2(case["config"], case["params"], B, T, K, recompute, gelu_fusion, master_weights)


@pytest.mark.parametrize("recompute,gelu_fusion", VARIANTS)
def test_logits_and_loss_meet_llmc_bf16_bar(K, case, recompute, gelu_fusion):
    model, debug = model_for(K, case, recompute, gelu_fusion), case["debug"]
    gpt.forward(model, debug.x)
    logits = K.download(model.acts["logits"])[..., :case["config"].vocab_size]
    assert np.abs(logits - debug.logits).max() <= LLMC_LOGITS_ATOL
    assert np.linalg.norm(logits - debug.logits) <= LOGITS_REL_ERR * np.linalg.norm(debug.logits)
    assert abs(float(gpt.backward(model, debug.y)) - debug.loss) <= LLMC_LOSS_ATOL


@pytest.mark.parametrize("recompute,gelu_fusion", VARIANTS)
def test_every_gradient_tensor_meets_llmc_thresholds(K, case, recompute, gelu_fusion):
    model, debug = model_for(K, case, recompute, gelu_fusion), case["debug"]
    gpt.forward(model, debug.x)
    gpt.backward(model, debug.y)
    shapes = param_shapes(case["config"])
    ours, theirs = gpt.carve(K.download(model.grads_memory), shapes), gpt.carve(debug.grads, shapes)
    excess = {name: float(np.max(np.abs(ours[name] - theirs[name]) - LLMC_BF16_EPS * np.abs(theirs[name])
                                 - LLMC_GRAD_THRESHOLDS[name])) for name in shapes}
    assert len(excess) == 16 and max(excess.values()) <= 0, excess
    relative = {name: float(np.linalg.norm(ours[name] - theirs[name]) / np.linalg.norm(theirs[name]))
                for name in shapes}
    assert max(relative.values()) <= GRAD_REL_ERR, relative


def test_gradient_accumulation_adds_micro_steps(K, case):
    """Two micro-steps at grad_accum_steps=2 over the same batch give one full step's gradient. Each
    computes exactly half of it (dloss halves, a power of two), so the only difference is the bf16
    rounding of the first half's sum before the second is added: up to one bf16 step, 2^-8 of each
    element; a wrong dloss would be off by the gradient's own size."""
    model, debug = model_for(K, case), case["debug"]
    gpt.forward(model, debug.x)
    gpt.backward(model, debug.y)
    once = gpt.carve(K.download(model.grads_memory), param_shapes(case["config"]))
    gpt.zero_grad(model)
    for _ in range(2):
        gpt.forward(model, debug.x)
        gpt.backward(model, debug.y, grad_accum_steps=2)
    twice = gpt.carve(K.download(model.grads_memory), param_shapes(case["config"]))
    for name in once:
        assert np.linalg.norm(twice[name] - once[name]) <= 2.0**-8 * np.linalg.norm(once[name]), name


def train_steps(K, case, steps, master_weights=True):
    model, debug = model_for(K, case, master_weights=master_weights), case["debug"]
    losses = []
    for step in range(steps):
        gpt.zero_grad(model)
        gpt.forward(model, debug.x)
        losses.append(float(gpt.backward(model, debug.y)))
        norm = gpt.grad_norm(model)
        gpt.update(model, ADAMW_LR, ADAMW_WD, step, K.clip_scale(norm, gpt.GRAD_CLIP), seed=1000 + step)
    return model, losses


@pytest.mark.parametrize("master_weights", [True, False], ids=["master", "no-master"])
def test_ten_adamw_steps_stay_within_llmc_bar_of_pytorch(K, case, master_weights):
    model, losses = train_steps(K, case, ADAMW_STEPS, master_weights)
    assert (model.master_weights is not None) == master_weights
    np.testing.assert_allclose(losses, case["torch_losses"], rtol=0, atol=LLMC_STEP_LOSS_ATOL)
    assert losses[-1] < losses[0] - 0.5  # the steps really moved the model


def test_two_runs_are_bit_identical(K, case):
    runs = [train_steps(K, case, 3) for _ in range(2)]
    assert runs[0][1] == runs[1][1]
    for buffer in ("params_memory", "grads_memory", "m_memory", "v_memory", "master_weights"):
        np.testing.assert_array_equal(K.download(getattr(runs[0][0], buffer)), K.download(getattr(runs[1][0], buffer)))


def test_memory_is_bf16_where_llmc_keeps_bf16(K, case):
    model = model_for(K, case)
    n = num_parameters(case["config"])
    assert model.params_memory.nbytes == model.grads_memory.nbytes == 2 * n
    assert model.m_memory.nbytes == model.v_memory.nbytes == model.master_weights.nbytes == 4 * n
    assert model.acts["qkv"].dtype == model.acts["logits"].dtype == K.FLOAT
    assert model.acts["att_lse"].dtype == np.float32
    np.testing.assert_array_equal(K.download(model.master_weights), case["params"])  # the fp32 values, not rounded


# ----------------------------------------------------------------------------- the trainer end to end

TINY = ["-e", "d1", "-b", "2", "-t", "32", "-s", "0", "-d", "128", "-x", "12", "-v", "4", "-m", "2", "-n", "6",
        "-l", "1e-3", "-u", "3", "-q", "0.1", "-c", "0.1"]


def train(K, monkeypatch, capsys, *args):
    """train_gpt2.main on backend K (its one choice of backend, replaced); returns stdout."""
    monkeypatch.setattr(gpt, "select_backend", lambda device, local_rank=0: K)
    capsys.readouterr()
    gpt.main(list(args))
    return capsys.readouterr().out


def loss_lines(stdout):
    """The step and val lines without their timings."""
    return [line.split(" ms |")[0].rsplit("|", 1)[0] for line in stdout.splitlines()
            if line.startswith(("step", "val loss"))]


@pytest.mark.parametrize("w", ["1", "0"])
def test_resume_is_bit_exact_and_checkpoints_are_bf16_with_master_weights(K, data, tmp_path, monkeypatch, capsys, w):
    straight = train(K, monkeypatch, capsys, *TINY, *data, "-w", w, "-o", str(tmp_path / "a"))
    train(K, monkeypatch, capsys, *TINY, *data, "-w", w, "-o", str(tmp_path / "b"))
    for name in ("model_00000012.bin", "state_00000012_00000.bin", "DONE_00000012"):  # as if stopped after 6
        (tmp_path / "b" / name).unlink()
    resumed = train(K, monkeypatch, capsys, *TINY, *data, "-w", w, "-o", str(tmp_path / "b"), "-y", "1")
    assert "at step 6" in resumed
    first = loss_lines(straight).index(next(line for line in loss_lines(straight) if line.startswith("step    7/12")))
    assert loss_lines(resumed) == loss_lines(straight)[first:]  # no val loss at step 6 (-v 4)
    for name in ("model_00000012.bin", "state_00000012_00000.bin", "main.log"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    header = np.fromfile(tmp_path / "a" / "model_00000012.bin", dtype="<i4", count=2)
    assert header.tolist() == [20240326, 5]  # llm.c's bf16 checkpoint
    config, params = read_model(tmp_path / "a" / "model_00000012.bin")
    state = read_state(tmp_path / "a" / "state_00000012_00000.bin", num_parameters(config))
    assert state.use_master_weights == (w == "1")
    if w == "1":  # the master weights are fp32 values the bf16 parameters are roundings of
        assert not np.array_equal(state.master, state.master.astype(params.dtype).astype(np.float32))
        assert np.abs(state.master - params.astype(np.float32)).max() <= 2 ** -7 * np.abs(state.master).max()


def test_banner_names_the_backend_precision_and_memory(K, data, tmp_path, monkeypatch, capsys):
    out = train(K, monkeypatch, capsys, *TINY, *data, "-x", "1", "-n", "0", "-r", "2", "-ge", "0")
    assert f"on {K.DEVICE} (bf16, fp32 master weights) | recompute -r 2 | GELU fusion -ge 0" in out
    n = num_parameters(gpt.config_from_descriptor("d1"))
    sizes = dict(re.findall(r"(parameters|gradients|AdamW m\+v|master weights) ([\d.]+) MiB", out))
    assert sizes == {"parameters": f"{2 * n / 2**20:.1f}", "gradients": f"{2 * n / 2**20:.1f}",
                     "AdamW m+v": f"{8 * n / 2**20:.1f}", "master weights": f"{4 * n / 2**20:.1f}"}

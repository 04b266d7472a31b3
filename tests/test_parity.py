"""The NumPy GPT-2 (train_gpt2.py over kernels/reference.py) against the PyTorch reference in dev/.

For each config the reference writes a model file and a debug state (inputs, logits, loss, every
gradient), as llm.c's test does; train_gpt2.py loads the model, runs forward and backward on the
same batch and must reproduce all of it, then ten AdamW steps must give the reference's losses."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt2 as gpt
from fileformats import param_shapes
from kernels import reference as K
from pytorch_case import pytorch_case

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dev"))
import torch_gpt2 as ref  # noqa: E402

ADAMW_STEPS, ADAMW_LR, ADAMW_WD = 10, 1e-3, 0.1

CONFIGS = {
    # two layers and two heads at T = maxT
    "L2-NH2-C128-T64": dict(layers=2, heads=2, channels=128, max_seq_len=64, B=4, T=64),
    # three layers, head size 32, a T that is no multiple of 64 and below the model's maxT
    "L3-NH3-C96-T37": dict(layers=3, heads=3, channels=96, max_seq_len=48, B=3, T=37),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    """The reference's files and ten-step losses for one config, and our model loaded from its file."""
    c = CONFIGS[request.param]
    config = ref.Config(num_layers=c["layers"], num_heads=c["heads"], channels=c["channels"],
                        max_seq_len=c["max_seq_len"])
    case = pytorch_case(config, c["B"], c["T"], tmp_path_factory.mktemp(request.param), ADAMW_STEPS, ADAMW_LR,
                        ADAMW_WD)
    ref.write_model(case["dir"] / "model_bf16.bin", case["torch_model"], version=5)
    return dict(case, B=c["B"], T=c["T"])


def fresh_model(case):
    return gpt.GPT2(case["config"], case["params"].copy(), case["B"], case["T"])


def rel_err(ours, theirs):
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def test_logits_and_loss_match_pytorch(case):
    model, debug = fresh_model(case), case["debug"]
    gpt.forward(model, debug.x)
    logits = model.acts["logits"][..., :case["config"].vocab_size]
    # every logit within 1e-5 of the largest logit's magnitude
    assert np.max(np.abs(logits - debug.logits)) <= 1e-5 * np.max(np.abs(debug.logits))
    loss = gpt.backward(model, debug.y)
    assert abs(loss - debug.loss) <= 1e-5 * debug.loss


def test_every_gradient_tensor_matches_pytorch(case):
    model, debug = fresh_model(case), case["debug"]
    gpt.forward(model, debug.x)
    gpt.backward(model, debug.y)
    ours = gpt.carve(model.grads_memory, param_shapes(case["config"]))
    theirs = gpt.carve(debug.grads, param_shapes(case["config"]))
    errors = {name: rel_err(ours[name], theirs[name]) for name in ours}
    assert len(errors) == 16
    assert max(errors.values()) <= 1e-4, errors


def test_ten_adamw_steps_match_pytorch_losses(case):
    model, debug = fresh_model(case), case["debug"]
    losses = []
    for step in range(ADAMW_STEPS):
        gpt.zero_grad(model)
        gpt.forward(model, debug.x)
        losses.append(gpt.backward(model, debug.y))
        gpt.update(model, ADAMW_LR, ADAMW_WD, step, K.clip_scale(gpt.grad_norm(model), gpt.GRAD_CLIP), seed=0)
    np.testing.assert_allclose(losses, case["torch_losses"], rtol=0, atol=1e-5)
    assert losses[-1] < losses[0] - 0.5  # the steps really moved the model


def test_gradient_accumulation_adds_micro_steps(case):
    """Two micro-steps at grad_accum_steps=2 over the same batch give one full step's gradient."""
    model, debug = fresh_model(case), case["debug"]
    gpt.forward(model, debug.x)
    gpt.backward(model, debug.y)
    once = model.grads_memory.copy()
    gpt.zero_grad(model)
    for _ in range(2):
        gpt.forward(model, debug.x)
        gpt.backward(model, debug.y, grad_accum_steps=2)
    np.testing.assert_allclose(model.grads_memory, once, rtol=1e-5, atol=1e-9)


def test_recompute_and_gelu_fusion_save_memory_and_change_no_bit(case):
    """-r 1 keeps one layer's GELU output instead of L, -r 2 one layer's layernorm outputs too; -ge
    fuses GELU into the matmuls. On the CPU each recomputation repeats the forward's arithmetic, so
    losses, gradients and updated parameters are equal to the bit across all nine settings."""
    config, (B, T) = case["config"], (case["B"], case["T"])
    debug, L, C = case["debug"], config.num_layers, config.channels
    results, sizes = {}, {}
    for recompute in (0, 1, 2):
        for gelu_fusion in (0, 1, 2):
            model = gpt.GPT2(config, case["params"], B, T, K, recompute, gelu_fusion)
            losses = []
            for step in range(2):
                gpt.zero_grad(model)
                gpt.forward(model, debug.x)
                losses.append(gpt.backward(model, debug.y))
                gpt.update(model, ADAMW_LR, ADAMW_WD, step, K.clip_scale(gpt.grad_norm(model), gpt.GRAD_CLIP), 0)
            results[recompute, gelu_fusion] = (losses, model.grads_memory.copy(), model.params_memory.copy())
            sizes[recompute] = model.acts_memory.nbytes
    for losses, grads, params in results.values():
        assert losses == results[0, 0][0]
        np.testing.assert_array_equal(grads, results[0, 0][1])
        np.testing.assert_array_equal(params, results[0, 0][2])
    slack = 2 * gpt.ACTIVATION_ALIGN  # each buffer is rounded up to the alignment
    assert abs(sizes[0] - sizes[1] - 4 * (L - 1) * B * T * 4 * C) <= slack
    assert abs(sizes[1] - sizes[2] - 4 * 2 * (L - 1) * B * T * C) <= 2 * slack


def test_fresh_init_is_the_pytorch_reference_init(case):
    """init_params replays torch's mt19937 + normal_ stream in llm.c's order: the same weights up
    to the last bits of float32 log/sin/cos, which torch takes from Sleef (a few ulps, 1e-8 here);
    a wrong stream or order would differ by the weights' own size (0.02)."""
    ours = gpt.init_params(case["config"], seed=42)
    np.testing.assert_allclose(ours, case["params"], rtol=0, atol=1e-7)
    assert not np.array_equal(gpt.init_params(case["config"], seed=43), ours)


def test_bf16_checkpoint_loads_as_the_reference_bf16_values(case):
    config, params = gpt.load_params(case["dir"] / "model_bf16.bin")
    assert config == case["config"]
    expected = torch.from_numpy(case["params"]).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(params, expected)


def test_saved_model_reloads_bit_exact(case, tmp_path):
    model = fresh_model(case)
    gpt.save_model(model, tmp_path / "model.bin")
    config, params = gpt.load_params(tmp_path / "model.bin")
    assert config == case["config"]
    np.testing.assert_array_equal(params, model.params_memory)


@pytest.mark.parametrize("descriptor,layers,channels,heads", [
    ("d12", 12, 768, 12), ("gpt2:d24", 24, 1024, 16), ("d36", 36, 1280, 20), ("d48", 48, 1600, 25),
    ("d6", 6, 384, 6), ("d2", 2, 128, 2), ("d5", 5, 320, 5)])
def test_descriptors_follow_llmc(descriptor, layers, channels, heads):
    config = gpt.config_from_descriptor(descriptor)
    assert (config.num_layers, config.channels, config.num_heads) == (layers, channels, heads)
    assert (config.max_seq_len, config.vocab_size, config.padded_vocab_size) == (1024, 50257, 50304)

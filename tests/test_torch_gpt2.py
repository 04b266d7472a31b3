"""Specification of dev/torch_gpt2.py, the PyTorch reference the NumPy model is checked against.

Every expected value here is computed independently of the module: file layouts are
parsed with numpy from DESIGN.md's description, init streams and AdamW are redone by hand.
"""
import copy
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

DEV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dev")
sys.path.insert(0, DEV)
import torch_gpt2 as tg  # noqa: E402

L, NH, C, MAXT, V, VP = 2, 2, 128, 32, 50257, 50304
B, T = 2, 16
CFG = tg.Config(num_layers=L, num_heads=NH, channels=C, max_seq_len=MAXT, vocab_size=V, padded_vocab_size=VP)


def llmc_layout():
    """(name, shape) of llm.c's 16 checkpoint tensors, in file order (DESIGN.md section 4)."""
    return [("wte", (VP, C)), ("wpe", (MAXT, C)), ("ln1w", (L, C)), ("ln1b", (L, C)),
            ("qkvw", (L, 3 * C, C)), ("qkvb", (L, 3 * C)), ("attprojw", (L, C, C)), ("attprojb", (L, C)),
            ("ln2w", (L, C)), ("ln2b", (L, C)), ("fcw", (L, 4 * C, C)), ("fcb", (L, 4 * C)),
            ("fcprojw", (L, C, 4 * C)), ("fcprojb", (L, C)), ("lnfw", (C,)), ("lnfb", (C,))]


def unpack(flat):
    out, offset = {}, 0
    for name, shape in llmc_layout():
        n = math.prod(shape)
        out[name] = flat[offset:offset + n].reshape(shape)
        offset += n
    assert offset == flat.size, f"flat vector has {flat.size} values, layout needs {offset}"
    return out


def stacked(model, attr, grad=False):
    """Per-layer tensor named by dotted attr, stacked over layers, straight from the modules."""
    tensors = []
    for block in model.blocks:
        t = block
        for part in attr.split("."):
            t = getattr(t, part)
        tensors.append((t.grad if grad else t).detach().numpy())
    return np.stack(tensors)


def small_model(seed=42):
    return tg.init_llmc(tg.GPT2(CFG), seed)


def batch(seed=1):
    tokens = torch.randint(0, V, (B * T + 1,), generator=torch.Generator().manual_seed(seed))
    return tokens[:-1].view(B, T), tokens[1:].view(B, T)


# ---------------------------------------------------------------- from_hf

def test_from_hf_logits_equal_transformers_logits(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)  # only HF's own random init uses it; the check is the equality
    hf = GPT2LMHeadModel(GPT2Config(n_layer=L, n_head=NH, n_embd=C, n_positions=MAXT, vocab_size=V,
                                    activation_function="gelu_new", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    hf.eval()
    hf.save_pretrained(tmp_path)
    model = tg.from_hf(str(tmp_path))
    assert model.config == CFG
    x, _ = batch()
    with torch.no_grad():
        expected = hf(x).logits
        logits, loss = model(x)
    assert loss is None
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- init_llmc

def test_init_llmc_layernorm_weights_are_one_and_all_biases_zero():
    model = small_model()
    layernorms = [model.ln_f] + [m for b in model.blocks for m in (b.ln_1, b.ln_2)]
    for ln in layernorms:
        assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    assert len(biases) == 4 * L + 2 * L + 1  # 4 Linear + 2 LayerNorm per layer, plus ln_f
    assert all(torch.all(b == 0) for b in biases)


def test_init_llmc_stds_are_0_02_and_residual_projections_scaled():
    model = small_model()
    residual = 0.02 / math.sqrt(2 * L)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.01)
    for block in model.blocks:
        assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.02)
        assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.02)
        assert block.attn.c_proj.weight.std().item() == pytest.approx(residual, rel=0.03)
        assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual, rel=0.03)


def test_init_llmc_same_seed_same_weights_other_seed_differs():
    a, b, c = small_model(42), small_model(42), small_model(43)
    assert np.array_equal(tg.llmc_flat(a), tg.llmc_flat(b))
    assert not np.array_equal(tg.llmc_flat(a)[:V * C], tg.llmc_flat(c)[:V * C])


def test_init_llmc_draws_one_stream_in_llmc_order():
    model = small_model(42)
    g = torch.Generator().manual_seed(42)
    first = torch.empty(V * C).normal_(0, 0.02, generator=g)[:16]
    assert torch.equal(model.wte.weight.flatten()[:16], first)
    # Replay the whole stream: wte, wpe, then per layer qkv, attn proj, fc, fc proj.
    g = torch.Generator().manual_seed(42)
    residual = 0.02 / math.sqrt(2 * L)
    expected = [(model.wte.weight, 0.02), (model.wpe.weight, 0.02)]
    for block in model.blocks:
        expected += [(block.attn.c_attn.weight, 0.02), (block.attn.c_proj.weight, residual),
                     (block.mlp.c_fc.weight, 0.02), (block.mlp.c_proj.weight, residual)]
    for param, std in expected:
        assert torch.equal(param, torch.empty(param.shape).normal_(0, std, generator=g))


# ---------------------------------------------------------------- write_model

def read_model_file(path):
    header = np.fromfile(path, dtype="<i4", count=256)
    dtype = {3: "<f4", 5: "<u2"}[int(header[1])]
    return header, np.fromfile(path, dtype=dtype, offset=1024)


def test_write_model_v3_header_size_and_layout(tmp_path):
    model = small_model()
    path = tmp_path / "model.bin"
    tg.write_model(str(path), model, version=3)
    header, data = read_model_file(path)
    assert list(header[:8]) == [20240326, 3, MAXT, V, L, NH, C, VP]
    assert not header[8:].any()
    n_params = sum(math.prod(s) for _, s in llmc_layout())
    assert os.path.getsize(path) == 1024 + 4 * n_params
    w = unpack(data)
    assert not w["wte"][V:].any()  # padding rows
    np.testing.assert_array_equal(w["wte"][:V], model.wte.weight.detach().numpy())
    np.testing.assert_array_equal(w["wpe"], model.wpe.weight.detach().numpy())
    np.testing.assert_array_equal(w["qkvw"], stacked(model, "attn.c_attn.weight"))
    np.testing.assert_array_equal(w["fcprojw"], stacked(model, "mlp.c_proj.weight"))
    np.testing.assert_array_equal(w["lnfw"], model.ln_f.weight.detach().numpy())
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]  # the temp file was renamed away


def test_write_model_v5_is_bf16_of_the_v3_values(tmp_path):
    model = small_model()
    tg.write_model(str(tmp_path / "v3.bin"), model, version=3)
    tg.write_model(str(tmp_path / "v5.bin"), model, version=5)
    h3, fp32 = read_model_file(tmp_path / "v3.bin")
    h5, bf16_bits = read_model_file(tmp_path / "v5.bin")
    assert h5[1] == 5 and np.array_equal(np.delete(h3, 1), np.delete(h5, 1))
    assert os.path.getsize(tmp_path / "v5.bin") == 1024 + 2 * fp32.size
    expected = torch.from_numpy(fp32).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bf16_bits, expected)


# ---------------------------------------------------------------- write_debug_state

def test_write_debug_state_holds_inputs_logits_loss_and_grads_in_llmc_order(tmp_path):
    model = small_model()
    x, y = batch()
    reference = copy.deepcopy(model)
    model(x, y)[1].backward()  # stale grads from an earlier backward must not leak into the file
    path = tmp_path / "state.bin"
    logits, loss = tg.write_debug_state(str(path), model, x, y)
    expected_logits, expected_loss = reference(x, y)
    expected_loss.backward()

    raw = np.fromfile(path, dtype="<i4")
    assert list(raw[:4]) == [20240327, 2, B, T] and not raw[4:256].any()
    np.testing.assert_array_equal(raw[256:256 + B * T], x.flatten().numpy())
    np.testing.assert_array_equal(raw[256 + B * T:256 + 2 * B * T], y.flatten().numpy())
    floats = raw[256 + 2 * B * T:].view("<f4")
    file_logits, file_loss, file_grads = floats[:B * T * V], floats[B * T * V], floats[B * T * V + 1:]

    np.testing.assert_allclose(file_logits, expected_logits.detach().numpy().ravel(), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(file_logits, logits.ravel())
    cross_entropy = F.cross_entropy(expected_logits.view(-1, V), y.flatten()).item()
    assert file_loss == pytest.approx(cross_entropy, abs=1e-6) and file_loss == pytest.approx(loss, abs=0)

    np.testing.assert_array_equal(file_grads, tg.llmc_flat(model, grads=True))
    g = unpack(file_grads)
    assert not g["wte"][V:].any()
    close = dict(atol=1e-8, rtol=1e-5)
    np.testing.assert_allclose(g["wte"][:V], reference.wte.weight.grad.numpy(), **close)
    np.testing.assert_allclose(g["qkvw"], stacked(reference, "attn.c_attn.weight", grad=True), **close)
    np.testing.assert_allclose(g["fcb"], stacked(reference, "mlp.c_fc.bias", grad=True), **close)
    np.testing.assert_allclose(g["ln2w"], stacked(reference, "ln_2.weight", grad=True), **close)
    np.testing.assert_allclose(g["lnfb"], reference.ln_f.bias.grad.numpy(), **close)
    assert np.abs(g["qkvw"]).sum() > 0  # a layout test on all-zero grads would prove nothing


# ---------------------------------------------------------------- adamw_losses

def test_adamw_losses_decrease_over_ten_steps_on_one_batch():
    x, y = batch()
    losses = tg.adamw_losses(small_model(), x, y, steps=10, lr=1e-3, weight_decay=0.0)
    assert len(losses) == 10
    assert all(b < a for a, b in zip(losses, losses[1:]))
    assert losses[-1] < losses[0] - 1.0


def hand_adamw(model, x, y, steps, lr, weight_decay, b1=0.9, b2=0.95, eps=1e-8):
    """llm.c's update written out: clip by 1/norm when norm > 1, AdamW with bias correction, decay on 2-D only."""
    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        model.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        with torch.no_grad():
            norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params))
            scale = 1.0 / norm if norm > 1.0 else 1.0
            for p, mi, vi in zip(params, m, v):
                g = p.grad * scale
                mi.mul_(b1).add_((1 - b1) * g)
                vi.mul_(b2).add_((1 - b2) * g * g)
                m_hat, v_hat = mi / (1 - b1 ** t), vi / (1 - b2 ** t)
                decay = weight_decay if p.dim() >= 2 else 0.0
                p.sub_(lr * (m_hat / (v_hat.sqrt() + eps) + decay * p))


@pytest.mark.parametrize("steps", [1, 2])  # at step 1 Adam is almost sign(g); step 2 also sees the clip scale
def test_adamw_losses_update_equals_hand_written_adamw(steps):
    x, y = batch()
    model = small_model()
    reference = copy.deepcopy(model)
    tg.adamw_losses(model, x, y, steps=steps, lr=1e-3, weight_decay=0.1)
    hand_adamw(reference, x, y, steps=steps, lr=1e-3, weight_decay=0.1)
    for name in ["blocks.0.attn.c_attn.weight", "blocks.1.mlp.c_fc.bias", "wte.weight", "ln_f.weight"]:
        got, want = model.get_parameter(name), reference.get_parameter(name)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=name)


def test_adamw_losses_are_measured_before_each_update():
    x, y = batch()
    model = small_model()
    with torch.no_grad():
        _, loss0 = copy.deepcopy(model)(x, y)
    losses = tg.adamw_losses(model, x, y, steps=2, lr=1e-3, weight_decay=0.0)
    assert losses[0] == pytest.approx(loss0.item(), abs=1e-6)
    assert losses[1] < losses[0]


# ---------------------------------------------------------------- main()

def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(DEV, "torch_gpt2.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def write_shard(path, tokens, magic=20240520):
    header = np.zeros(256, dtype="<i4")
    header[:3] = [magic, 1, len(tokens)]
    with open(path, "wb") as f:
        f.write(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


TINY = ["--depth", 2, "--channels", 32, "--heads", 2, "--max-seq-len", 16, "-b", 2, "-t", 8]


def test_cli_writes_files_from_a_shard_and_prints_a_line_per_step(tmp_path):
    tokens = np.arange(100) * 97 % V
    write_shard(tmp_path / "shard.bin", tokens)
    out = {k: tmp_path / f"{k}.bin" for k in ("model", "bf16", "state")}
    result = run_cli(*TINY, "--tokens", tmp_path / "shard.bin", "--model-out", out["model"],
                     "--model-out-bf16", out["bf16"], "--state-out", out["state"], "--steps", 3, "--lr", 1e-3)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith(f"step {i}: loss ") for i, line in enumerate(lines, 1))
    # wte (Vp, C) + wpe (maxT, C) + L * (12 C^2 weights + 13 C biases and LN) + lnf (2 C), with C=32, L=2, maxT=16
    n_params = VP * 32 + 16 * 32 + 2 * (12 * 32 * 32 + 13 * 32) + 2 * 32
    assert os.path.getsize(out["model"]) == 1024 + 4 * n_params
    assert os.path.getsize(out["bf16"]) == 1024 + 2 * n_params
    state = np.fromfile(out["state"], dtype="<i4")
    assert list(state[:4]) == [20240327, 2, 2, 8]
    np.testing.assert_array_equal(state[256:256 + 16], tokens[:16])       # x
    np.testing.assert_array_equal(state[256 + 16:256 + 32], tokens[1:17])  # y
    assert state.size == 256 + 32 + 16 * V + 1 + n_params


@pytest.mark.parametrize("case", ["seq_len_too_long", "bad_shard_magic", "too_few_tokens"])
def test_cli_bad_input_is_one_stderr_line_and_exit_1(tmp_path, case):
    shard = tmp_path / "shard.bin"
    if case == "seq_len_too_long":
        args = [*TINY, "-t", 64]
    elif case == "bad_shard_magic":
        write_shard(shard, np.arange(100), magic=12345)
        args = [*TINY, "--tokens", shard]
    else:
        write_shard(shard, np.arange(10))
        args = [*TINY, "--tokens", shard]
    result = run_cli(*args, "--model-out", tmp_path / "model.bin")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "model.bin").exists()


def test_cli_with_nothing_to_write_or_print_says_so_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(DEV, "torch_gpt2.py"), *map(str, TINY)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == "" and not any(tmp_path.iterdir())
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: nothing to do") and "--model-out" in lines[0], result.stderr
    steps = run_cli(*TINY, "--steps", 1)  # the losses alone are something to do
    assert steps.returncode == 0 and steps.stdout.startswith("step 1: loss "), steps.stderr

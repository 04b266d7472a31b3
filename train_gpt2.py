"""Train GPT-2 the way llm.c does, as one readable script.

Memory is laid out once, at start: one flat buffer holds every parameter (in llm.c's checkpoint
order), one the gradients (same layout), one every activation of a (B, T) step, plus fp32 AdamW
moments. Every tensor is a view into those buffers; nothing is allocated per step but the
temporaries inside a kernel.

Each layer is a kernel call: kernels/reference.py holds the NumPy twins (fp32, the CPU backend),
with the signatures the CUDA kernels share.

    python train_gpt2.py -e d4 -b 4 -t 64 -x 40       # overfit one batch with a fresh 4-layer model
"""
import argparse
import math
import os
import sys
import time

import numpy as np

from fileformats import FormatError, GPT2Config, num_parameters, param_shapes, read_model, write_model
from kernels import reference as K  # the backend: the NumPy twins

# ----------------------------------------------------------------------------- configuration

GPT2_MAX_SEQ_LEN = 1024
GPT2_VOCAB_SIZE = 50257
GPT2_PADDED_VOCAB_SIZE = 50304  # 50257 rounded up to a multiple of 128, for the matmuls
GPT2_WIDTHS = {6: (384, 6), 12: (768, 12), 24: (1024, 16), 36: (1280, 20), 48: (1600, 25)}  # depth: (C, NH)

ADAMW_BETA1, ADAMW_BETA2, ADAMW_EPS = 0.9, 0.95, 1e-8
GRAD_CLIP = 1.0
DECAYED = ("wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw")  # weight decay on 2-D weights only


def config_from_descriptor(descriptor):
    """'dN' or 'gpt2:dN': llm.c's depths 6/12/24/36/48 take GPT-2's widths; any other N gives
    C = 64 N with N heads (head size 64), for small test models."""
    name = descriptor.removeprefix("gpt2:")
    if not (name.startswith("d") and name[1:].isdigit() and int(name[1:]) > 0):
        raise ValueError(f"model descriptor '{descriptor}' is not dN or gpt2:dN (e.g. d12 for GPT-2 124M)")
    depth = int(name[1:])
    channels, heads = GPT2_WIDTHS.get(depth, (64 * depth, depth))
    return GPT2Config(max_seq_len=GPT2_MAX_SEQ_LEN, vocab_size=GPT2_VOCAB_SIZE, num_layers=depth,
                      num_heads=heads, channels=channels, padded_vocab_size=GPT2_PADDED_VOCAB_SIZE)


def activation_shapes(config, B, T):
    """Every activation of one forward + backward at micro-batch (B, T), in one flat buffer."""
    L, NH, C, Vp = config.num_layers, config.num_heads, config.channels, config.padded_vocab_size
    return {
        "encoded": (B, T, C),        # token + position embeddings, the residual stream's start
        "ln1": (L, B, T, C), "ln1_mean": (L, B, T), "ln1_rstd": (L, B, T),
        "qkv": (L, B, T, 3 * C),
        "atty": (L, B, T, C),        # attention output, heads side by side
        "att_lse": (L, B, NH, T),    # per-row log-sum-exp of the attention scores (fp32 on every backend)
        "residual2": (L, B, T, C),   # residual stream after the attention block
        "ln2": (L, B, T, C), "ln2_mean": (L, B, T), "ln2_rstd": (L, B, T),
        "fch": (L, B, T, 4 * C),     # MLP pre-activation
        "fch_gelu": (L, B, T, 4 * C),
        "residual3": (L, B, T, C),   # residual stream after the MLP block
        "lnf": (B, T, C), "lnf_mean": (B, T), "lnf_rstd": (B, T),
        "logits": (B, T, Vp),        # overwritten by dlogits in backward
        "losses": (B, T),
        "proj_out": (B, T, C),       # attention / MLP projection, before it joins the residual
        # backward scratch
        "dresidual": (B, T, C),      # gradient of the residual stream, carried down the layers
        "dbtc": (B, T, C),
        "dbt4c": (B, T, 4 * C),      # its first B*T*3C also serve as dqkv
    }


def layout(shapes):
    """Consecutive spans of a flat buffer, one per shape: (name -> (slice, shape), total size)."""
    spans, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        spans[name] = (slice(offset, offset + n), shape)
        offset += n
    return spans, offset


def carve(buffer, shapes):
    """Views of a flat buffer, one per shape, laid out by layout()."""
    spans, total = layout(shapes)
    assert total == buffer.size, f"layout covers {total} of {buffer.size} elements"
    return {name: buffer[sl].reshape(shape) for name, (sl, shape) in spans.items()}


class GPT2:
    """A GPT-2 over flat buffers: params, grads, AdamW's m and v, and the activations of (B, T)."""

    def __init__(self, config, params, B, T):
        assert params.shape == (num_parameters(config),) and params.dtype == np.float32
        assert T <= config.max_seq_len and config.channels % config.num_heads == 0
        self.config, self.B, self.T = config, B, T
        shapes = param_shapes(config)
        self.params = params
        self.grads = np.zeros_like(params)
        self.m = np.zeros_like(params)
        self.v = np.zeros_like(params)
        self.p = carve(self.params, shapes)
        self.g = carve(self.grads, shapes)
        act_shapes = activation_shapes(config, B, T)
        self.acts_memory = np.zeros(layout(act_shapes)[1], dtype=np.float32)
        self.a = carve(self.acts_memory, act_shapes)
        # parameter name -> its slice of the flat buffers, for the per-tensor update
        self.slices = {name: sl for name, (sl, _) in layout(shapes)[0].items()}


# ----------------------------------------------------------------------------- initialisation

class TorchCPUGenerator:
    """torch.Generator().manual_seed(seed) on the CPU, reproduced in NumPy: the same mt19937
    stream and the same normal_ algorithm, so a fresh model here starts from the weights the
    PyTorch reference draws (llm.c does the same in C)."""

    def __init__(self, seed):
        key = np.empty(624, dtype=np.uint64)  # mt19937's init_genrand, in 64 bits then masked
        key[0] = seed & 0xFFFFFFFF
        for i in range(1, 624):
            prev = int(key[i - 1])
            key[i] = (1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF
        self.bitgen = np.random.MT19937()
        self.bitgen.state = {"bit_generator": "MT19937", "state": {"key": key.astype(np.uint32), "pos": 624}}

    def uniform(self, n):
        """torch's float uniform in [0, 1): the low 24 bits of each 32-bit draw, times 2^-24."""
        return (self.bitgen.random_raw(n) & 0xFFFFFF).astype(np.float32) * np.float32(2.0 ** -24)

    def normal(self, n, std):
        """torch's normal_ for a float tensor of n >= 16 elements: n uniforms, turned into normals
        by Box-Muller in blocks of 16 (first half cos, second half sin); when 16 does not divide n,
        the last 16 are redrawn from 16 fresh uniforms."""
        assert n >= 16, "torch takes another path below 16 elements"
        out = self.uniform(n)
        whole = n - n % 16
        out[:whole] = self._box_muller(out[:whole], std)
        if n % 16:
            out[n - 16:] = self._box_muller(self.uniform(16), std)
        return out

    @staticmethod
    def _box_muller(u, std):
        u = u.reshape(-1, 16)
        radius = np.sqrt(np.float32(-2.0) * np.log(np.float32(1.0) - u[:, :8]))
        theta = np.float32(2.0 * math.pi) * u[:, 8:]  # in float32, as torch's AVX2 kernel computes it
        std = np.float32(std)
        return np.concatenate([radius * np.cos(theta) * std, radius * np.sin(theta) * std], axis=1).reshape(-1)


def init_params(config, seed=42):
    """llm.c's random init: weights N(0, 0.02), the two projections back into the residual stream
    N(0, 0.02/sqrt(2L)), layernorm weights 1, biases 0, wte's padding rows 0. Drawn in the order
    PyTorch's reference initialises them: wte, wpe, then per layer qkvw, attprojw, fcw, fcprojw."""
    params = np.zeros(num_parameters(config), dtype=np.float32)
    p = carve(params, param_shapes(config))
    L, V, C = config.num_layers, config.vocab_size, config.channels
    gen = TorchCPUGenerator(seed)
    residual_std = 0.02 / math.sqrt(2 * L)
    p["wte"][:V] = gen.normal(V * C, 0.02).reshape(V, C)
    p["wpe"][:] = gen.normal(p["wpe"].size, 0.02).reshape(p["wpe"].shape)
    for l in range(L):
        for name, std in (("qkvw", 0.02), ("attprojw", residual_std), ("fcw", 0.02), ("fcprojw", residual_std)):
            w = p[name][l]
            w[:] = gen.normal(w.size, std).reshape(w.shape)
    for name in ("ln1w", "ln2w", "lnfw"):
        p[name][:] = 1.0
    return params


# ----------------------------------------------------------------------------- forward

def forward(model, inputs):
    """inputs (B,T) int32 -> model.a['logits'] (B,T,Vp). Every activation backward needs is kept."""
    p, a, L = model.p, model.a, model.config.num_layers
    K.encoder_forward(a["encoded"], inputs, p["wte"], p["wpe"])
    K.layernorm_forward(a["ln1"][0], a["ln1_mean"][0], a["ln1_rstd"][0], a["encoded"], p["ln1w"][0], p["ln1b"][0])
    for l in range(L):
        residual = a["encoded"] if l == 0 else a["residual3"][l - 1]
        # attention block
        K.matmul_forward(a["qkv"][l], a["ln1"][l], p["qkvw"][l], p["qkvb"][l])
        K.attention_forward(a["atty"][l], a["att_lse"][l], a["qkv"][l])
        K.matmul_forward(a["proj_out"], a["atty"][l], p["attprojw"][l], p["attprojb"][l])
        K.fused_residual_forward(a["residual2"][l], a["ln2"][l], a["ln2_mean"][l], a["ln2_rstd"][l],
                                 residual, a["proj_out"], p["ln2w"][l], p["ln2b"][l])
        # MLP block
        K.matmul_forward(a["fch_gelu"][l], a["ln2"][l], p["fcw"][l], p["fcb"][l], pre_gelu=a["fch"][l])
        K.matmul_forward(a["proj_out"], a["fch_gelu"][l], p["fcprojw"][l], p["fcprojb"][l])
        # the residual add is fused with the layernorm that follows it: the next layer's ln1, or lnf
        if l + 1 < L:
            next_ln = (a["ln1"][l + 1], a["ln1_mean"][l + 1], a["ln1_rstd"][l + 1], p["ln1w"][l + 1], p["ln1b"][l + 1])
        else:
            next_ln = (a["lnf"], a["lnf_mean"], a["lnf_rstd"], p["lnfw"], p["lnfb"])
        normed, mean, rstd, weight, bias = next_ln
        K.fused_residual_forward(a["residual3"][l], normed, mean, rstd, a["residual2"][l], a["proj_out"], weight, bias)
    K.matmul_forward(a["logits"], a["lnf"], p["wte"], None)  # the classifier shares wte


# ----------------------------------------------------------------------------- backward

def zero_grad(model):
    model.grads[:] = 0.0


def backward(model, inputs, targets, grad_accum_steps=1):
    """Loss of the last forward, and its gradient accumulated into model.grads (each micro-step
    adds its share, 1/grad_accum_steps of a mean over tokens). Returns this micro-step's mean loss."""
    p, g, a, L = model.p, model.g, model.a, model.config.num_layers
    B, T = inputs.shape
    dloss = 1.0 / (B * T * grad_accum_steps)
    K.fused_classifier(a["logits"], a["losses"], targets, model.config.vocab_size, dloss, write_dlogits=True)
    dlogits, dresidual, dbtc, dbt4c = a["logits"], a["dresidual"], a["dbtc"], a["dbt4c"]
    dqkv = dbt4c.reshape(-1)[:B * T * 3 * model.config.channels].reshape(B, T, -1)
    dresidual[:] = 0.0
    K.matmul_backward(dbtc, g["wte"], None, dlogits, a["lnf"], p["wte"])
    K.layernorm_backward(dresidual, g["lnfw"], g["lnfb"], dbtc, a["residual3"][L - 1], p["lnfw"],
                         a["lnf_mean"], a["lnf_rstd"])
    for l in reversed(range(L)):
        residual = a["encoded"] if l == 0 else a["residual3"][l - 1]
        # MLP block: dresidual is d(residual3[l]), which flows unchanged to residual2[l] and the MLP
        K.matmul_backward(dbt4c, g["fcprojw"][l], g["fcprojb"][l], dresidual, a["fch_gelu"][l], p["fcprojw"][l],
                          pre_gelu=a["fch"][l])
        K.matmul_backward(dbtc, g["fcw"][l], g["fcb"][l], dbt4c, a["ln2"][l], p["fcw"][l])
        K.layernorm_backward(dresidual, g["ln2w"][l], g["ln2b"][l], dbtc, a["residual2"][l], p["ln2w"][l],
                             a["ln2_mean"][l], a["ln2_rstd"][l])
        # attention block
        K.matmul_backward(dbtc, g["attprojw"][l], g["attprojb"][l], dresidual, a["atty"][l], p["attprojw"][l])
        K.attention_backward(dqkv, dbtc, a["qkv"][l], a["atty"][l], a["att_lse"][l])
        K.matmul_backward(dbtc, g["qkvw"][l], g["qkvb"][l], dqkv, a["ln1"][l], p["qkvw"][l])
        K.layernorm_backward(dresidual, g["ln1w"][l], g["ln1b"][l], dbtc, residual, p["ln1w"][l],
                             a["ln1_mean"][l], a["ln1_rstd"][l])
    K.encoder_backward(g["wte"], g["wpe"], dresidual, inputs)
    return float(a["losses"].mean())


# ----------------------------------------------------------------------------- update

def update(model, lr, weight_decay, step):
    """Clip the gradients to global norm GRAD_CLIP and take one AdamW step (t = step + 1).
    Returns the norm before clipping."""
    norm = K.global_norm(model.grads)
    scale = K.clip_scale(norm, GRAD_CLIP)
    for name, sl in model.slices.items():
        wd = weight_decay if name in DECAYED else 0.0
        K.adamw(model.params[sl], model.grads[sl], model.m[sl], model.v[sl], None, step + 1, lr,
                ADAMW_BETA1, ADAMW_BETA2, ADAMW_EPS, wd, scale, seed=step)
    return norm


# ----------------------------------------------------------------------------- checkpoints

def load_params(path):
    """A model checkpoint (version 3 fp32 or 5 bf16) as (config, fp32 params)."""
    config, stored = read_model(path)
    return config, stored.astype(np.float32)


def save_model(model, path, version=3):
    """Version 3 stores fp32; version 5 rounds to bf16 (nearest even)."""
    write_model(path, model.config, model.params, version)


# ----------------------------------------------------------------------------- main

def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # a bad flag is one line and exit 1, like every other user error
        fail(f"{message} (see --help)")


def parse_args(argv):
    # -h is llm.c's HellaSwag flag, so help is --help only
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--help", action="help", help="show this help and exit")
    parser.add_argument("-e", default="d12", help="model: a checkpoint .bin (version 3 or 5) or a descriptor dN / gpt2:dN")
    parser.add_argument("-o", default="", help="output directory for the final checkpoint (none if empty)")
    parser.add_argument("-b", type=int, default=4, help="micro-batch size B")
    parser.add_argument("-t", type=int, default=64, help="sequence length T")
    parser.add_argument("-x", type=int, default=20, help="number of steps")
    parser.add_argument("-l", type=float, default=3e-4, help="learning rate")
    parser.add_argument("-c", type=float, default=0.0, help="weight decay (2-D weights only)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.e.endswith(".bin"):
            config, params = load_params(args.e)
        else:
            config = config_from_descriptor(args.e)
            params = init_params(config)
    except (FormatError, ValueError) as e:
        fail(str(e))
    B, T = args.b, args.t
    if B <= 0 or T <= 0 or T > config.max_seq_len:
        fail(f"-b {B} -t {T}: need B > 0 and 0 < T <= {config.max_seq_len} (the model's max sequence length)")
    model = GPT2(config, params, B, T)
    print(f"model: L={config.num_layers} NH={config.num_heads} C={config.channels} "
          f"parameters={num_parameters(config):,} | backend: NumPy (fp32) | B={B} T={T}")
    # one fixed batch of random tokens: learning it proves forward, backward and update agree
    tokens = np.random.default_rng(42).integers(0, config.vocab_size, size=(B, T + 1), dtype=np.int32)
    inputs, targets = np.ascontiguousarray(tokens[:, :-1]), np.ascontiguousarray(tokens[:, 1:])
    for step in range(args.x):
        t0 = time.perf_counter()
        zero_grad(model)
        forward(model, inputs)
        loss = backward(model, inputs, targets)
        norm = update(model, args.l, args.c, step)
        ms = 1000 * (time.perf_counter() - t0)
        print(f"step {step + 1:4d}/{args.x} | loss {loss:.6f} | norm {norm:.4f} | lr {args.l:.2e} "
              f"| {ms:.2f} ms | {B * T / ms * 1000:.0f} tok/s")
    if args.o:
        os.makedirs(args.o, exist_ok=True)
        path = os.path.join(args.o, f"model_{args.x:08d}.bin")
        save_model(model, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

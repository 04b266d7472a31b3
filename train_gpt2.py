"""Train GPT-2 the way llm.c does, as one readable script.

Memory is laid out once, at start: one flat buffer holds every parameter (in llm.c's checkpoint
order), one the gradients (same layout), one every activation of a (B, T) step, plus fp32 AdamW
moments (and fp32 master weights where the parameters are bf16). Every tensor is a view into those
buffers; nothing is allocated per step but the temporaries inside a kernel.

Each layer is a kernel call on the backend that select_backend picks: kernels/cuda.py (the CUDA
kernels, bf16, on the GPU or on the emulated device, which runs them on the CPU to check them) or
kernels/reference.py (their NumPy twins, fp32, the same signatures: kernels/backend.py). The flags
are llm.c's (see --help), plus --device.

    python -m prepro.tinyshakespeare                        # the default data, and data/gpt2_tokenizer.bin
    python train_gpt2.py -e d6 -b 4 -t 128 -x 200 -n 100 -o log_d6     # a fresh 6-layer GPT-2
    python train_gpt2.py -e d6 -b 4 -t 128 -x 400 -n 100 -o log_d6 -y 1  # go on from its last checkpoint
"""
import codecs
import math
import os
import resource
import sys
import time

import numpy as np

from cli import ArgumentParser, fail, run
from dataloader import DataLoader, mt19937
from fileformats import (FormatError, GPT2Config, OptimizerState, num_parameters, param_shapes, read_hellaswag,
                         read_model, read_tokenizer, write_model)
import distributed
from distributed import optimizer_range, shard_size
from kernels import BuildError, cuda_backend, cuda_unavailable, reference
import launcher
import rundir

# ----------------------------------------------------------------------------- configuration

GPT2_MAX_SEQ_LEN = 1024
GPT2_VOCAB_SIZE = 50257
GPT2_EOT = 50256  # <|endoftext|>: precedes every document, and starts every sample
GPT2_PADDED_VOCAB_SIZE = 50304  # 50257 rounded up to a multiple of 128, for the matmuls
GPT2_WIDTHS = {6: (384, 6), 12: (768, 12), 24: (1024, 16), 36: (1280, 20), 48: (1600, 25)}  # depth: (C, NH)

ADAMW_BETA1, ADAMW_BETA2, ADAMW_EPS = 0.9, 0.95, 1e-8
GRAD_CLIP = 1.0
DECAYED = ("wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw")  # weight decay on 2-D weights only
OUTLIER_WINDOW = 128  # the loss and grad-norm z-scores look this many steps back

DEFAULT_MODEL = "d12"  # -e: GPT-2 124M
SAMPLE_TOKENS = 64     # -g, when B*T and the model's maximum sequence length allow

TRAIN_DATA = "data/tinyshakespeare/tiny_shakespeare_train.bin"  # written by python -m prepro.tinyshakespeare
VAL_DATA = "data/tinyshakespeare/tiny_shakespeare_val.bin"
TOKENIZER = "data/gpt2_tokenizer.bin"                           # decodes the samples
HELLASWAG = "data/hellaswag/hellaswag_val.bin"                  # llm.c's dev/data/hellaswag.py writes this format
DEVICES = ("auto", "cpu", "cuda", "emulated")  # --device, here and in the dev/ scripts that run the model

# bf16 dense tensor-core peaks (FLOP/s) that MFU is measured against, by the exact name CUDA gives the
# device: a substring would give an H100 NVL the SXM's figure. NVIDIA's datasheets quote "with
# sparsity", twice the dense rate: these are half of those.
#   H100 SXM (80GB HBM3) 1,978.9 -> 989.4: the H100 whitepaper's table, as tabulated at
#     glennklockwood.com/garden/processors/h100 (BF16 matrix 989.4, sparse 1978.9);
#   H100 PCIe 1,513 -> 756.5: NVIDIA's H100 SXM/PCIe specification table, as reproduced at
#     archive-lib.hpctech.co.jp/gpuproduct/nvidia-h100.html ("shown with sparsity, 1/2 lower without");
#   H200 (SXM) 1,979 -> 989.4: the same GH100 at the same clocks (NVIDIA's H200 page gives H100 SXM's
#     figures; dense 989.4 as in github.com/alpharomercoma/MI300X-vs-H200 REPORT.md);
#   H100 NVL, H200 NVL 1,671 -> 835.5: NVIDIA's H100 and H200 product pages (not reachable from where
#     this was written; ~835 dense / ~1670 sparse for the H100 NVL in third-party tables too);
#   A100 (SXM4 and PCIe, 40 and 80 GB) 624 -> 312: NVIDIA's A100 datasheet, as tabulated at
#     glennklockwood.com/garden/processors/A100 (BF16 312, sparse 624).
PEAK_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989.4e12, "NVIDIA H100 PCIe": 756.5e12, "NVIDIA H100 NVL": 835.5e12,
    "NVIDIA H200": 989.4e12, "NVIDIA H200 NVL": 835.5e12,
    "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
}


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


def flops_per_token(config, T):
    """llm.c's count for a training step: 6 per parameter (the matmuls, forward and backward) plus
    6 L C T for attention's two products."""
    return 6 * num_parameters(config) + 6 * config.num_layers * config.channels * T


def peak_flops(device):
    """The device's bf16 peak from PEAK_BF16_FLOPS, by its exact name, or None (the CPU, an unlisted
    GPU): no MFU then."""
    return PEAK_BF16_FLOPS.get(device)


def activation_shapes(config, B, T, recompute):
    """Every activation of one forward + backward at micro-batch (B, T), as name -> (shape, dtype),
    in one flat buffer. dtype None is the backend's float (fp32 on the CPU, bf16 on the GPU); row
    statistics and losses are fp32 everywhere. With -r 1 the GELU outputs, and with -r 2 the
    layernorm outputs too, are kept for one layer only and recomputed in backward."""
    L, NH, C, Vp = config.num_layers, config.num_heads, config.channels, config.padded_vocab_size
    L_gelu = 1 if recompute >= 1 else L
    L_ln = 1 if recompute >= 2 else L
    f32 = np.float32
    return {
        "inputs": ((B, T), np.int32), "targets": ((B, T), np.int32),  # token ids
        "encoded": ((B, T, C), None),  # token + position embeddings, the residual stream's start
        "ln1": ((L_ln, B, T, C), None), "ln1_mean": ((L, B, T), f32), "ln1_rstd": ((L, B, T), f32),
        "qkv": ((L, B, T, 3 * C), None),
        "atty": ((L, B, T, C), None),       # attention output, heads side by side
        "att_lse": ((L, B, NH, T), f32),    # per-row log-sum-exp of the attention scores
        "residual2": ((L, B, T, C), None),  # residual stream after the attention block
        "ln2": ((L_ln, B, T, C), None), "ln2_mean": ((L, B, T), f32), "ln2_rstd": ((L, B, T), f32),
        "fch": ((L, B, T, 4 * C), None),    # MLP pre-activation
        "fch_gelu": ((L_gelu, B, T, 4 * C), None),
        "residual3": ((L, B, T, C), None),  # residual stream after the MLP block
        "lnf": ((B, T, C), None), "lnf_mean": ((B, T), f32), "lnf_rstd": ((B, T), f32),
        "logits": ((B, T, Vp), None),       # overwritten by dlogits in backward
        "losses": ((B, T), f32),
        "proj_out": ((B, T, C), None),      # attention / MLP projection, before it joins the residual
        # backward scratch
        "dresidual": ((B, T, C), None),     # gradient of the residual stream, carried down the layers
        "dbtc": ((B, T, C), None),
        "dbt4c": ((B, T, 4 * C), None),     # its first B*T*3C also serve as dqkv
    }


ACTIVATION_ALIGN = 256  # bytes: each activation starts where 16-byte vector loads and cuBLASLt want it


def activation_layout(shapes, float_dtype):
    """Byte spans of the activation buffer: (name -> (offset, shape, dtype), total bytes)."""
    spans, offset = {}, 0
    for name, (shape, dtype) in shapes.items():
        dtype = np.dtype(dtype or float_dtype)
        spans[name] = (offset, shape, dtype)
        offset += -(-math.prod(shape) * dtype.itemsize // ACTIVATION_ALIGN) * ACTIVATION_ALIGN
    return spans, offset


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


def layer(activation, l):
    """Layer l's slice of a per-layer activation; one that -r recomputes has a single slice for all."""
    return activation[l if activation.shape[0] > 1 else 0]


class GPT2:
    """A GPT-2 on backend K (kernels.reference, or kernels.cuda's on a device) over flat buffers: parameters and
    gradients in K's float, fp32 AdamW m and v, fp32 master weights where the parameters are bf16
    (unless master_weights is off, -w 0), and the activations of (B, T). params: the fp32 host
    values to start from (on the GPU: rounded to bf16 for the parameters, kept whole as master).
    recompute is -r, gelu_fusion -ge (resolved: 0, 1 or 2).

    With several processes the parameter and gradient buffers are padded (zeros) to world_size
    equal shards, and m, v and master weights cover only optimizer_range: the whole model, or
    with ZeRO-1 (zero_stage 1) this rank's shard."""

    def __init__(self, config, params, B, T, K=reference, recompute=1, gelu_fusion=2, master_weights=True,
                 world_size=1, rank=0, zero_stage=0):
        n = num_parameters(config)
        assert params.shape == (n,) and params.dtype == np.float32
        assert T <= config.max_seq_len and config.channels % config.num_heads == 0
        assert recompute in (0, 1, 2) and gelu_fusion in (0, 1, 2)
        self.config, self.B, self.T, self.K = config, B, T, K
        self.recompute, self.gelu_fusion = recompute, gelu_fusion
        self.world_size, self.rank, self.zero_stage = world_size, rank, zero_stage
        self.num_params, self.shard_size = n, shard_size(n, world_size)
        self.lo, self.hi = optimizer_range(n, world_size, rank, zero_stage)
        padded = self.shard_size * world_size
        self.params = K.zeros(padded, K.FLOAT)
        K.upload(self.params[:n], params)
        self.master = None
        if master_weights and K.FLOAT != np.float32:
            self.master = K.zeros(self.hi - self.lo, np.float32)
            K.upload(self.master, params[self.lo:self.hi])
        self.grads = K.zeros(padded, K.FLOAT)
        self.m = K.zeros(self.hi - self.lo, np.float32)
        self.v = K.zeros(self.hi - self.lo, np.float32)
        shapes = param_shapes(config)
        self.p = carve(self.params[:n], shapes)
        self.g = carve(self.grads[:n], shapes)
        # this rank's shard of the gradients: the part of the sum over ranks that reduce-scatter leaves here
        self.grad_shard = self.grads[rank * self.shard_size:(rank + 1) * self.shard_size]
        self.acts_memory = K.zeros(activation_layout(activation_shapes(config, B, T, recompute), K.FLOAT)[1], np.uint8)
        self._acts = {}
        self.a = self.acts(B, T)
        # parameter name -> its slice of the flat buffers, for the per-tensor update
        self.slices = {name: sl for name, (sl, _) in layout(shapes)[0].items()}

    def acts(self, B, T):
        """The activation views for a (B, T) forward. Every activation scales with B*T, so any
        smaller batch (sampling, HellaSwag) fits in the buffer laid out for the training batch."""
        if (B, T) not in self._acts:
            spans, size = activation_layout(activation_shapes(self.config, B, T, self.recompute), self.K.FLOAT)
            assert size <= self.acts_memory.size and T <= self.config.max_seq_len, (B, T)
            self._acts[B, T] = {name: self.acts_memory[offset:offset + math.prod(shape) * dtype.itemsize]
                                .view(dtype).reshape(shape) for name, (offset, shape, dtype) in spans.items()}
        return self._acts[B, T]


# ----------------------------------------------------------------------------- initialisation

class TorchCPUGenerator:
    """torch.Generator().manual_seed(seed) on the CPU, reproduced in NumPy: the same mt19937
    stream and the same normal_ algorithm, so a fresh model here starts from the weights the
    PyTorch reference draws (llm.c does the same in C)."""

    def __init__(self, seed):
        self.bitgen = mt19937(seed)  # seeded as torch (and llm.c) seed it

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

def forward(model, inputs, cache=None):
    """inputs (B,T) int32 on the host -> model.acts(B, T)['logits'] (B,T,Vp), keeping every
    activation backward needs. B*T may be smaller than the training batch's.

    With a KVCache, inputs are positions cache.length.. of their sequences: attention takes the
    earlier positions' keys and values from the cache and adds theirs to it, and nothing is kept
    for backward (every layer runs in layer 0's activations)."""
    K, p, L = model.K, model.p, model.config.num_layers
    B, T = inputs.shape
    a = model.acts(B, T)
    pos = 0 if cache is None else cache.length
    slot = (lambda l: l) if cache is None else (lambda l: 0)  # where layer l's activations go
    K.upload(a["inputs"], inputs)
    K.encoder_forward(a["encoded"], a["inputs"], p["wte"], p["wpe"][pos:])  # positions pos..pos+T-1
    K.layernorm_forward(a["ln1"][0], a["ln1_mean"][0], a["ln1_rstd"][0], a["encoded"], p["ln1w"][0], p["ln1b"][0])
    for l in range(L):
        s = slot(l)
        residual = a["encoded"] if l == 0 else a["residual3"][slot(l - 1)]
        ln1, ln2, fch_gelu = layer(a["ln1"], s), layer(a["ln2"], s), layer(a["fch_gelu"], s)
        # attention block
        K.matmul_forward(a["qkv"][s], ln1, p["qkvw"][l], p["qkvb"][l])
        if cache is None:
            K.attention_forward(a["atty"][s], a["att_lse"][s], a["qkv"][s])
        else:
            K.attention_forward_cached(a["atty"][s], cache.k[l], cache.v[l], a["qkv"][s], pos,
                                       model.config.num_heads)
        K.matmul_forward(a["proj_out"], a["atty"][s], p["attprojw"][l], p["attprojb"][l])
        K.fused_residual_forward(a["residual2"][s], ln2, a["ln2_mean"][s], a["ln2_rstd"][s],
                                 residual, a["proj_out"], p["ln2w"][l], p["ln2b"][l])
        # MLP block
        if model.gelu_fusion >= 1:
            K.matmul_forward(fch_gelu, ln2, p["fcw"][l], p["fcb"][l], pre_gelu=a["fch"][s])
        else:
            K.matmul_forward(a["fch"][s], ln2, p["fcw"][l], p["fcb"][l])
            K.gelu_forward(fch_gelu, a["fch"][s])
        K.matmul_forward(a["proj_out"], fch_gelu, p["fcprojw"][l], p["fcprojb"][l])
        # the residual add is fused with the layernorm that follows it: the next layer's ln1, or lnf
        if l + 1 < L:
            n = slot(l + 1)
            next_ln = (layer(a["ln1"], n), a["ln1_mean"][n], a["ln1_rstd"][n], p["ln1w"][l + 1], p["ln1b"][l + 1])
        else:
            next_ln = (a["lnf"], a["lnf_mean"], a["lnf_rstd"], p["lnfw"], p["lnfb"])
        normed, mean, rstd, weight, bias = next_ln
        K.fused_residual_forward(a["residual3"][s], normed, mean, rstd, a["residual2"][s], a["proj_out"], weight, bias)
    K.matmul_forward(a["logits"], a["lnf"], p["wte"], None)  # the classifier shares wte
    if cache is not None:
        cache.length = pos + T
    return a["logits"]


# ----------------------------------------------------------------------------- backward

def zero_grad(model):
    model.grads.fill(0)


def backward(model, targets, grad_accum_steps=1):
    """Loss of the last forward against targets (B,T) int32 on the host, and its gradient
    accumulated into model.grads: each micro-step of each rank adds its share of a mean over all
    the step's tokens, 1/(B*T*grad_accum_steps*world_size), so that summing the ranks' gradients
    gives the mean. Returns this micro-step's mean loss as a 0-d float64 array on the backend:
    reading it waits for the GPU, so the loop reads it once per step."""
    B, T = targets.shape
    K, p, g, a, L = model.K, model.p, model.g, model.acts(B, T), model.config.num_layers
    K.upload(a["targets"], targets)
    dloss = 1.0 / (B * T * grad_accum_steps * model.world_size)
    K.fused_classifier(a["logits"], a["losses"], a["targets"], model.config.vocab_size, dloss, write_dlogits=True)
    dlogits, dresidual, dbtc, dbt4c = a["logits"], a["dresidual"], a["dbtc"], a["dbt4c"]
    dqkv = dbt4c.reshape(-1)[:B * T * 3 * model.config.channels].reshape(B, T, -1)
    dresidual.fill(0)
    K.matmul_backward(dbtc, g["wte"], None, dlogits, a["lnf"], p["wte"])
    K.layernorm_backward(dresidual, g["lnfw"], g["lnfb"], dbtc, a["residual3"][L - 1], p["lnfw"],
                         a["lnf_mean"], a["lnf_rstd"])
    for l in reversed(range(L)):
        residual = a["encoded"] if l == 0 else a["residual3"][l - 1]
        ln1, ln2, fch_gelu = layer(a["ln1"], l), layer(a["ln2"], l), layer(a["fch_gelu"], l)
        if model.recompute >= 2:  # this layer's layernorm outputs, again from their inputs
            K.layernorm_forward(ln1, a["ln1_mean"][l], a["ln1_rstd"][l], residual, p["ln1w"][l], p["ln1b"][l])
            K.layernorm_forward(ln2, a["ln2_mean"][l], a["ln2_rstd"][l], a["residual2"][l], p["ln2w"][l],
                                p["ln2b"][l])
        if model.recompute >= 1:  # and its GELU output
            K.gelu_forward(fch_gelu, a["fch"][l])
        # MLP block: dresidual is d(residual3[l]), which flows unchanged to residual2[l] and the MLP
        if model.gelu_fusion >= 2:
            K.matmul_backward(dbt4c, g["fcprojw"][l], g["fcprojb"][l], dresidual, fch_gelu, p["fcprojw"][l],
                              pre_gelu=a["fch"][l])
        else:
            K.matmul_backward(dbt4c, g["fcprojw"][l], g["fcprojb"][l], dresidual, fch_gelu, p["fcprojw"][l])
            K.gelu_backward(dbt4c, a["fch"][l], dbt4c)
        K.matmul_backward(dbtc, g["fcw"][l], g["fcb"][l], dbt4c, ln2, p["fcw"][l])
        K.layernorm_backward(dresidual, g["ln2w"][l], g["ln2b"][l], dbtc, a["residual2"][l], p["ln2w"][l],
                             a["ln2_mean"][l], a["ln2_rstd"][l])
        # attention block
        K.matmul_backward(dbtc, g["attprojw"][l], g["attprojb"][l], dresidual, a["atty"][l], p["attprojw"][l])
        K.attention_backward(dqkv, dbtc, a["qkv"][l], a["atty"][l], a["att_lse"][l])
        K.matmul_backward(dbtc, g["qkvw"][l], g["qkvb"][l], dqkv, ln1, p["qkvw"][l])
        K.layernorm_backward(dresidual, g["ln1w"][l], g["ln1b"][l], dbtc, residual, p["ln1w"][l],
                             a["ln1_mean"][l], a["ln1_rstd"][l])
    K.encoder_backward(g["wte"], g["wpe"], dresidual, a["inputs"])
    return a["losses"].mean(dtype=np.float64)


# ----------------------------------------------------------------------------- update

def gradients(model, comm, loader, grad_accum_steps):
    """The gradients of one step, over grad_accum_steps micro-batches of loader on every rank, summed
    across ranks into each rank's shard (with -z 0, into the whole buffer on every rank). Returns
    (loss, norm) of the whole step, the same on every rank."""
    zero_grad(model)
    loss = 0.0
    for _ in range(grad_accum_steps):
        inputs, targets = loader.next_batch()
        forward(model, inputs)
        loss = loss + backward(model, targets, grad_accum_steps) / grad_accum_steps  # stays on the backend
    comm.reduce_scatter(model.grads)  # this rank's shard now holds the gradients summed over ranks
    if model.zero_stage == 0:
        comm.all_gather(model.grads)  # and every rank all of them: each updates the whole model
    # only now, at the step's end, does the host wait for the device: for the loss and this rank's
    # part of the norm, in one copy; then each is summed over ranks
    loss, norm = model.K.scalars(loss, grad_norm(model))
    loss, norm_squared = comm.sum([loss, norm ** 2])
    return loss / comm.world_size, math.sqrt(norm_squared)


def grad_norm(model):
    """The norm of this rank's shard of the gradients (all of them, with one process), a scalar on
    the backend. The global norm is the root of the ranks' squares summed; every rank, -z 0 or 1,
    takes its part from the same shard, so both give the same bits."""
    return model.K.global_norm(model.grad_shard)


def update(model, lr, weight_decay, step, grad_scale, seed):
    """One AdamW step (t = step + 1) on the gradients times grad_scale (the clip), over this rank's
    optimizer_range, per tensor so that weight decay reaches the 2-D weights only. seed (32 bits)
    feeds the GPU's stochastic rounding, with the tensor's index in the high word (no two tensors
    round alike) and each element's index in its tensor: a shard boundary inside a tensor (ZeRO-1)
    changes no bit."""
    K, lo, hi = model.K, model.lo, model.hi
    for i, (name, sl) in enumerate(model.slices.items()):
        start, stop = max(sl.start, lo), min(sl.stop, hi)  # the part of this tensor in the range
        if start >= stop:
            continue
        wd = weight_decay if name in DECAYED else 0.0
        state = slice(start - lo, stop - lo)
        master = None if model.master is None else model.master[state]
        K.adamw(model.params[start:stop], model.grads[start:stop], model.m[state], model.v[state], master,
                step + 1, lr, ADAMW_BETA1, ADAMW_BETA2, ADAMW_EPS, wd, grad_scale, seed | i << 32, start - sl.start)


def learning_rate(schedule, step, num_steps, max_lr, warmup, final_frac):
    """llm.c's schedules: linear warmup over `warmup` steps, then cosine or linear decay to
    max_lr * final_frac at num_steps, or constant, or wsd (constant, then 1 - sqrt decay over the
    last 20% of the steps)."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    min_lr = max_lr * final_frac
    if schedule == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (num_steps - warmup))) * (max_lr - min_lr)
    if schedule == "linear":
        return max_lr - (step - warmup) / (num_steps - warmup) * (max_lr - min_lr)
    decay_start = int(0.8 * num_steps)
    if schedule == "constant" or step < decay_start:
        return max_lr
    return min_lr + (1.0 - math.sqrt((step - decay_start) / (num_steps - decay_start))) * (max_lr - min_lr)


class OutlierDetector:
    """z-score of each new value among the last OUTLIER_WINDOW values (itself included), nan until
    that many have been seen. A spike in loss or grad norm can then skip its update (-sl, -sg)."""

    def __init__(self, window=()):
        self.window = [float(x) for x in window]

    def update(self, value):
        self.window.append(float(value))
        if len(self.window) <= OUTLIER_WINDOW:
            return math.nan
        self.window.pop(0)
        std = np.std(self.window)
        return 0.0 if std == 0 else (value - np.mean(self.window)) / std


def xorshift_u32(state):
    """llm.c's random_u32 (xorshift*): (next 64-bit state, 32-bit draw)."""
    state ^= state >> 12
    state ^= (state << 25) & 0xFFFFFFFFFFFFFFFF
    state ^= state >> 27
    return state, ((state * 0x2545F4914F6CDD1D) & 0xFFFFFFFFFFFFFFFF) >> 32


# ----------------------------------------------------------------------------- evaluation

def token_losses(model, inputs, targets):
    """Per-token cross-entropy (B,T), on the backend, of the model on a batch, without touching the
    gradients."""
    forward(model, inputs)
    K, a = model.K, model.acts(*inputs.shape)
    K.upload(a["targets"], targets)
    K.fused_classifier(a["logits"], a["losses"], a["targets"], model.config.vocab_size, 0.0, write_dlogits=False)
    return a["losses"]


def val_loss(model, loader, num_batches):
    """Mean loss over the first num_batches batches of the (unshuffled) val split."""
    loader.reset()
    return sum(float(token_losses(model, *loader.next_batch()).mean()) for _ in range(num_batches)) / num_batches


def hellaswag_correct(model, examples):
    """llm.c's HellaSwag: each example's four endings follow its context in four rows; the ending
    with the lowest mean loss over its own tokens is the model's answer. Returns how many of the
    examples it gets right."""
    correct = 0
    for ex in examples:
        rows = [ex.context + ending for ending in ex.endings]
        T = max(len(row) for row in rows) - 1
        tokens = np.zeros((4, T + 1), dtype=np.int32)
        mask = np.zeros((4, T), dtype=bool)  # positions whose target is an ending token
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = row
            mask[i, len(ex.context) - 1:len(row) - 1] = True
        losses = model.K.download(token_losses(model, np.ascontiguousarray(tokens[:, :-1]),
                                               np.ascontiguousarray(tokens[:, 1:])))
        mean_losses = (losses * mask).sum(axis=1) / mask.sum(axis=1)
        correct += int(np.argmin(mean_losses) == ex.label)
    return correct


class KVCache:
    """Every layer's keys and values of the positions run so far, (L, B, max_len, C) each, heads
    side by side as in qkv: one new position at a time then attends to them, so a sampled token
    costs one position through the model, not its whole prefix. Allocated once, before the loop."""

    def __init__(self, model, B, max_len):
        K, L, C = model.K, model.config.num_layers, model.config.channels
        self.k = K.zeros(L * B * max_len * C, K.FLOAT).reshape(L, B, max_len, C)
        self.v = K.zeros(L * B * max_len * C, K.FLOAT).reshape(L, B, max_len, C)
        self.length = 0  # positions filled


def next_token(logits, rng, temperature, top_k):
    """A token id drawn from logits (V,) float64: argmax at temperature 0, otherwise from
    softmax(logits / temperature) over the top_k largest logits (0: all of them). Logits that are
    not finite (a diverged model) are a ValueError: no token can be drawn from them."""
    if not np.isfinite(logits).all():
        raise ValueError(f"the model's logits are not finite ({'nan' if np.isnan(logits).any() else 'inf'}): "
                         f"it diverged")
    if temperature == 0:
        return int(np.argmax(logits))
    candidates = np.arange(logits.size)
    if 0 < top_k < logits.size:
        candidates = np.sort(np.argpartition(logits, -top_k)[-top_k:])
    scaled = logits[candidates] / temperature
    cdf = np.cumsum(np.exp(scaled - scaled.max()))
    # u * cdf[-1] < cdf[-1], so the search lands on a candidate of non-zero probability
    return int(candidates[np.searchsorted(cdf, rng.random() * cdf[-1], side="right")])


class Sampler:
    """Text from the model, one token at a time, for sequences of up to max_len tokens: the prompt
    runs through the model once, filling a KV cache (allocated here, once), then each new token
    one position. A backend without attention_forward_cached (the CUDA one, until a decode kernel
    has run on a GPU) recomputes the whole prefix for every token instead, and says so once; then
    max_len must fit the activations of the training batch. use_cache=False recomputes on any
    backend (as llm.c does), to compare."""

    def __init__(self, model, max_len, use_cache=True):
        assert max_len <= model.config.max_seq_len
        self.model, self.max_len = model, max_len
        self.cached = use_cache and hasattr(model.K, "attention_forward_cached")
        self.cache = KVCache(model, 1, max_len) if self.cached else None
        if use_cache and not self.cached:
            print(f"sampling: the {model.K.DEVICE} backend has no cached attention kernel yet, so each sampled "
                  f"token runs its whole prefix through the model")

    def generate(self, prompt, num_new, seed, temperature=1.0, top_k=0):
        """Yield num_new token ids after prompt (token ids), each drawn by next_token; a given seed
        (anything np.random.default_rng takes) gives the same tokens."""
        model, V = self.model, self.model.config.vocab_size
        assert len(prompt) >= 1 and len(prompt) + num_new <= self.max_len, (len(prompt), num_new, self.max_len)
        rng = np.random.default_rng(seed)
        tokens = np.zeros((1, len(prompt) + num_new), dtype=np.int32)
        tokens[0, :len(prompt)] = prompt
        if self.cached:
            self.cache.length = 0
        for t in range(len(prompt), len(prompt) + num_new):
            if self.cached:  # the prompt at once, then the one token drawn last
                logits = forward(model, tokens[:, self.cache.length:t], self.cache)[0, -1, :V]
            else:
                logits = forward(model, tokens[:, :t])[0, t - 1, :V]
            tokens[0, t] = next_token(model.K.download(logits).astype(np.float64), rng, temperature, top_k)
            yield int(tokens[0, t])


# ----------------------------------------------------------------------------- checkpoints

def load_params(path):
    """A model checkpoint (version 3 fp32 or 5 bf16) as (config, fp32 params)."""
    config, stored = read_model(path)
    return config, stored.astype(np.float32)


def load_or_init(descriptor):
    """-e: (config, fp32 params) of a checkpoint .bin, or of a fresh GPT-2 for dN / gpt2:dN."""
    if descriptor.endswith(".bin"):
        return load_params(descriptor)
    try:
        config = config_from_descriptor(descriptor)
    except ValueError:
        raise ValueError(f"model '{descriptor}' is neither a .bin checkpoint nor dN / gpt2:dN: give -e a model "
                         f"file, or e.g. d12 for GPT-2 124M") from None
    return config, init_params(config)


def save_model(model, path):
    """Version 3 (fp32) from fp32 parameters (the CPU), version 5 from bf16 ones (the GPU): either
    way the file holds the parameters bit for bit."""
    version = 3 if model.params.dtype == np.float32 else 5
    write_model(path, model.config, model.K.download(model.params[:model.num_params]), version)


def checkpoint_state(model, loader, tokens_per_step, step, rng_state, rng_state_last_update, loss_detector,
                     norm_detector):
    """What a checkpoint keeps of this rank beside the model: AdamW's state over its
    optimizer_range, the random state, the data position and what it means, the outlier windows."""
    K = model.K
    shards, tokens, data_hash = loader.data_fingerprint
    return OptimizerState(
        num_processes=model.world_size, rank=model.rank, use_master_weights=model.master is not None,
        shuffle=loader.shuffle, step=step, rng_state=rng_state, rng_state_last_update=rng_state_last_update,
        shard_index=loader.shard_index, sample_index=loader.sample_index, m=K.download(model.m),
        v=K.download(model.v), master=None if model.master is None else K.download(model.master), epoch=loader.epoch,
        epoch_samples=loader.epoch_samples, micro_batch=model.B, seq_len=model.T, tokens_per_step=tokens_per_step,
        layout_processes=loader.layout[0], layout_micro_batch=loader.layout[1], data_shards=shards, data_tokens=tokens,
        data_hash=data_hash, loss_window=loss_detector.window, norm_window=norm_detector.window)


def load_optimizer_state(model, state, model_path):
    """AdamW's m, v and master weights over the model's optimizer_range, from a checkpoint's state
    (whose parameters came from model_path)."""
    K = model.K
    K.upload(model.m, state.m)
    K.upload(model.v, state.v)
    if state.master is not None and model.master is not None:
        K.upload(model.master, state.master)
    elif state.master is not None and model.params.dtype == np.float32:
        K.upload(model.params[model.lo:model.hi], state.master)  # fp32 parameters are the master weights
    elif model.master is not None:  # bf16 model file, no fp32 state: master weights from the parameters
        print(f"the checkpoint of {model_path} holds no master weights: they start from its parameters")
    elif state.master is not None:
        print(f"-w 0: the master weights in the checkpoint of {model_path} are left unused")


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    # -h is llm.c's HellaSwag flag, so help is --help only
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    add = parser.add_argument
    add("--help", action="help", help="show this help and exit")
    add("-i", default=TRAIN_DATA, help="train data: a shard path or glob (default: %(default)s)")
    add("-j", default=VAL_DATA, help="val data: a shard path or glob (default: %(default)s)")
    add("-e", default=None, help="model: a checkpoint .bin (version 3 or 5), or dN / gpt2:dN for a fresh GPT-2 "
                                 f"of depth N; d12 is the 124M model (default: {DEFAULT_MODEL}; unused by -y 1 "
                                 "when a checkpoint is there)")
    add("-o", default=None, help="run directory for main.log and checkpoints (default: none)")
    add("-n", type=int, default=0, help="checkpoint every n steps, and at the end (0: never)")
    add("-nk", type=int, default=0, help="keep only the last k checkpoints (0: keep all)")
    add("-nm", type=int, default=0, help="checkpoints at multiples of m are major: never removed by -nk (0: none)")
    add("-y", type=int, default=0, choices=(0, 1), help="1: resume from the newest complete checkpoint in -o")
    add("-b", type=int, default=4, help="micro-batch size B (default: %(default)s)")
    add("-t", type=int, default=1024, help="sequence length T (default: %(default)s)")
    add("-d", type=int, default=-1, help="total batch in tokens; grad accumulation = d / (B*T*processes) "
                                         "(-1: B*T*processes, no accumulation)")
    add("-l", type=float, default=3e-4, help="peak learning rate (default: %(default)s)")
    add("-k", default="cosine", choices=("cosine", "linear", "constant", "wsd"), help="learning rate schedule")
    add("-u", type=int, default=0, help="learning rate warmup steps (default: 0)")
    add("-q", type=float, default=1.0, help="final learning rate as a fraction of -l (default: 1.0, no decay)")
    add("-c", type=float, default=0.0, help="weight decay, on 2-D weights only (default: 0)")
    add("-sl", type=float, default=0.0, help="skip the update when the loss z-score exceeds this (0: off)")
    add("-sg", type=float, default=0.0, help="skip the update when the grad-norm z-score exceeds this (0: off)")
    add("-x", type=int, default=-1, help="steps to train (-1: one epoch of -i)")
    add("-v", type=int, default=20, help="val loss every v steps, and at the end (0: never)")
    add("-m", type=int, default=20, help="val batches per val loss (-1: the whole val split)")
    add("-s", type=int, default=20, help="sample from the model every s steps, and at the end (0: never)")
    add("-g", type=int, default=None, help=f"tokens per sample, the first being EOT (default: {SAMPLE_TOKENS}, "
                                           "or fewer where B*T or the model's maximum sequence length is smaller)")
    add("-h", type=int, default=0, choices=(0, 1), help=f"1: HellaSwag accuracy with the val loss ({HELLASWAG})")
    add("-a", type=int, default=0, choices=(0, 1), help="1: overfit the first batch (no shuffling)")
    add("--device", default="auto", choices=DEVICES, help="cuda: the CUDA kernels "
        "(bf16), cpu: the NumPy twins (fp32), auto: cuda when a GPU is usable, else cpu; emulated: the CUDA kernels "
        "run on the CPU, slowly, to check them without a GPU (default: %(default)s)")
    add("-w", type=int, default=1, choices=(0, 1), help="keep fp32 master weights (GPU; the CPU is fp32 already)")
    add("-ge", type=int, default=-1, choices=(-1, 0, 1, 2), help="GELU fused into the matmuls: 0 none, 1 forward, "
                                                                "2 forward+backward (-1: 2 on sm90 and newer, else 0)")
    add("-z", type=int, default=0, choices=(0, 1), help="ZeRO stage: 1 shards the AdamW state across processes")
    add("-r", type=int, default=1, choices=(0, 1, 2), help="recompute in backward, keeping less memory: 0 none, "
                                                           "1 GELU, 2 GELU and layernorm")
    add("-pn", type=int, default=None, help="number of processes; alone (no -pr, no launcher's environment), "
                                            "starts them all on this machine (default: 1)")
    add("-pr", type=int, default=None, help="this process's rank, for processes started by hand (default: from "
                                            "torchrun, srun or mpirun's environment, else 0)")
    add("-pg", type=int, default=8, help="GPUs per node: a rank from -pr uses GPU rank %% pg (default: 8)")
    add("-pi", default="env", choices=("tcp", "fs", "env"), help="how the ranks meet: tcp at -ps, fs through -pf, "
        "env at MASTER_ADDR:MASTER_PORT (or torchrun's store, or Slurm's first node) (default: env)")
    add("-ps", default="", help="rank 0's address HOST[:PORT], for -pi tcp (port default: MASTER_PORT or 29500)")
    add("-pf", default="/tmp", help="a directory every rank can write, for -pi fs (default: /tmp)")
    add("--rendezvous-timeout", type=float, default=300.0, help="seconds the ranks wait for each other at start "
                                                                "(default: %(default)g)")
    add("--max-restarts", type=int, default=0, help="-pn N alone: when a rank dies, restart the N ranks up to this "
                                                    "many times, going on from the newest checkpoint (default: 0)")
    return parser.parse_args(argv)


def check_args(args):
    """Every value and combination the flags alone can get wrong, before a file is touched."""
    floats = {"-l": args.l, "-q": args.q, "-c": args.c, "-sl": args.sl, "-sg": args.sg,
              "--rendezvous-timeout": args.rendezvous_timeout}
    max_sample = min(GPT2_MAX_SEQ_LEN, args.b * args.t)
    rules = [(math.isfinite(value), f"{flag} {value}: must be a finite number") for flag, value in floats.items()] + [
        (args.b > 0, f"-b {args.b}: the micro-batch size must be positive"),
        (args.t > 0, f"-t {args.t}: the sequence length must be positive"),
        (args.rendezvous_timeout > 0, f"--rendezvous-timeout {args.rendezvous_timeout:g}: must be positive"),
        (args.x == -1 or args.x > 0, f"-x {args.x}: steps must be positive, or -1 for one epoch"),
        (args.l >= 0 and args.c >= 0 and args.u >= 0, f"-l {args.l} -c {args.c} -u {args.u}: must not be negative"),
        (0 <= args.q <= 1, f"-q {args.q}: the final learning rate fraction must be in [0, 1]"),
        (args.sl >= 0 and args.sg >= 0, f"-sl {args.sl} -sg {args.sg}: z-score thresholds must not be negative"),
        (min(args.v, args.s, args.n, args.nk, args.nm) >= 0, "-v, -s, -n, -nk and -nm must not be negative"),
        (args.max_restarts >= 0, f"--max-restarts {args.max_restarts}: must not be negative"),
        (args.m == -1 or args.m > 0, f"-m {args.m}: val batches must be positive, or -1 for the whole split"),
        (args.s == 0 or args.g is None or 1 < args.g <= max_sample,
         f"-g {args.g}: tokens to sample must be in 2..{max_sample} (min(1024, B*T))"),
        (args.s == 0 or max_sample > 1, f"-s {args.s}: a sample needs 2 tokens, and B*T is 1: raise -b or -t, "
                                        f"or give -s 0"),
        (args.o is not None or (args.n == 0 and args.y == 0), "-n and -y 1 need a run directory: give -o DIR"),
        (args.o != "", "-o '': give a run directory's path, or leave -o out to write nothing"),
    ]
    for ok, message in rules:
        if not ok:
            fail(message)


def select_backend(device, local_rank=0):
    """The one place that chooses the kernels: the CUDA kernels (kernels.cuda, bf16) on the GPU
    local_rank or on the emulated device, or kernels.reference (the NumPy twins, fp32). --device
    auto takes CUDA when it can run and says why not otherwise."""
    if device == "cpu":
        return reference
    if device == "emulated":
        print("--device emulated: the CUDA kernels run on the emulated device, on the CPU: slowly (seconds a step "
              "for d1), to check the CUDA code path without a GPU; its results are emulated, not a GPU's")
        try:
            return cuda_backend("emulated")
        except BuildError as e:
            fail(f"--device emulated: the kernels did not build for the emulated device: {e}")
    reason = cuda_unavailable()
    if reason is None:
        import cupy
        if local_rank >= cupy.cuda.runtime.getDeviceCount():
            fail(f"local rank {local_rank} has no GPU: this node has {cupy.cuda.runtime.getDeviceCount()}; "
                 f"start at most that many processes per node (a smaller -pn, or -pg with -pr)")
        cupy.cuda.Device(local_rank).use()  # before the GPU's kernels load their modules on the current device
        try:
            return cuda_backend("gpu")
        except BuildError as e:
            fail(f"--device {device}: the CUDA kernels did not build: {e}")
    if device == "cuda":
        fail(f"--device cuda: {reason}; use --device cpu for the NumPy backend")
    print(f"--device auto: {reason}, so the NumPy backend runs on the CPU")
    return reference


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    check_args(args)
    process = distributed.identify(args.pn, args.pr, args.pg)
    B, T, nproc = args.b, args.t, args.pn if process is None else process.world_size
    if args.device == "emulated" and nproc > 1:
        fail(f"--device emulated -pn {nproc}: the emulated device runs one process; use --device cpu for several")
    if args.d != -1 and (args.d <= 0 or args.d % (B * T * nproc)):
        fail(f"-d {args.d}: the total batch must be a multiple of B*T*processes = {B * T * nproc}")
    if process is None:  # -pn N, and nothing gave this process a rank: it starts the N ranks itself
        sys.exit(launcher.launch(os.path.abspath(__file__), argv, nproc, args.device, args.max_restarts))
    rank = process.rank
    if rank != 0:  # rank 0 prints and logs for all; every rank's errors still reach stderr
        sys.stdout = open(os.devnull, "w")

    # everything that reads a file, before anything is written
    restart = distributed.restart_count()  # torchrun's or our launcher's: a restart goes on as -y 1 would
    if restart:
        print(f"restart {restart} of this job (TORCHELASTIC_RESTART_COUNT): " + (
            f"going on from the newest checkpoint in {args.o}, as -y 1 would" if args.o is not None else
            "with no run directory (-o) to go on from, the run starts over"))
    run_dir = rundir.RunDir(args.o, rank) if args.o is not None else None
    checkpoint = run_dir.checkpoint(args.y or restart) if run_dir else None
    resume_step = checkpoint.step if checkpoint else None
    # a resumed run keeps its total batch, on any number of processes and -b
    tokens_per_step = checkpoint.batch(B, T, args.d, nproc) if checkpoint else args.d if args.d != -1 else B * T * nproc
    grad_accum_steps = tokens_per_step // (B * T * nproc)
    try:
        if checkpoint:
            config, params = load_params(checkpoint.model_path)
        else:
            config, params = load_or_init(DEFAULT_MODEL if args.e is None else args.e)
        if T > config.max_seq_len:
            fail(f"-t {T}: above the model's maximum sequence length {config.max_seq_len}")
        if args.s and args.g is not None and args.g > config.max_seq_len:
            fail(f"-g {args.g}: more tokens to sample than the model's maximum sequence length {config.max_seq_len}: "
                 f"lower -g")
        sample_tokens = args.g if args.g is not None else min(SAMPLE_TOKENS, B * T, config.max_seq_len)
        train_loader = DataLoader(args.i, B, T, config.vocab_size, rank, nproc, shuffle=not args.a,
                                  layout=checkpoint.layout if checkpoint else None, grad_accum_steps=grad_accum_steps)
        val_loader = DataLoader(args.j, B, T, config.vocab_size, rank, nproc) if args.v else None
        hellaswag = read_hellaswag(HELLASWAG) if args.h else None
        tokenizer = read_tokenizer(TOKENIZER)[0] if args.s and os.path.exists(TOKENIZER) else None
    except (FormatError, ValueError) as e:
        fail(str(e))
    if checkpoint:
        checkpoint.check_data(args.i, train_loader.data_fingerprint)
    if hellaswag and 4 * (max(len(ex.context) + max(map(len, ex.endings)) for ex in hellaswag) - 1) > B * T:
        fail(f"-h 1: the longest HellaSwag example does not fit in B*T = {B * T} tokens: raise -b or -t")
    num_steps = args.x if args.x != -1 else train_loader.num_tokens // tokens_per_step
    if num_steps == 0:
        fail(f"-i {args.i}: {train_loader.num_tokens} tokens, less than one step of {tokens_per_step}: set -x")
    if resume_step is not None and resume_step > num_steps:
        fail(f"-x {args.x}: nothing to train: the newest checkpoint in {args.o} is at step {resume_step}, beyond "
             f"step {num_steps}; raise -x to go on from it")
    if resume_step == num_steps:  # its end-of-run evaluation is in main.log already
        print(f"-o {args.o}: the run is finished: its newest checkpoint is at step {num_steps}, the last one: nothing "
              f"to train, and nothing is changed (raise -x to train on)")
        return
    if checkpoint:
        try:
            state = checkpoint.optimizer_state(nproc, rank, args.z)
            train_loader.restore(state.epoch, state.epoch_samples)
        except FormatError as e:
            fail(str(e))
        except ValueError as e:  # a position the data check let through: the trailer is not what it claims
            fail(f"{checkpoint.state_paths[0]}: {e}")
    val_batches = 0
    if val_loader:
        val_batches = val_loader.num_batches if args.m == -1 else min(args.m, val_loader.num_batches)

    K = select_backend(args.device, process.local_rank)
    comm = distributed.connect(process, K is not reference, args.pi, args.ps, args.pf, args.rendezvous_timeout)
    model = GPT2(config, params, B, T, K, recompute=args.r, gelu_fusion=K.GELU_FUSION if args.ge == -1 else args.ge,
                 master_weights=bool(args.w), world_size=nproc, rank=rank, zero_stage=args.z)
    step = 0
    # llm.c's start: one draw per update seeds the GPU's stochastic rounding. The same on every rank
    # (llm.c adds the rank): with -z 0 each rank updates the whole model and the copies must stay
    # equal, and with -z 1 a shard must round as it would under -z 0
    rng_state = 13371337
    rng_state_last_update = rng_state  # the state that last update drew from, as llm.c's state file records
    loss_detector, norm_detector = OutlierDetector(), OutlierDetector()
    if checkpoint:
        load_optimizer_state(model, state, checkpoint.model_path)
        step, rng_state, rng_state_last_update = state.step, state.rng_state, state.rng_state_last_update
        loss_detector, norm_detector = OutlierDetector(state.loss_window), OutlierDetector(state.norm_window)

    precision = "fp32" if model.params.dtype == np.float32 else \
        "bf16, fp32 master weights" if model.master is not None else "bf16, no master weights"
    print(f"backend: {'NumPy' if K is reference else 'CUDA'} on {K.DEVICE} ({precision}) | recompute -r {model.recompute} "
          f"| GELU fusion -ge {model.gelu_fusion}")
    print(f"model: L={config.num_layers} NH={config.num_heads} C={config.channels} maxT={config.max_seq_len} "
          f"V={config.vocab_size} (padded {config.padded_vocab_size}) | parameters: {num_parameters(config):,}")
    print(f"train: {args.i} ({train_loader.num_tokens:,} tokens in {len(train_loader.files)} shard(s)"
          f"{', shuffled' if train_loader.shuffle else ''}) | val: "
          + (f"{args.j} ({val_batches} batches every {args.v} steps)" if val_loader else "off"))
    print(f"batch: B={B} T={T} | {tokens_per_step:,} tokens per step, grad accumulation {grad_accum_steps} "
          f"| {num_steps} steps | lr {args.l:g} {args.k}, warmup {args.u}, final fraction {args.q:g} | wd {args.c:g}")
    mib = 1 / 2**20
    print(f"memory ({K.DEVICE}): parameters {model.params.nbytes * mib:.1f} MiB, gradients "
          f"{model.grads.nbytes * mib:.1f} MiB, AdamW m+v {2 * model.m.nbytes * mib:.1f} MiB, master weights "
          f"{0 if model.master is None else model.master.nbytes * mib:.1f} MiB, activations "
          f"{model.acts_memory.nbytes * mib:.1f} MiB | peak host memory "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if nproc > 1:
        print(f"processes: {nproc} (ranks from {process.source}), {comm.engine} collectives | ZeRO-{args.z}: "
              f"each rank keeps the AdamW state of {model.hi - model.lo:,} of {num_parameters(config):,} parameters")
    elif args.z:
        print("-z 1 with one process: there is nothing to shard, so ZeRO-1 changes nothing")
    if args.m != -1 and val_loader and args.m > val_batches:
        print(f"-m {args.m}: the val split holds {val_batches} batches of B*T, so val loss uses those")
    if args.s and args.g is None and sample_tokens < SAMPLE_TOKENS:
        print(f"-g: samples are {sample_tokens} tokens, not {SAMPLE_TOKENS}: all that B*T = {B * T} and the model's "
              f"maximum sequence length {config.max_seq_len} allow (give -g to choose)")
    if args.s and tokenizer is None:
        print(f"no tokenizer at {TOKENIZER} (python -m prepro.gpt2_tokenizer writes it): samples print as token ids")
    if resume_step is not None:
        print(f"resuming from {checkpoint.model_path} at step {resume_step}")
        if change := checkpoint.change(nproc, B, args.z):
            print(change)
        if args.e is not None:
            print(f"-e {args.e}: not used, as -y 1 goes on with the checkpoint's model")
    elif run_dir and (args.y or restart):
        print(f"{'-y 1' if args.y else 'restart'}: no checkpoint in {args.o} yet, starting from scratch")
    if resume_step is None and args.o is not None and os.path.exists(os.path.join(args.o, "main.log")):
        print(f"{os.path.join(args.o, 'main.log')}: an earlier run's log, with no checkpoint to resume from, "
              f"is replaced by this run's")

    log = None
    if run_dir:
        log = run_dir.start(step, comm)
        print(f"run directory: {args.o}")

    sampler = Sampler(model, sample_tokens) if args.s and rank == 0 else None  # its KV cache, before the loop
    ema_tok_s, timed_s, timed_steps = 0.0, 0.0, 0
    peak, step_flops_per_token = peak_flops(K.DEVICE), flops_per_token(config, T)
    for step in range(step, num_steps + 1):
        last_step = step == num_steps
        # the checkpoint first: nothing that evaluates the model (val loss, HellaSwag, a sample) can lose training
        if args.n and step != resume_step and ((step > 0 and step % args.n == 0) or last_step):
            run_dir.save(step, comm, lambda path: save_model(model, path), checkpoint_state(
                model, train_loader, tokens_per_step, step, rng_state, rng_state_last_update, loss_detector,
                norm_detector))
            if rank == 0:
                run_dir.prune(args.nk, args.nm)
        if val_loader and (step % args.v == 0 or last_step):
            loss = comm.sum([val_loss(model, val_loader, val_batches)])[0] / nproc  # each rank has its own batches
            if not math.isfinite(loss):
                fail(f"step {step}: the val loss is {loss}: the model diverged; lower -l")
            print(f"val loss {loss:.6f}")
            if log:
                log.write(f"s:{step} tel:{loss:.4f}")
        if hellaswag and ((step > 0 and args.v and step % args.v == 0) or last_step):
            accuracy = comm.sum([hellaswag_correct(model, hellaswag[rank::nproc])])[0] / len(hellaswag)
            print(f"HellaSwag: {accuracy:.4f} of {len(hellaswag)}")
            if log:
                log.write(f"s:{step} eval:{accuracy:.4f}")
        if sampler and ((step > 0 and step % args.s == 0) or last_step):
            print("generating:\n---")
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            try:
                for token in sampler.generate([GPT2_EOT], sample_tokens - 1, seed=(1337, step)):
                    print(decoder.decode(tokenizer[token]) if tokenizer else f"{token} ", end="", flush=True)
            except ValueError as e:  # next_token's: logits that are not finite
                fail(f"step {step}: sampling: {e}; lower -l")
            print("\n---")
        if last_step:
            break

        t0 = time.perf_counter()
        if args.a:
            train_loader.reset()
        loss, norm = gradients(model, comm, train_loader, grad_accum_steps)
        if not (math.isfinite(loss) and math.isfinite(norm)):  # the same on every rank, so every rank stops here
            saved = run_dir.done_steps() if run_dir else []
            fail(f"step {step + 1}/{num_steps}: the loss is {loss} and the grad norm {norm}: training diverged, and "
                 f"this update is not made; lower -l" + (f", and resume from the checkpoint at step {saved[-1]} "
                                                          f"with -y 1" if saved else ""))
        zloss = loss_detector.update(loss)
        lr = learning_rate(args.k, step, num_steps, args.l, args.u, args.q)
        znorm = norm_detector.update(norm)
        if args.sl and zloss > args.sl:
            print(f"skipping update due to loss z-score of {zloss:f}")
        elif args.sg and znorm > args.sg:
            print(f"skipping update due to grad z-score of {znorm:f}")
        else:
            rng_state_last_update = rng_state
            rng_state, seed = xorshift_u32(rng_state)
            update(model, lr, args.c, step, K.clip_scale(norm, GRAD_CLIP), seed)
            if model.zero_stage == 1:
                comm.all_gather(model.params)  # every rank's updated shard, to every rank
        K.synchronize()
        seconds = time.perf_counter() - t0
        tok_s = tokens_per_step / seconds
        if step > 0:  # the first step warms up; tok/s is an EMA, bias-corrected as in AdamW
            timed_s, timed_steps = timed_s + seconds, timed_steps + 1
            ema_tok_s = 0.95 * ema_tok_s + 0.05 * tok_s
            tok_s = ema_tok_s / (1 - 0.95 ** timed_steps)
        mfu = f"{100 * step_flops_per_token * tok_s / (peak * nproc):.1f}%" if peak else "n/a"  # per GPU
        print(f"step {step + 1:4d}/{num_steps} | loss {loss:.6f} ({zloss:+.2f}z)| norm {norm:6.4f} ({znorm:+.2f}z)"
              f"| lr {lr:.2e} | {1000 * seconds:.2f} ms | {mfu} MFU | {tok_s:.0f} tok/s", flush=True)
        if log:
            log.write(f"s:{step} trl:{loss:.4f} lr:{lr:.6f} norm:{norm:.2f}")

    if timed_steps:
        print(f"total average iteration time: {1000 * timed_s / timed_steps:.2f} ms")
    print(f"peak host memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if args.o is not None:
        print(f"run directory: {args.o}")


if __name__ == "__main__":
    np.seterr(over="ignore", invalid="ignore")  # a diverging run is said once, by the loop's loss check, as on the GPU
    try:
        run(main)
    except KeyboardInterrupt:  # checkpoints are whole or absent: the newest DONE is where -y 1 goes on
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except FormatError as e:  # a train shard's tokens are checked on its first use, which can be mid-run
        fail(str(e))

"""Train GPT-2 the way llm.c does, as one readable script.

Memory is laid out once, at start: one flat buffer holds every parameter (in llm.c's checkpoint
order), one the gradients (same layout), one every activation of a (B, T) step, plus fp32 AdamW
moments (and fp32 master weights where the parameters are bf16). Every tensor is a view into those
buffers; nothing is allocated per step but the temporaries inside a kernel.

Each layer is a kernel call on the backend that select_backend picks: kernels/cuda.py (the CUDA
kernels, bf16, on the GPU or on the emulated device, which runs them on the CPU to check them) or
kernels/reference.py (their NumPy twins, fp32, the same signatures: kernels/backend.py). The flags
are llm.c's (cli.LLMC_FLAGS, read here by name: -l is args.learning_rate), plus --device.

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
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from cli import LLMC_FLAGS, ArgumentParser, add_llmc_flags, fail, run
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
SLOW_CPU_STEP = 10     # seconds: a step estimated slower than this on the CPU is said before the first step
EVAL_PROGRESS_DELAY = 3  # seconds: an evaluation still running after this shows a progress bar (on stderr)

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
        # flat buffers (llm.c's *_memory) and the per-tensor views into them (name -> array)
        self.params_memory = K.zeros(padded, K.FLOAT)
        K.upload(self.params_memory[:n], params)
        self.master_weights = None
        if master_weights and K.FLOAT != np.float32:
            self.master_weights = K.zeros(self.hi - self.lo, np.float32)
            K.upload(self.master_weights, params[self.lo:self.hi])
        self.grads_memory = K.zeros(padded, K.FLOAT)
        self.m_memory = K.zeros(self.hi - self.lo, np.float32)
        self.v_memory = K.zeros(self.hi - self.lo, np.float32)
        shapes = param_shapes(config)
        self.params = carve(self.params_memory[:n], shapes)
        self.grads = carve(self.grads_memory[:n], shapes)
        # this rank's shard of the gradients: the part of the sum over ranks that reduce-scatter leaves here
        self.grad_shard = self.grads_memory[rank * self.shard_size:(rank + 1) * self.shard_size]
        self.acts_memory = K.zeros(activation_layout(activation_shapes(config, B, T, recompute), K.FLOAT)[1], np.uint8)
        self._acts = {}
        self.acts = self.acts_for(B, T)
        # parameter name -> its slice of the flat buffers, for the per-tensor update
        self.slices = {name: sl for name, (sl, _) in layout(shapes)[0].items()}

    def acts_for(self, B, T):
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
    """inputs (B,T) int32 on the host -> model.acts_for(B, T)['logits'] (B,T,Vp), keeping every
    activation backward needs. B*T may be smaller than the training batch's.

    With a KVCache, inputs are positions cache.length.. of their sequences: attention takes the
    earlier positions' keys and values from the cache and adds theirs to it, and nothing is kept
    for backward (every layer runs in layer 0's activations)."""
    K, p, L = model.K, model.params, model.config.num_layers
    B, T = inputs.shape
    a = model.acts_for(B, T)
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
    model.grads_memory.fill(0)


def backward(model, targets, grad_accum_steps=1):
    """Loss of the last forward against targets (B,T) int32 on the host, and its gradient
    accumulated into model.grads_memory: each micro-step of each rank adds its share of a mean over
    all the step's tokens, 1/(B*T*grad_accum_steps*world_size), so that summing the ranks' gradients
    gives the mean. Returns this micro-step's mean loss as a 0-d float64 array on the backend:
    reading it waits for the GPU, so the loop reads it once per step."""
    B, T = targets.shape
    K, p, g, a, L = model.K, model.params, model.grads, model.acts_for(B, T), model.config.num_layers
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
    comm.reduce_scatter(model.grads_memory)  # this rank's shard now holds the gradients summed over ranks
    if model.zero_stage == 0:
        comm.all_gather(model.grads_memory)  # and every rank all of them: each updates the whole model
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
        master = None if model.master_weights is None else model.master_weights[state]
        K.adamw(model.params_memory[start:stop], model.grads_memory[start:stop], model.m_memory[state],
                model.v_memory[state], master, step + 1, lr, ADAMW_BETA1, ADAMW_BETA2, ADAMW_EPS, wd, grad_scale,
                seed | i << 32, start - sl.start)


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
    K, a = model.K, model.acts_for(*inputs.shape)
    K.upload(a["targets"], targets)
    K.fused_classifier(a["logits"], a["losses"], a["targets"], model.config.vocab_size, 0.0, write_dlogits=False)
    return a["losses"]


def val_loss(model, loader, num_batches, progress=False):
    """Mean loss over the first num_batches batches of the (unshuffled) val split; progress: a bar
    on stderr once it has taken EVAL_PROGRESS_DELAY seconds."""
    loader.reset()
    batches = tqdm(range(num_batches), "val loss", disable=not progress, delay=EVAL_PROGRESS_DELAY, leave=False)
    return sum(float(token_losses(model, *loader.next_batch()).mean()) for _ in batches) / num_batches


def hellaswag_correct(model, examples, progress=False):
    """llm.c's HellaSwag: each example's four endings follow its context in four rows; the ending
    with the lowest mean loss over its own tokens is the model's answer. Returns how many of the
    examples it gets right; progress as for val_loss."""
    correct = 0
    for ex in tqdm(examples, "HellaSwag", disable=not progress, delay=EVAL_PROGRESS_DELAY, leave=False):
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
        raise ValueError(f"-e {descriptor}: neither a .bin checkpoint nor dN / gpt2:dN: give -e a model file, or "
                         f"e.g. d12 for GPT-2 124M") from None
    n, memory = num_parameters(config), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 4 * n > memory:  # its fp32 parameters alone: the gradients and AdamW's state come on top
        raise ValueError(f"-e {descriptor}: {n:,} parameters, {4 * n / 2**30:,.0f} GiB in fp32, more than this "
                         f"machine's {memory / 2**30:.0f} GiB of memory: choose a smaller depth (d12 is GPT-2 124M, "
                         f"d48 GPT-2 1.5B)")
    return config, init_params(config)


def save_model(model, path):
    """Version 3 (fp32) from fp32 parameters (the CPU), version 5 from bf16 ones (the GPU): either
    way the file holds the parameters bit for bit."""
    version = 3 if model.params_memory.dtype == np.float32 else 5
    write_model(path, model.config, model.K.download(model.params_memory[:model.num_params]), version)


@dataclass
class Progress:
    """Where training stands between steps, as a checkpoint keeps it: the step, llm.c's random state
    (one draw per update seeds the GPU's stochastic rounding) and the outlier detectors' windows. The
    random state starts as llm.c's does, the same on every rank (llm.c adds the rank): with -z 0 each
    rank updates the whole model and the copies must stay equal, and with -z 1 a shard must round as
    it would under -z 0."""
    step: int = 0
    rng_state: int = 13371337
    rng_state_last_update: int = 13371337  # the state the last update drew from, as llm.c's state file records
    loss_detector: OutlierDetector = field(default_factory=OutlierDetector)
    norm_detector: OutlierDetector = field(default_factory=OutlierDetector)

    @classmethod
    def restored(cls, state):
        return cls(state.step, state.rng_state, state.rng_state_last_update, OutlierDetector(state.loss_window),
                   OutlierDetector(state.norm_window))


def checkpoint_state(model, loader, tokens_per_step, progress):
    """What a checkpoint keeps of this rank beside the model: AdamW's state over its
    optimizer_range, the random state, the data position and what it means, the outlier windows."""
    K = model.K
    shards, tokens, data_hash = loader.data_fingerprint
    master = None if model.master_weights is None else K.download(model.master_weights)
    return OptimizerState(
        num_processes=model.world_size, rank=model.rank, use_master_weights=model.master_weights is not None,
        shuffle=loader.shuffle, step=progress.step, rng_state=progress.rng_state,
        rng_state_last_update=progress.rng_state_last_update, shard_index=loader.shard_index,
        sample_index=loader.sample_index, m=K.download(model.m_memory), v=K.download(model.v_memory), master=master,
        epoch=loader.epoch, epoch_samples=loader.epoch_samples, micro_batch=model.B, seq_len=model.T,
        tokens_per_step=tokens_per_step, layout_processes=loader.layout[0], layout_micro_batch=loader.layout[1],
        data_shards=shards, data_tokens=tokens, data_hash=data_hash, loss_window=progress.loss_detector.window,
        norm_window=progress.norm_detector.window)


def load_optimizer_state(model, state, model_path):
    """AdamW's m, v and master weights over the model's optimizer_range, from a checkpoint's state
    (whose parameters came from model_path)."""
    K = model.K
    K.upload(model.m_memory, state.m)
    K.upload(model.v_memory, state.v)
    if state.master is not None and model.master_weights is not None:
        K.upload(model.master_weights, state.master)
    elif state.master is not None and model.params_memory.dtype == np.float32:
        K.upload(model.params_memory[model.lo:model.hi], state.master)  # fp32 parameters are the master weights
    elif model.master_weights is not None:  # bf16 model file, no fp32 state: master weights from the parameters
        print(f"the checkpoint of {model_path} holds no master weights: they start from its parameters")
    elif state.master is not None:
        print(f"-w 0: the master weights in the checkpoint of {model_path} are left unused")


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    # -h is llm.c's HellaSwag flag, so help is --help only
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False,
                            hints={"-h": "-h is llm.c's HellaSwag flag, 0 or 1; for help, give --help"})
    add = parser.add_argument
    add("--help", action="help", help="show this help and exit")
    add_llmc_flags(parser, " ".join(LLMC_FLAGS), train_data=TRAIN_DATA, val_data=VAL_DATA, model=DEFAULT_MODEL)
    add("--device", default="auto", choices=DEVICES, help="cuda: the CUDA kernels (bf16); cpu: the NumPy twins "
        "(fp32); auto: cuda when a GPU is usable, else cpu; emulated: the CUDA kernels run on the CPU, slowly, "
        "to check them without a GPU (default: %(default)s)")
    add("--rendezvous-timeout", type=float, default=300.0, help="seconds the ranks wait for each other at start "
                                                                "(default: %(default)g)")
    add("--max-restarts", type=int, default=0, help="-pn N alone: when a rank dies, restart the N ranks up to this "
                                                    "many times, going on from the newest checkpoint (default: 0)")
    return parser.parse_args(argv)


def check_args(args):
    """Every value and combination the flags alone can get wrong, before a file is touched."""
    a = args
    floats = {"-l": a.learning_rate, "-q": a.final_lr_frac, "-c": a.weight_decay, "-sl": a.skip_update_lossz,
              "-sg": a.skip_update_gradz, "--rendezvous-timeout": a.rendezvous_timeout}
    max_sample = min(GPT2_MAX_SEQ_LEN, a.micro_batch_size * a.seq_len)
    rules = [(math.isfinite(value), f"{flag} {value}: must be a finite number") for flag, value in floats.items()] + [
        (a.micro_batch_size > 0, f"-b {a.micro_batch_size}: the micro-batch size must be positive"),
        (a.seq_len > 0, f"-t {a.seq_len}: the sequence length must be positive"),
        (a.total_batch_size == -1 or a.total_batch_size > 0, f"-d {a.total_batch_size}: the total batch must be "
                                                              f"positive, a multiple of B*T*processes (or -1)"),
        (a.rendezvous_timeout > 0, f"--rendezvous-timeout {a.rendezvous_timeout:g}: must be positive"),
        (a.max_steps == -1 or a.max_steps > 0, f"-x {a.max_steps}: steps must be positive, or -1 for one epoch"),
        (min(a.learning_rate, a.weight_decay, a.warmup_steps) >= 0,
         f"-l {a.learning_rate} -c {a.weight_decay} -u {a.warmup_steps}: must not be negative"),
        (0 <= a.final_lr_frac <= 1, f"-q {a.final_lr_frac}: the final learning rate fraction must be in [0, 1]"),
        (a.skip_update_lossz >= 0 and a.skip_update_gradz >= 0,
         f"-sl {a.skip_update_lossz} -sg {a.skip_update_gradz}: z-score thresholds must not be negative"),
        (min(a.val_loss_every, a.sample_every, a.checkpoint_every, a.checkpoints_keep, a.major_checkpoint_every) >= 0,
         "-v, -s, -n, -nk and -nm must not be negative"),
        (a.max_restarts >= 0, f"--max-restarts {a.max_restarts}: must not be negative"),
        (a.val_batches == -1 or a.val_batches > 0,
         f"-m {a.val_batches}: val batches must be positive, or -1 for the whole split"),
        (a.sample_every == 0 or a.sample_tokens is None or 1 < a.sample_tokens <= max_sample,
         f"-g {a.sample_tokens}: tokens to sample must be in 2..{max_sample} (min(1024, B*T))"),
        (a.sample_every == 0 or max_sample > 1,
         f"-s {a.sample_every}: a sample needs 2 tokens, and B*T is 1: raise -b or -t, or give -s 0"),
        (a.output_dir is not None or (a.checkpoint_every == 0 and a.resume == 0),
         "-n and -y 1 need a run directory: give -o DIR"),
        (a.output_dir != "", "-o '': give a run directory's path, or leave -o out to write nothing"),
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


@dataclass
class Plan:
    """What the flags and the files decide, read and checked before anything is written: the run
    directory and the checkpoint to go on from (with this rank's optimizer state), the model, the
    data, the batch and the number of steps."""
    run_dir: rundir.RunDir | None
    checkpoint: rundir.Checkpoint | None
    state: OptimizerState | None
    config: GPT2Config
    params: np.ndarray
    train_loader: DataLoader
    val_loader: DataLoader | None
    val_batches: int
    hellaswag: list | None
    tokenizer: list | None
    tokens_per_step: int
    grad_accum_steps: int
    num_steps: int
    sample_tokens: int


def plan(args, rank, nproc, restart):
    """The Plan of this run, or None when its newest checkpoint is at its last step already (the
    run is finished: nothing is changed); every problem with a flag or a file is one line and exit 1."""
    B, T = args.micro_batch_size, args.seq_len
    run_dir = rundir.RunDir(args.output_dir, rank) if args.output_dir is not None else None
    checkpoint = run_dir.checkpoint(args.resume or restart) if run_dir else None
    # a resumed run keeps its total batch, on any number of processes and -b
    tokens_per_step = checkpoint.batch(B, T, args.total_batch_size, nproc) if checkpoint else \
        B * T * nproc if args.total_batch_size == -1 else args.total_batch_size
    grad_accum_steps = tokens_per_step // (B * T * nproc)
    try:
        config, params = load_params(checkpoint.model_path) if checkpoint else load_or_init(args.model)
        if T > config.max_seq_len:
            fail(f"-t {T}: above the model's maximum sequence length {config.max_seq_len}")
        if args.sample_every and args.sample_tokens is not None and args.sample_tokens > config.max_seq_len:
            fail(f"-g {args.sample_tokens}: more tokens to sample than the model's maximum sequence length "
                 f"{config.max_seq_len}: lower -g")
        train_loader = DataLoader(args.train_data, B, T, config.vocab_size, rank, nproc,
                                  shuffle=not args.overfit_single_batch,
                                  layout=checkpoint.layout if checkpoint else None,
                                  grad_accum_steps=grad_accum_steps)
        val_loader = DataLoader(args.val_data, B, T, config.vocab_size, rank, nproc) if args.val_loss_every else None
        if args.hellaswag and not os.path.exists(HELLASWAG):
            fail(f"-h 1: no {HELLASWAG}: python -m prepro.hellaswag writes it")
        hellaswag = read_hellaswag(HELLASWAG) if args.hellaswag else None
        tokenizer = read_tokenizer(TOKENIZER)[0] if args.sample_every and os.path.exists(TOKENIZER) else None
    except (FormatError, ValueError) as e:
        path = getattr(e, "path", None)  # a FormatError's file
        flag = {args.train_data: "-i ", args.val_data: "-j "}.get(path, "")
        fail(f"{flag}{e}" + (" (the default data: python -m prepro.tinyshakespeare writes it)"
                             if path in (TRAIN_DATA, VAL_DATA) else ""))
    if checkpoint:
        checkpoint.check_data(args.train_data, train_loader.data_fingerprint)
    if hellaswag and 4 * (max(len(ex.context) + max(map(len, ex.endings)) for ex in hellaswag) - 1) > B * T:
        fail(f"-h 1: the longest HellaSwag example does not fit in B*T = {B * T} tokens: raise -b or -t")
    num_steps = args.max_steps if args.max_steps != -1 else train_loader.num_tokens // tokens_per_step
    if num_steps == 0:
        fail(f"-i {args.train_data}: {train_loader.num_tokens} tokens, less than one step of {tokens_per_step}: "
             f"set -x")
    if checkpoint and checkpoint.step > num_steps:
        fail(f"-x {args.max_steps}: nothing to train: the newest checkpoint in {args.output_dir} is at step "
             f"{checkpoint.step}, beyond step {num_steps}; raise -x to go on from it")
    if checkpoint and checkpoint.step == num_steps:  # its end-of-run evaluation is in main.log already
        print(f"-o {args.output_dir}: the run is finished: its newest checkpoint is at step {num_steps}, the last "
              f"one: nothing to train, and nothing is changed (raise -x to train on)")
        return None
    state = None
    if checkpoint:
        try:
            state = checkpoint.optimizer_state(nproc, rank, args.zero_stage)
            train_loader.restore(state.epoch, state.epoch_samples)
        except FormatError as e:
            fail(str(e))
        except ValueError as e:  # a position the data check let through: the trailer is not what it claims
            fail(f"{checkpoint.state_paths[0]}: {e}")
    val_batches = 0
    if val_loader:
        val_batches = val_loader.num_batches if args.val_batches == -1 else \
            min(args.val_batches, val_loader.num_batches)
    sample_tokens = args.sample_tokens if args.sample_tokens is not None else \
        min(SAMPLE_TOKENS, B * T, config.max_seq_len)
    return Plan(run_dir, checkpoint, state, config, params, train_loader, val_loader, val_batches, hellaswag,
                tokenizer, tokens_per_step, grad_accum_steps, num_steps, sample_tokens)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    check_args(args)
    process = distributed.identify(args.num_processes, args.process_rank, args.gpus_per_node)
    nproc = args.num_processes if process is None else process.world_size
    if args.device == "emulated" and nproc > 1:
        fail(f"--device emulated -pn {nproc}: the emulated device runs one process; use --device cpu for several")
    if args.total_batch_size != -1 and args.total_batch_size % (args.micro_batch_size * args.seq_len * nproc):
        fail(f"-d {args.total_batch_size}: the total batch must be a multiple of B*T*processes = "
             f"{args.micro_batch_size * args.seq_len * nproc}")
    if process is None:  # -pn N, and nothing gave this process a rank: it starts the N ranks itself
        sys.exit(launcher.launch(os.path.abspath(__file__), argv, nproc, args.device, args.max_restarts))
    if process.rank != 0:  # rank 0 prints and logs for all; every rank's errors still reach stderr
        sys.stdout = open(os.devnull, "w")
    restart = distributed.restart_count()  # torchrun's or our launcher's: a restart goes on as -y 1 would
    if restart:
        print(f"restart {restart} of this job (TORCHELASTIC_RESTART_COUNT): " + (
            f"going on from the newest checkpoint in {args.output_dir}, as -y 1 would" if args.output_dir is not None
            else "with no run directory (-o) to go on from, the run starts over"))
    run_plan = plan(args, process.rank, nproc, restart)  # everything that reads a file, before anything is written
    if run_plan is None:
        return

    K = select_backend(args.device, process.local_rank)
    comm = distributed.connect(process, K is not reference, args.init_method, args.server_address, args.fs_path,
                               args.rendezvous_timeout)
    model = GPT2(run_plan.config, run_plan.params, args.micro_batch_size, args.seq_len, K, recompute=args.recompute,
                 gelu_fusion=K.GELU_FUSION if args.gelu_fusion == -1 else args.gelu_fusion,
                 master_weights=bool(args.master_weights), world_size=nproc, rank=process.rank,
                 zero_stage=args.zero_stage)
    progress = Progress()
    if run_plan.checkpoint:
        load_optimizer_state(model, run_plan.state, run_plan.checkpoint.model_path)
        progress = Progress.restored(run_plan.state)
    print_banner(args, run_plan, model, comm, process, restart)
    log = run_plan.run_dir.start(progress.step, comm) if run_plan.run_dir else None
    train(args, run_plan, model, comm, progress, log)


def print_banner(args, run_plan, model, comm, process, restart):
    """What the run is about to do, as llm.c's start-up prints it, and every choice made for the user."""
    K, config, nproc, B, T = model.K, model.config, model.world_size, model.B, model.T
    p, checkpoint = run_plan, run_plan.checkpoint
    precision = "fp32" if model.params_memory.dtype == np.float32 else \
        "bf16, fp32 master weights" if model.master_weights is not None else "bf16, no master weights"
    gelu_choice = " (-1: this backend's choice)" if args.gelu_fusion == -1 else ""
    print(f"backend: {'NumPy' if K is reference else 'CUDA'} on {K.DEVICE} ({precision}) | recompute -r "
          f"{model.recompute} | GELU fusion -ge {model.gelu_fusion}{gelu_choice}")
    print(f"model: L={config.num_layers} NH={config.num_heads} C={config.channels} maxT={config.max_seq_len} "
          f"V={config.vocab_size} (padded {config.padded_vocab_size}) | parameters: {num_parameters(config):,}")
    val = f"{args.val_data} ({p.val_batches} batches every {args.val_loss_every} steps)" if p.val_loader else "off"
    print(f"train: {args.train_data} ({p.train_loader.num_tokens:,} tokens in {len(p.train_loader.files)} shard(s)"
          f"{', shuffled' if p.train_loader.shuffle else ''}) | val: {val}")
    print(f"batch: B={B} T={T} | {p.tokens_per_step:,} tokens per step, grad accumulation {p.grad_accum_steps} "
          f"| {p.num_steps} steps | lr {args.learning_rate:g} {args.lr_schedule}, warmup {args.warmup_steps}, final "
          f"fraction {args.final_lr_frac:g} | wd {args.weight_decay:g}")
    mib = 1 / 2**20
    master_mib = 0 if model.master_weights is None else model.master_weights.nbytes * mib
    print(f"memory ({K.DEVICE}): parameters {model.params_memory.nbytes * mib:.1f} MiB, gradients "
          f"{model.grads_memory.nbytes * mib:.1f} MiB, AdamW m+v {2 * model.m_memory.nbytes * mib:.1f} MiB, master "
          f"weights {master_mib:.1f} MiB, activations {model.acts_memory.nbytes * mib:.1f} MiB | peak host memory "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if K is reference:
        print_cpu_estimate(config, p.tokens_per_step, T, p.num_steps)
    if nproc > 1:
        print(f"processes: {nproc} (ranks from {process.source}), {comm.engine} collectives | ZeRO-{args.zero_stage}: "
              f"each rank keeps the AdamW state of {model.hi - model.lo:,} of {num_parameters(config):,} parameters")
    elif args.zero_stage:
        print("-z 1 with one process: there is nothing to shard, so ZeRO-1 changes nothing")
    if args.val_batches != -1 and p.val_loader and args.val_batches > p.val_batches:
        print(f"-m {args.val_batches}: the val split holds {p.val_batches} batches of B*T, so val loss uses those")
    if args.sample_every and args.sample_tokens is None and p.sample_tokens < SAMPLE_TOKENS:
        print(f"-g: samples are {p.sample_tokens} tokens, not {SAMPLE_TOKENS}: all that B*T = {B * T} and the model's "
              f"maximum sequence length {config.max_seq_len} allow (give -g to choose)")
    if args.sample_every and p.tokenizer is None:
        print(f"no tokenizer at {TOKENIZER} (python -m prepro.gpt2_tokenizer writes it): samples print as token ids")
    if checkpoint:
        print(f"resuming from {checkpoint.model_path} at step {checkpoint.step}")
        if change := checkpoint.change(nproc, B, args.zero_stage):
            print(change)
        if args.model != DEFAULT_MODEL:  # one given: -y 1 resumes the checkpoint's model whatever -e says
            print(f"-e {args.model}: not used, as -y 1 goes on with the checkpoint's model")
    elif p.run_dir and (args.resume or restart):
        print(f"{'-y 1' if args.resume else 'restart'}: no checkpoint in {args.output_dir} yet, starting from scratch")
    if not checkpoint and args.output_dir is not None and os.path.exists(os.path.join(args.output_dir, "main.log")):
        print(f"{os.path.join(args.output_dir, 'main.log')}: an earlier run's log, with no checkpoint to resume from, "
              f"is replaced by this run's")
    if p.run_dir:
        print(f"run directory: {args.output_dir}")


def print_cpu_estimate(config, tokens_per_step, T, num_steps):
    """On the CPU, a model of GPT-2's size takes minutes a step: say so before the first step, from the
    rate this machine's float32 matrix products reach, with what a small model would take instead."""
    flops = flops_per_token(config, T) * tokens_per_step
    if flops < SLOW_CPU_STEP * 1e10:  # fast even at 10 GFLOP/s, below any CPU's rate: not worth measuring
        return
    rate = matmul_rate()
    if flops / rate < SLOW_CPU_STEP:
        return
    small = flops_per_token(config_from_descriptor("d2"), T) * tokens_per_step / rate
    print(f"on the CPU: about {duration(flops / rate)} a step for this {num_parameters(config) / 1e6:.0f}M-parameter "
          f"model ({flops / 1e12:.2f} TFLOP at the {rate / 1e9:.0f} GFLOP/s this CPU's matmuls reach), "
          f"{duration(flops / rate * num_steps)} for {num_steps} steps; -e d2 takes about {duration(small)} a step")


def matmul_rate():
    """FLOP/s of NumPy's float32 matrix product here, at the size of a GPT-2 124M layer's MLP on 512 tokens."""
    a, b = np.ones((512, 768), np.float32), np.ones((768, 3072), np.float32)
    a @ b
    t0 = time.perf_counter()
    for _ in range(3):
        a @ b
    return 3 * 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - t0)


def duration(seconds):
    """seconds as a person reads a time to wait: '0.4 s', '42 s', '7m05s', '3h12m'."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = int(seconds // 60)
    return f"{minutes}m{int(seconds % 60):02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def train(args, run_plan, model, comm, progress, log):
    """The loop, from progress.step to the plan's last step: at each step, first the checkpoint, then
    the evaluations due, then one update."""
    p, K, nproc = run_plan, model.K, model.world_size
    sampler = Sampler(model, p.sample_tokens) if args.sample_every and model.rank == 0 else None  # before the loop
    resume_step, first_step = progress.step if p.checkpoint else None, progress.step
    ema_tok_s, timed_s, timed_steps, started = 0.0, 0.0, 0, time.perf_counter()
    peak, step_flops_per_token = peak_flops(K.DEVICE), flops_per_token(model.config, model.T)
    for step in range(first_step, p.num_steps + 1):
        last_step = step == p.num_steps
        # the checkpoint first: nothing that evaluates the model (val loss, HellaSwag, a sample) can lose training
        n = args.checkpoint_every
        if n and step != resume_step and ((step > 0 and step % n == 0) or last_step):
            progress.step = step
            p.run_dir.save(step, comm, lambda path: save_model(model, path),
                           checkpoint_state(model, p.train_loader, p.tokens_per_step, progress))
            if model.rank == 0:
                p.run_dir.prune(args.checkpoints_keep, args.major_checkpoint_every)
        evaluate(args, p, model, comm, step, last_step, sampler, log)
        if last_step:
            break

        t0 = time.perf_counter()
        if args.overfit_single_batch:
            p.train_loader.reset()
        loss, norm = gradients(model, comm, p.train_loader, p.grad_accum_steps)
        if not (math.isfinite(loss) and math.isfinite(norm)):  # the same on every rank, so every rank stops here
            saved = p.run_dir.done_steps() if p.run_dir else []
            fail(f"step {step + 1}/{p.num_steps}: the loss is {loss} and the grad norm {norm}: training diverged, and "
                 f"this update is not made; lower -l" + (f", and resume from the checkpoint at step {saved[-1]} "
                                                          f"with -y 1" if saved else ""))
        lr = learning_rate(args.lr_schedule, step, p.num_steps, args.learning_rate, args.warmup_steps,
                           args.final_lr_frac)
        zloss, znorm = progress.loss_detector.update(loss), progress.norm_detector.update(norm)
        if args.skip_update_lossz and zloss > args.skip_update_lossz:
            print(f"skipping update due to loss z-score of {zloss:f}")
        elif args.skip_update_gradz and znorm > args.skip_update_gradz:
            print(f"skipping update due to grad z-score of {znorm:f}")
        else:
            progress.rng_state_last_update = progress.rng_state
            progress.rng_state, seed = xorshift_u32(progress.rng_state)
            update(model, lr, args.weight_decay, step, K.clip_scale(norm, GRAD_CLIP), seed)
            if model.zero_stage == 1:
                comm.all_gather(model.params_memory)  # every rank's updated shard, to every rank
        K.synchronize()
        seconds = time.perf_counter() - t0
        tok_s = p.tokens_per_step / seconds
        if step > 0:  # the first step warms up; tok/s is an EMA, bias-corrected as in AdamW
            timed_s, timed_steps = timed_s + seconds, timed_steps + 1
            ema_tok_s = 0.95 * ema_tok_s + 0.05 * tok_s
            tok_s = ema_tok_s / (1 - 0.95 ** timed_steps)
        mfu = f"{100 * step_flops_per_token * tok_s / (peak * nproc):.1f}%" if peak else "n/a"  # per GPU
        # time left: the wall time per step so far (evaluations and checkpoints included), for the steps to go
        left = (time.perf_counter() - started) / (step + 1 - first_step) * (p.num_steps - step - 1)
        print(f"step {step + 1:4d}/{p.num_steps} | loss {loss:.6f} ({zloss:+.2f}z)| norm {norm:6.4f} ({znorm:+.2f}z)"
              f"| lr {lr:.2e} | {1000 * seconds:.2f} ms | {mfu} MFU | {tok_s:.0f} tok/s | {duration(left)} left",
              flush=True)
        if log:
            log.write(f"s:{step} trl:{loss:.4f} lr:{lr:.6f} norm:{norm:.2f}")

    if timed_steps:
        print(f"total average iteration time: {1000 * timed_s / timed_steps:.2f} ms")
    print(f"peak host memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if p.run_dir:
        print(f"run directory: {args.output_dir}")


def evaluate(args, run_plan, model, comm, step, last_step, sampler, log):
    """The evaluations due at step: val loss (every -v steps and at the end), HellaSwag (with it, from
    the first -v on) and a sample (every -s steps and at the end), each in main.log where it has a line."""
    p, nproc, rank, every = run_plan, model.world_size, model.rank, args.val_loss_every
    if p.val_loader and (step % every == 0 or last_step):
        # each rank has its own batches
        loss = comm.sum([val_loss(model, p.val_loader, p.val_batches, rank == 0)])[0] / nproc
        if not math.isfinite(loss):
            fail(f"step {step}: the val loss is {loss}: the model diverged; lower -l")
        print(f"val loss {loss:.6f}")
        if log:
            log.write(f"s:{step} tel:{loss:.4f}")
    if p.hellaswag and ((step > 0 and every and step % every == 0) or last_step):
        accuracy = comm.sum([hellaswag_correct(model, p.hellaswag[rank::nproc], rank == 0)])[0] / len(p.hellaswag)
        print(f"HellaSwag: {accuracy:.4f} of {len(p.hellaswag)}")
        if log:
            log.write(f"s:{step} eval:{accuracy:.4f}")
    if sampler and ((step > 0 and step % args.sample_every == 0) or last_step):
        print("generating:\n---")
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            for token in sampler.generate([GPT2_EOT], p.sample_tokens - 1, seed=(1337, step)):
                print(decoder.decode(p.tokenizer[token]) if p.tokenizer else f"{token} ", end="", flush=True)
        except ValueError as e:  # next_token's: logits that are not finite
            fail(f"step {step}: sampling: {e}; lower -l")
        print("\n---")


if __name__ == "__main__":
    np.seterr(over="ignore", invalid="ignore")  # a diverging run is said once, by the loop's loss check, as on the GPU
    try:
        run(main)
    except KeyboardInterrupt:  # checkpoints are whole or absent: the newest DONE is where -y 1 goes on
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except FormatError as e:  # a train shard's tokens are checked on its first use, which can be mid-run
        fail(str(e))

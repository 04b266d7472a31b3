"""Alignment of what the cuBLASLt matmuls see (kernels/cuda.py): one cached plan per shape serves
every layer, so it must run with a bias or pre-GELU (aux) pointer anywhere 16-byte aligned. Here, on
the CPU: the stand-in address the plans are made with is aligned to exactly 16 bytes, and every
parameter and activation slice the kernels are handed starts 16-byte aligned in the flat bf16
buffers (whose own start is 256-byte aligned: CuPy's allocations are), for GPT-2's widths and the
odd dN ones. tests/test_cuda_alignment.py checks the plans themselves on a GPU."""
import itertools
import math

import numpy as np
import pytest

import train_gpt2 as gpt
from fileformats import param_shapes
from kernels import alignment_standin

CUBLASLT_ALIGNMENT = 16  # kernels/cuda.py's, which imports only where a GPU is
BF16_BYTES = 2
NOT_PER_LAYER = ("wte", "wpe", "lnfw", "lnfb")
DEPTHS = (1, 2, 3, 5, 6, 7, 12, 24, 36, 48)  # dN: C = 64 N for most, GPT-2's 768, 1024, 1280, 1600 for 12 ... 48


def power_of_two_alignment(address):
    return address & -address if address else 1 << 64


@pytest.mark.parametrize("align", [1, 2, 8, 16, 256])
def test_standin_is_the_first_address_aligned_to_exactly_align(align):
    bases = [*range(0, 6 * align + 3), 2**40, 2**40 + align, 2**40 + 3 * align + 1]
    for base in bases:
        want = next(a for a in itertools.count(base) if a % align == 0 and a % (2 * align) != 0)
        got = alignment_standin(base, align)
        assert got == want, (base, align)
        assert power_of_two_alignment(got) == align and base <= got < base + 2 * align


def parameter_slice_offsets(config):
    """Byte offset of every tensor the kernels get from the flat bf16 parameter (and gradient) buffer:
    each whole tensor, and each layer's slice of the per-layer ones."""
    spans, _ = gpt.layout(param_shapes(config))
    for name, (sl, shape) in spans.items():
        yield name, sl.start * BF16_BYTES
        if name not in NOT_PER_LAYER:
            for l in range(shape[0]):
                yield f"{name}[{l}]", (sl.start + l * math.prod(shape[1:])) * BF16_BYTES


def activation_slice_offsets(config, B, T, recompute):
    """(name, byte offset, dtype) of every activation in the GPU's buffer (bf16 as uint16), and of
    each layer's slice of the per-layer ones."""
    spans, _ = gpt.activation_layout(gpt.activation_shapes(config, B, T, recompute), np.uint16)
    for name, (offset, shape, dtype) in spans.items():
        yield name, offset, dtype
        if len(shape) == 4:  # (L, ...): a layer's slice
            for l in range(shape[0]):
                yield f"{name}[{l}]", offset + l * math.prod(shape[1:]) * dtype.itemsize, dtype


@pytest.mark.parametrize("depth", DEPTHS)
def test_every_parameter_slice_is_16_byte_aligned_in_bf16(depth):
    config = gpt.config_from_descriptor(f"d{depth}")
    misaligned = {name: offset for name, offset in parameter_slice_offsets(config) if offset % CUBLASLT_ALIGNMENT}
    assert not misaligned


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("B,T", [(1, 1), (2, 37), (4, 64), (1, 1023), (16, 1024)])
@pytest.mark.parametrize("recompute", [0, 1, 2])
def test_every_bf16_activation_slice_is_16_byte_aligned(depth, B, T, recompute):
    """bf16 ones 16 bytes (vector loads, cuBLASLt); fp32 row statistics and int32 ids their element size."""
    config = gpt.config_from_descriptor(f"d{depth}")
    misaligned = {name: offset for name, offset, dtype in activation_slice_offsets(config, B, T, recompute)
                  if offset % (CUBLASLT_ALIGNMENT if dtype == np.uint16 else dtype.itemsize)}
    assert not misaligned


def test_d48_layer_biases_are_only_128_byte_aligned_at_odd_layers():
    """Why a plan must not keep the alignment of the first layer's pointers: at C=1600, layer l's qkvb
    starts 9600 l bytes after layer 0's, its attprojb and fcprojb 3200 l bytes (2^7 times an odd
    number at odd l), and layer 0's are 256-byte aligned, cuBLASLt's default assumption."""
    offsets = dict(parameter_slice_offsets(gpt.config_from_descriptor("d48")))
    for name in ("qkvb", "attprojb", "fcprojb"):
        assert power_of_two_alignment(offsets[f"{name}[0]"]) >= 256
        assert min(power_of_two_alignment(offsets[f"{name}[{l}]"]) for l in range(1, 48, 2)) == 128, name

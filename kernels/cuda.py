"""The CUDA backend: each function has the signature of its NumPy twin in reference.py and runs
that layer's hand-written kernel (kernels/<layer>.cu) on CuPy views of the flat GPU buffers.

Tensors are CuPy arrays: bf16 ones (parameters, gradients, activations) are uint16 arrays holding
the raw bf16 bits (CuPy has no bf16 dtype); row statistics (mean, rstd, lse), losses, AdamW's m,
v and master weights are float32; token ids int32. Every array is C-contiguous (a view into a flat
buffer). The conventions on what is overwritten and what is accumulated are reference.py's.

Kernels run on CuPy's current stream, one after another, so a scratch buffer can be shared by all
of them (`scratch`). Importing this module needs a CUDA device: the cubins for its architecture
are built (or found in kernels/build/) then, once.
"""
import functools

import cupy as cp
import ml_dtypes
import numpy as np
from nvmath.bindings import cublasLt as _lt

from kernels import alignment_standin, build, device_arch, reference

clip_scale = reference.clip_scale  # a rule on the host, the same on both backends

_CAPABILITY = cp.cuda.Device().compute_capability  # e.g. "90"
ARCH = device_arch(_CAPABILITY)
DEVICE = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
FLOAT = np.dtype(np.uint16)  # parameters, gradients and activations: bf16 bits
# -ge -1: llm.c's choice, cuBLASLt's GELU epilogues (forward and backward) on Hopper and newer only
GELU_FUSION = 2 if int(_CAPABILITY) >= 90 else 0
_MODULES = {stem: cp.RawModule(path=str(path)) for stem, path in build(ARCH).items()}


@functools.cache  # looked up once per kernel, not on every launch in the step loop
def kernel(stem, name):
    """The __global__ function `name` (declared extern "C") of kernels/<stem>.cu."""
    return _MODULES[stem].get_function(name)


_scratch = cp.empty(0, dtype=cp.uint8)


def scratch(nbytes):
    """A device buffer of at least nbytes, shared by every kernel (they run in stream order). It
    grows only when a larger one is asked for, which happens in a run's first step, so nothing is
    allocated after step 1."""
    global _scratch
    if _scratch.nbytes < nbytes:
        _scratch = cp.empty(nbytes, dtype=cp.uint8)
    return _scratch


def zeros(n, dtype):
    return cp.zeros(n, dtype)


def upload(dst, src):
    """dst (device) = src, a host array of dst's shape: fp32 values go into a bf16 array rounded to
    nearest even (ml_dtypes), and into fp32 or int32 arrays as they are."""
    src = np.ascontiguousarray(src)
    if dst.dtype == FLOAT:
        src = src.astype(np.float32, copy=False).astype(ml_dtypes.bfloat16).view(np.uint16)
    assert src.dtype == dst.dtype and src.shape == dst.shape and dst.flags.c_contiguous, (src.dtype, dst.dtype)
    dst.set(src)


def download(src):
    """src as a host array: bf16 as fp32 (exactly), fp32 and int32 as they are."""
    host = src.get()
    return host.view(ml_dtypes.bfloat16).astype(np.float32) if host.dtype == FLOAT else host


def synchronize():
    """Wait for every kernel launched so far (the step's timing)."""
    cp.cuda.get_current_stream().synchronize()


def ceil_div(a, b):
    return -(-a // b)


def i32(x):
    return np.int32(x)


def f32(x):
    return np.float32(x)


def check(dtype, *arrays, align=1):
    """Every wrapper's invariants on its arrays: the dtype, C-contiguous (a view into a flat
    buffer), and the pointer `align`-byte aligned (16 where a kernel reads rows as bf16x8 chunks)."""
    for a in arrays:
        assert a.dtype == dtype and a.flags.c_contiguous and a.data.ptr % align == 0, (a.dtype, a.shape, align)


# ----------------------------------------------------------------------------- encoder, layernorm, gelu

_BLOCK = 256                  # threads per block of the elementwise and per-chunk kernels
_LN_ROWS_PER_BLOCK = 8        # layernorm forward: one warp per row, 8 warps per block
_LN_BWD_MAX_BLOCKS = 1024     # layernorm backward: row groups, each leaving one row of partial sums
_ENC_WTE_BLOCK = (32, 16)     # encoder_backward_wte: (chunks, row lanes); 16 is ROWS in encoder.cu


def encoder_forward(out, inp, wte, wpe):
    B, T = inp.shape
    C = wte.shape[1]
    check(cp.int32, inp)
    assert C % 8 == 0 and out.shape == (B, T, C) and wpe.shape[1] == C and T <= wpe.shape[0]
    assert B * T * C < 2**31
    check(cp.uint16, out, wte, wpe, align=16)
    threads = B * T * (C // 8)
    kernel("encoder", "encoder_forward")((ceil_div(threads, _BLOCK),), (_BLOCK,),
                                         (out, inp, wte, wpe, i32(B * T), i32(T), i32(C)))


def encoder_backward(dwte, dwpe, dout, inp):
    B, T = inp.shape
    C = dwte.shape[1]
    check(cp.int32, inp)
    assert C % 8 == 0 and dout.shape == (B, T, C) and dwpe.shape[1] == C and T <= dwpe.shape[0]
    assert B * T * C < 2**31
    check(cp.uint16, dwte, dwpe, dout, align=16)
    kernel("encoder", "encoder_backward_wpe")((ceil_div(T * (C // 8), _BLOCK),), (_BLOCK,),
                                              (dwpe, dout, i32(B), i32(T), i32(C)))
    # positions grouped by token id, each group in position order (stable), so that every dwte row
    # is summed in an order fixed by the inputs
    order = cp.argsort(inp.reshape(-1), kind="stable")
    assert order.dtype == cp.int64
    kernel("encoder", "encoder_backward_wte")((B * T,), _ENC_WTE_BLOCK, (dwte, dout, inp, order, i32(B * T), i32(C)))


def layernorm_forward(out, mean, rstd, inp, weight, bias):
    C = inp.shape[-1]
    N = inp.size // C
    assert C % 8 == 0 and out.shape == inp.shape and weight.shape == bias.shape == (C,)
    assert mean.size == rstd.size == N and inp.size < 2**31
    check(cp.uint16, out, inp, weight, bias, align=16)
    check(cp.float32, mean, rstd)
    kernel("layernorm", "layernorm_forward")((ceil_div(N, _LN_ROWS_PER_BLOCK),), (32 * _LN_ROWS_PER_BLOCK,),
                                             (out, mean, rstd, inp, weight, bias, i32(N), i32(C)))


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
    C = inp.shape[-1]
    N = inp.size // C
    assert C % 8 == 0 and C // 8 <= 512 and N > 0 and inp.size < 2**31
    assert dinp.shape == dout.shape == inp.shape and dweight.shape == dbias.shape == weight.shape == (C,)
    assert mean.size == rstd.size == N
    check(cp.uint16, dinp, dweight, dbias, dout, inp, weight, align=16)
    check(cp.float32, mean, rstd)
    blocks = min(N, _LN_BWD_MAX_BLOCKS)
    partials = scratch(blocks * 2 * C * 4)  # fp32 (blocks, 2C): dweight | dbias sums per block
    kernel("layernorm", "layernorm_backward")((blocks,), (ceil_div(C // 8, 32) * 32,),
                                              (dinp, partials, dout, inp, weight, mean, rstd, i32(N), i32(C)))
    kernel("layernorm", "layernorm_backward_reduce")((ceil_div(2 * C, 32),), (32, 32),
                                                     (dweight, dbias, partials, i32(blocks), i32(C)))


def residual_forward(out, inp1, inp2):
    assert out.shape == inp1.shape == inp2.shape and out.size % 8 == 0 and out.size < 2**31
    check(cp.uint16, out, inp1, inp2, align=16)
    chunks = out.size // 8
    kernel("layernorm", "residual_forward")((ceil_div(chunks, _BLOCK),), (_BLOCK,), (out, inp1, inp2, i32(chunks)))


def fused_residual_forward(residual, normed, mean, rstd, inp1, inp2, weight, bias):
    C = inp1.shape[-1]
    N = inp1.size // C
    assert C % 8 == 0 and residual.shape == normed.shape == inp1.shape == inp2.shape
    assert weight.shape == bias.shape == (C,) and mean.size == rstd.size == N and inp1.size < 2**31
    check(cp.uint16, residual, normed, inp1, inp2, weight, bias, align=16)
    check(cp.float32, mean, rstd)
    kernel("layernorm", "fused_residual_forward")(
        (ceil_div(N, _LN_ROWS_PER_BLOCK),), (32 * _LN_ROWS_PER_BLOCK,),
        (residual, normed, mean, rstd, inp1, inp2, weight, bias, i32(N), i32(C)))


def gelu_forward(out, inp):
    N = inp.size
    assert out.size == N and 0 < N < 2**31
    check(cp.uint16, out, inp, align=16)
    threads = N // 8 + N % 8  # a thread per whole chunk of 8, then one per leftover value
    kernel("gelu", "gelu_forward")((ceil_div(threads, _BLOCK),), (_BLOCK,), (out, inp, i32(N)))


def gelu_backward(dinp, inp, dout):
    N = inp.size
    assert dinp.size == dout.size == N and 0 < N < 2**31
    check(cp.uint16, dinp, inp, dout, align=16)
    threads = N // 8 + N % 8
    kernel("gelu", "gelu_backward")((ceil_div(threads, _BLOCK),), (_BLOCK,), (dinp, inp, dout, i32(N)))


# ----------------------------------------------------------------------------- matmul
#
# The GEMMs go through cuBLASLt (NVIDIA's bindings in nvmath-python), as llm.c does: a row-major (rows, cols) bf16 tensor is, to cuBLASLt, a
# column-major (cols x rows) matrix, so out (B*T, OC) = inp @ weight^T is computed as the
# column-major D (OC x B*T) = op(weight) @ inp with op = transpose. bf16 A/B/C/D, fp32 compute and
# fp32 alpha/beta; the bias add and GELU (forward), GELU's derivative (backward) run in the
# epilogue, on the fp32 result before its one rounding to bf16. The bias gradient is our kernel
# (kernels/matmul.cu). Descriptors and the algorithm cuBLASLt's heuristic picks are made once per
# (shape, epilogue) and kept, so a training step after the first asks cuBLASLt nothing but to run.
# One plan serves every layer, whose biases and pre-GELU buffers are 16-byte aligned but not always
# more (at C=1600 layer l's qkvb starts 9600 l bytes after layer 0's: 128-byte aligned at odd l).
# The heuristic may pick by the alignment of the bias and aux pointers it is shown, which no
# preference bounds as MIN_ALIGNMENT_*_BYTES do for A-D; so a plan is made with stand-in pointers
# aligned to exactly 16 bytes (kernels.alignment_standin), and every call asserts that its real
# ones are 16-byte aligned.

CUBLAS_COMPUTE_32F = 68
CUDA_R_32F = 0
CUDA_R_16BF = 14
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLASLT_WORKSPACE_BYTES = 32 * 1024 * 1024  # llm.c's size for Hopper
# cuBLASLt's bf16 tensor-core kernels want 16-byte aligned pointers; a view into a flat buffer at
# an offset that is a multiple of 8 elements has that (asserted on every call). By default the
# heuristic assumes 256-byte aligned pointers, so it is told that 16 is all it can count on.
CUBLASLT_ALIGNMENT = 16
# Split-K partial sums only in fp32 (not in bf16, the output type): fp32 accumulation throughout.
CUBLASLT_REDUCTION_SCHEMES = int(_lt.ReductionScheme.COMPUTE_TYPE)
MATMUL_DBIAS_ROWS_PER_SLAB = 64  # DBIAS_ROWS_PER_SLAB in kernels/matmul.cu

_cublaslt = None       # (handle, workspace, preference, stand-in address, its buffer), made on first use
_matmul_plans = {}     # (m, n, k, transa, transb, epilogue) -> (desc, A, B, D layouts, heuristic)
_ALPHA = np.ones(1, dtype=np.float32)   # host scalars, read by cuBLASLt when the call is made
_BETA_OVERWRITE = np.zeros(1, dtype=np.float32)
_BETA_ACCUMULATE = np.ones(1, dtype=np.float32)


def _lt_set(setter, dtype_of, obj, attr, value):
    """Set one cuBLASLt attribute from a host value of the attribute's own type."""
    buf = np.array(value, dtype=dtype_of(attr))
    setter(obj, attr, buf.ctypes.data, buf.nbytes)


def _set_desc(desc, attr, value):
    _lt_set(_lt.matmul_desc_set_attribute, _lt.get_matmul_desc_attribute_dtype, desc, attr, value)


def _cublaslt_context():
    global _cublaslt
    if _cublaslt is None:
        handle = _lt.create()
        workspace = cp.empty(CUBLASLT_WORKSPACE_BYTES, dtype=cp.uint8)
        pref = _lt.matmul_preference_create()
        P = _lt.MatmulPreferenceAttribute
        for attr, value in ((P.MAX_WORKSPACE_BYTES, CUBLASLT_WORKSPACE_BYTES),
                            (P.REDUCTION_SCHEME_MASK, CUBLASLT_REDUCTION_SCHEMES),
                            (P.MIN_ALIGNMENT_A_BYTES, CUBLASLT_ALIGNMENT),
                            (P.MIN_ALIGNMENT_B_BYTES, CUBLASLT_ALIGNMENT),
                            (P.MIN_ALIGNMENT_C_BYTES, CUBLASLT_ALIGNMENT),
                            (P.MIN_ALIGNMENT_D_BYTES, CUBLASLT_ALIGNMENT)):
            _lt_set(_lt.matmul_preference_set_attribute, _lt.get_matmul_preference_attribute_dtype,
                    pref, attr, value)
        standin = cp.empty(2 * CUBLASLT_ALIGNMENT, dtype=cp.uint8)  # never read: its address is shown
        _cublaslt = (handle, workspace, pref, alignment_standin(standin.data.ptr, CUBLASLT_ALIGNMENT), standin)
    return _cublaslt


def _matmul_plan(handle, pref, standin, m, n, k, transa, transb, epilogue, with_bias, with_aux):
    """The descriptors of D (m x n, ld m) = op(A) @ op(B) with `epilogue`, and cuBLASLt's pick for
    any 16-byte aligned bias and aux: the heuristic sees them at `standin`."""
    D = _lt.MatmulDescAttribute
    desc = _lt.matmul_desc_create(CUBLAS_COMPUTE_32F, CUDA_R_32F)
    _set_desc(desc, D.TRANSA, CUBLAS_OP_T if transa else CUBLAS_OP_N)
    _set_desc(desc, D.TRANSB, CUBLAS_OP_T if transb else CUBLAS_OP_N)
    _set_desc(desc, D.EPILOGUE, epilogue)
    if with_bias:
        _set_desc(desc, D.BIAS_DATA_TYPE, CUDA_R_16BF)
        _set_desc(desc, D.BIAS_POINTER, standin)
    if with_aux:  # pre-GELU values, laid out like D
        _set_desc(desc, D.EPILOGUE_AUX_LD, m)
        _set_desc(desc, D.EPILOGUE_AUX_POINTER, standin)
    a_layout = _lt.matrix_layout_create(CUDA_R_16BF, *((k, m) if transa else (m, k)), k if transa else m)
    b_layout = _lt.matrix_layout_create(CUDA_R_16BF, *((n, k) if transb else (k, n)), n if transb else k)
    d_layout = _lt.matrix_layout_create(CUDA_R_16BF, m, n, m)
    heuristic = _lt.MatmulHeuristicResult()
    found = np.zeros(1, dtype=np.int32)
    _lt.matmul_algo_get_heuristic(handle, desc, a_layout, b_layout, d_layout, d_layout, pref, 1,
                                  heuristic.ptr, found.ctypes.data)
    if found[0] == 0:
        raise RuntimeError(f"cuBLASLt has no algorithm for the bf16 matmul m={m} n={n} k={k} "
                           f"transa={transa} transb={transb} epilogue={_lt.Epilogue(epilogue).name}")
    return desc, a_layout, b_layout, d_layout, heuristic


def _cublaslt_matmul(d, a, b, m, n, k, transa, transb, epilogue, bias=None, aux=None, accumulate=False):
    """Column-major D (m x n, ld m) = op(A) @ op(B), plus D itself if accumulate, through `epilogue`
    (bias: m values; aux: m x n, ld m). All bf16, C-contiguous, 16-byte aligned."""
    check(cp.uint16, *(x for x in (d, a, b, bias, aux) if x is not None), align=CUBLASLT_ALIGNMENT)
    handle, workspace, pref, standin, _ = _cublaslt_context()
    epilogue = int(epilogue)
    key = (m, n, k, transa, transb, epilogue)
    plan = _matmul_plans.get(key)
    if plan is None:
        plan = _matmul_plans[key] = _matmul_plan(handle, pref, standin, *key, bias is not None, aux is not None)
    desc, a_layout, b_layout, d_layout, heuristic = plan
    # the pointers change from call to call (another layer's weights): cuBLASLt reads the
    # descriptor when the call is made, so setting them on the shared descriptor is enough
    if bias is not None:
        _set_desc(desc, _lt.MatmulDescAttribute.BIAS_POINTER, bias.data.ptr)
    if aux is not None:
        _set_desc(desc, _lt.MatmulDescAttribute.EPILOGUE_AUX_POINTER, aux.data.ptr)
    beta = _BETA_ACCUMULATE if accumulate else _BETA_OVERWRITE
    # heuristic.ptr is the address of its first field, the algorithm
    _lt.matmul(handle, desc, _ALPHA.ctypes.data, a.data.ptr, a_layout, b.data.ptr, b_layout,
               beta.ctypes.data, d.data.ptr, d_layout, d.data.ptr, d_layout, heuristic.ptr,
               workspace.data.ptr, workspace.nbytes, cp.cuda.get_current_stream().ptr)


def matmul_forward(out, inp, weight, bias, pre_gelu=None):
    OC, C = weight.shape
    BT = inp.size // C
    assert inp.shape[-1] == C and inp.size == BT * C and out.size == BT * OC and out.shape[-1] == OC
    assert bias is None or bias.shape == (OC,)
    E = _lt.Epilogue
    if pre_gelu is None:
        epilogue = E.DEFAULT if bias is None else E.BIAS
    else:
        assert pre_gelu.shape == out.shape and OC % 8 == 0, "GELU's aux buffer wants a leading dimension % 8"
        epilogue = E.GELU_AUX if bias is None else E.GELU_AUX_BIAS
    # column-major: out^T (OC x BT) = weight^T-op (C x OC stored, transposed) @ inp^T (C x BT)
    _cublaslt_matmul(out, weight, inp, OC, BT, C, True, False, epilogue, bias=bias, aux=pre_gelu)


def matmul_backward(dinp, dweight, dbias, dout, inp, weight, pre_gelu=None):
    OC, C = weight.shape
    BT = inp.size // C
    assert inp.shape[-1] == C and dinp.shape == inp.shape and dout.size == BT * OC and dout.shape[-1] == OC
    assert dweight.shape == weight.shape
    # dweight^T (C x OC, column-major) += inp^T (C x BT) @ dout (BT x OC): beta = 1 accumulates
    _cublaslt_matmul(dweight, inp, dout, C, OC, BT, False, True, _lt.Epilogue.DEFAULT, accumulate=True)
    if dbias is not None:
        check(cp.uint16, dbias)  # dout was checked (16-byte aligned rows) by the dweight matmul above
        assert dbias.shape == (OC,) and OC % 8 == 0
        num_slabs = ceil_div(BT, MATMUL_DBIAS_ROWS_PER_SLAB)
        assert num_slabs <= 65535, "grid.y limit"
        partials = scratch(4 * num_slabs * OC)
        kernel("matmul", "matmul_dbias_partials")((ceil_div(OC, 256), num_slabs), (32, 8),
                                                  (partials, dout, i32(BT), i32(OC)))
        kernel("matmul", "matmul_dbias_accumulate")((ceil_div(OC, 32),), (32, 8),
                                                    (dbias, partials, i32(num_slabs), i32(OC)))
    # dinp^T (C x BT) = weight (C x OC stored) @ dout^T (OC x BT), times gelu'(pre_gelu) if given
    if pre_gelu is None:
        _cublaslt_matmul(dinp, weight, dout, C, BT, OC, False, False, _lt.Epilogue.DEFAULT)
    else:
        assert pre_gelu.shape == dinp.shape and C % 8 == 0, "GELU's aux buffer wants a leading dimension % 8"
        _cublaslt_matmul(dinp, weight, dout, C, BT, OC, False, False, _lt.Epilogue.DGELU, aux=pre_gelu)


# ----------------------------------------------------------------------------- attention

ATTENTION_HEAD_SIZE, ATTENTION_TILE = 64, 64  # attention.cu's HS and TILE


def attention_forward(out, lse, qkv):
    B, NH, T = lse.shape
    assert qkv.shape == (B, T, 3 * NH * ATTENTION_HEAD_SIZE) and out.shape == (B, T, NH * ATTENTION_HEAD_SIZE)
    check(cp.uint16, out, qkv, align=16)
    check(cp.float32, lse)
    assert B * NH <= 65535, "grid.y limit"
    grid = (ceil_div(T, ATTENTION_TILE), B * NH)
    kernel("attention", "attention_forward")(grid, (128,), (out, lse, qkv, i32(T), i32(NH)))


def attention_backward(dqkv, dout, qkv, out, lse):
    B, NH, T = lse.shape
    assert dqkv.shape == qkv.shape == (B, T, 3 * NH * ATTENTION_HEAD_SIZE) and dout.shape == out.shape
    check(cp.uint16, dqkv, dout, qkv, out, align=16)
    check(cp.float32, lse)
    assert B * NH <= 65535, "grid.y limit"
    grid = (ceil_div(T, ATTENTION_TILE), B * NH)
    args = (dqkv, dout, qkv, out, lse, i32(T), i32(NH))
    kernel("attention", "attention_backward_dq")(grid, (128,), args)
    kernel("attention", "attention_backward_dkdv")(grid, (128,), args)


# ----------------------------------------------------------------------------- classifier

CLASSIFIER_THREADS = 512  # one block per row; 50304 / 8 vectors is ~12 per thread


def fused_classifier(logits, losses, targets, vocab_size, dloss, write_dlogits):
    Vp = logits.shape[-1]
    rows = logits.size // Vp
    check(cp.uint16, logits, align=16)
    check(cp.float32, losses)
    check(cp.int32, targets)
    assert losses.size == rows and targets.size == rows
    assert Vp % 8 == 0 and 0 < vocab_size <= Vp
    kernel("classifier", "fused_classifier_kernel")(
        (rows,), (CLASSIFIER_THREADS,),
        (logits, losses, targets, i32(vocab_size), i32(Vp), f32(dloss), i32(bool(write_dlogits))))


# ----------------------------------------------------------------------------- optimizer

ADAMW_THREADS = 512
NORM_BLOCKS = 1024  # fixed, not the device's SM count: the order of the sum depends on N alone
NORM_THREADS = 512


def global_norm(grads):
    check(cp.uint16, grads)
    n = grads.size
    head = min((-grads.data.ptr) % 16 // 2, n)  # elements before the first 16-byte boundary
    buf = scratch(4 * NORM_BLOCKS + 8)
    partials = buf[:4 * NORM_BLOCKS].view(cp.float32)
    norm = buf[4 * NORM_BLOCKS:4 * NORM_BLOCKS + 8].view(cp.float64)
    kernel("global_norm", "global_norm_partials")((NORM_BLOCKS,), (NORM_THREADS,),
                                                  (partials, grads, np.int64(n), i32(head)))
    kernel("global_norm", "global_norm_finish")((1,), (32,), (norm, partials, i32(NORM_BLOCKS)))
    return float(norm.get()[0])


def adamw(params, grads, m, v, master, t, lr, beta1, beta2, eps, weight_decay, grad_scale, seed, offset=0):
    n = params.size
    check(cp.uint16, params, grads)
    check(cp.float32, m, v)
    assert grads.size == n and m.size == n and v.size == n
    assert 0 <= seed < 2**64 and offset >= 0
    # the twin's scalars, folded in float64 as it folds them, then rounded to fp32 as NumPy does
    scalars = (f32(beta1), f32(1.0 - beta1), f32(beta2), f32(1.0 - beta2), f32(1.0 / np.sqrt(1.0 - beta2 ** t)),
               f32(eps), f32(1.0 - lr * weight_decay), f32(lr / (1.0 - beta1 ** t)), f32(grad_scale), np.uint64(seed),
               np.int64(offset))
    grid = (ceil_div(n, ADAMW_THREADS),)
    if master is None:
        kernel("adamw", "adamw_kernel")(grid, (ADAMW_THREADS,), (params, grads, m, v, np.int64(n), *scalars))
    else:
        check(cp.float32, master)
        assert master.size == n
        kernel("adamw", "adamw_master_kernel")(grid, (ADAMW_THREADS,),
                                               (params, grads, m, v, master, np.int64(n), *scalars))


def bf16_to_float(out, inp):
    """out (fp32) = inp (bf16), exactly: the master weights' starting values."""
    check(cp.float32, out)
    check(cp.uint16, inp)
    assert out.size == inp.size
    n = inp.size
    kernel("adamw", "bf16_to_float_kernel")((ceil_div(n, ADAMW_THREADS),), (ADAMW_THREADS,), (out, inp, np.int64(n)))


def float_to_bf16(out, inp):
    """out (bf16) = inp (fp32) rounded to nearest even."""
    check(cp.uint16, out)
    check(cp.float32, inp)
    assert out.size == inp.size
    n = inp.size
    kernel("adamw", "float_to_bf16_kernel")((ceil_div(n, ADAMW_THREADS),), (ADAMW_THREADS,), (out, inp, np.int64(n)))

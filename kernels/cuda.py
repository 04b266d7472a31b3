"""The CUDA backend: each method has the signature of its NumPy twin in reference.py (the interface
is kernels/backend.py) and launches that layer's hand-written kernel (kernels/<layer>.cu) on views
of the flat device buffers.

It runs on a device, the one seam between this file and the hardware (kernels.gpu.GPU: CuPy and
cuBLASLt; kernels.emulated.Emulated: the same .cu sources built for the CPU, NumPy arrays, NumPy
for cuBLASLt's matmuls). Everything here (the launch shapes, the arguments, the checks, the
cuBLASLt problem each matmul poses) is the same on both, so the emulated device runs this code as
the GPU does. kernels.cuda_backend(name) makes one.

Tensors: bf16 ones (parameters, gradients, activations) are uint16 arrays holding the raw bf16 bits
(CuPy has no bf16 dtype); row statistics (mean, rstd, lse), losses, AdamW's m, v and master
weights are float32; token ids int32. Every array is C-contiguous (a view into a flat buffer). The
conventions on what is overwritten and what is accumulated are reference.py's.

Kernels run one after another in stream order, so one scratch buffer serves all of them.
"""
import re

import ml_dtypes
import numpy as np

from kernels import KERNEL_DIR, reference

# Launch shapes that the kernels' code depends on: kernels/shapes.cuh defines them for both sides.
SHAPES = {name: int(value) for name, value in
          re.findall(r"^constexpr int (\w+) = (\d+);", (KERNEL_DIR / "shapes.cuh").read_text(), re.M)}
HS, ATTENTION_TILE, ATTENTION_THREADS = (SHAPES[k] for k in ("ATTENTION_HEAD_SIZE", "ATTENTION_TILE",
                                                               "ATTENTION_THREADS"))

BLOCK = 256                  # threads per block of the elementwise and per-chunk kernels
LN_ROWS_PER_BLOCK = 8        # layernorm forward: one warp per row, 8 warps per block
LN_BWD_MAX_BLOCKS = 1024     # layernorm backward: row groups, each leaving one row of partial sums
CLASSIFIER_THREADS = 512     # one block per row; 50304 / 8 vectors is ~12 per thread
ADAMW_THREADS = 512
NORM_BLOCKS = 1024           # fixed, not the device's SM count: the order of the sum depends on N alone
NORM_THREADS = 512
# cuBLASLt's bf16 tensor-core kernels want 16-byte aligned pointers; a view into a flat buffer at
# an offset that is a multiple of 8 elements has that (checked on every call, on both devices)
MATMUL_ALIGNMENT = 16


def ceil_div(a, b):
    return -(-a // b)


def i32(x):
    return np.int32(x)


def f32(x):
    return np.float32(x)


class Cuda:
    """The CUDA kernels on `device` (kernels.gpu.GPU or kernels.emulated.Emulated)."""

    FLOAT = np.dtype(np.uint16)  # parameters, gradients and activations: bf16 bits
    clip_scale = staticmethod(reference.clip_scale)  # a rule on the host, the same on both backends

    def __init__(self, device):
        self.device = device
        self.xp = device.xp
        self.DEVICE = device.name
        self.GELU_FUSION = device.gelu_fusion  # -ge -1: llm.c's choice for the device
        self._kernels = {}
        self._scratch = self.xp.empty(0, dtype=np.uint8)

    def kernel(self, stem, name):
        """The __global__ function `name` (declared extern "C") of kernels/<stem>.cu, looked up once."""
        if (stem, name) not in self._kernels:
            self._kernels[stem, name] = self.device.kernel(stem, name)
        return self._kernels[stem, name]

    def scratch(self, nbytes):
        """A device buffer of at least nbytes, shared by every kernel (they run in stream order). It
        grows only when a larger one is asked for, which happens in a run's first step, so nothing is
        allocated after step 1."""
        if self._scratch.nbytes < nbytes:
            self._scratch = self.xp.empty(nbytes, dtype=np.uint8)
        return self._scratch

    def check(self, dtype, *arrays, align=1):
        """Every wrapper's invariants on its arrays: the dtype, C-contiguous (a view into a flat
        buffer), and the address `align`-byte aligned (16 where a kernel reads rows as bf16x8 chunks)."""
        for a in arrays:
            assert a.dtype == dtype and a.flags.c_contiguous and self.device.pointer(a) % align == 0, \
                (a.dtype, a.shape, align)

    # ------------------------------------------------------------------------- memory

    def zeros(self, n, dtype):
        return self.xp.zeros(n, dtype)

    def upload(self, dst, src):
        """dst (device) = src, a host array of dst's shape: fp32 values go into a bf16 array rounded
        to nearest even (ml_dtypes), and into fp32 or int32 arrays as they are."""
        src = np.ascontiguousarray(src)
        if dst.dtype == self.FLOAT:
            src = src.astype(np.float32, copy=False).astype(ml_dtypes.bfloat16).view(np.uint16)
        assert src.dtype == dst.dtype and src.shape == dst.shape and dst.flags.c_contiguous, (src.dtype, dst.dtype)
        self.device.upload(dst, src)

    def download(self, src):
        """src as a host array: bf16 as fp32 (exactly), fp32 and int32 as they are."""
        host = self.device.download(src)
        return host.view(ml_dtypes.bfloat16).astype(np.float32) if host.dtype == self.FLOAT else host

    def scalars(self, *values):
        """The host's floats of device scalars (0-d or 1-element arrays), in one copy: a step's loss
        and grad norm cost the host one wait for the device, not one each."""
        stacked = self.xp.concatenate([self.xp.asarray(v, dtype=np.float64).reshape(1) for v in values])
        return tuple(float(x) for x in self.device.download(stacked))

    def synchronize(self):
        """Wait for every kernel launched so far (the step's timing)."""
        self.device.synchronize()

    # ------------------------------------------------------------------------- encoder, layernorm, gelu

    def _encoder_shapes(self, acts, inp, wte, wpe):
        """B, T, C of an encoder call, forward (out, inp, wte, wpe) or backward (dout, inp, dwte, dwpe),
        once its shapes and dtypes are checked: (B, T) token ids, 16-byte vectors of 8 bf16 along C."""
        B, T = inp.shape
        C = wte.shape[1]
        self.check(np.int32, inp)
        assert C % 8 == 0 and acts.shape == (B, T, C) and wpe.shape[1] == C and T <= wpe.shape[0]
        assert B * T * C < 2**31
        self.check(self.FLOAT, acts, wte, wpe, align=16)
        return B, T, C

    def encoder_forward(self, out, inp, wte, wpe):
        B, T, C = self._encoder_shapes(out, inp, wte, wpe)
        threads = B * T * (C // 8)
        self.kernel("encoder", "encoder_forward")((ceil_div(threads, BLOCK),), (BLOCK,),
                                                  (out, inp, wte, wpe, i32(B * T), i32(T), i32(C)))

    def encoder_backward(self, dwte, dwpe, dout, inp):
        B, T, C = self._encoder_shapes(dout, inp, dwte, dwpe)
        self.kernel("encoder", "encoder_backward_wpe")((ceil_div(T * (C // 8), BLOCK),), (BLOCK,),
                                                       (dwpe, dout, i32(B), i32(T), i32(C)))
        # positions grouped by token id, each group in position order (stable), so that every dwte row
        # is summed in an order fixed by the inputs
        order = self.device.stable_argsort(inp.reshape(-1))
        assert order.dtype == np.int64
        self.kernel("encoder", "encoder_backward_wte")((B * T,), (32, SHAPES["ENCODER_WTE_LANES"]),
                                                       (dwte, dout, inp, order, i32(B * T), i32(C)))

    def layernorm_forward(self, out, mean, rstd, inp, weight, bias):
        C = inp.shape[-1]
        N = inp.size // C
        assert C % 8 == 0 and out.shape == inp.shape and weight.shape == bias.shape == (C,)
        assert mean.size == rstd.size == N and inp.size < 2**31
        self.check(self.FLOAT, out, inp, weight, bias, align=16)
        self.check(np.float32, mean, rstd)
        self.kernel("layernorm", "layernorm_forward")((ceil_div(N, LN_ROWS_PER_BLOCK),), (32 * LN_ROWS_PER_BLOCK,),
                                                      (out, mean, rstd, inp, weight, bias, i32(N), i32(C)))

    def layernorm_backward(self, dinp, dweight, dbias, dout, inp, weight, mean, rstd):
        C = inp.shape[-1]
        N = inp.size // C
        assert C % 8 == 0 and C // 8 <= 512 and N > 0 and inp.size < 2**31
        assert dinp.shape == dout.shape == inp.shape and dweight.shape == dbias.shape == weight.shape == (C,)
        assert mean.size == rstd.size == N
        self.check(self.FLOAT, dinp, dweight, dbias, dout, inp, weight, align=16)
        self.check(np.float32, mean, rstd)
        blocks = min(N, LN_BWD_MAX_BLOCKS)
        partials = self.scratch(blocks * 2 * C * 4)  # fp32 (blocks, 2C): dweight | dbias sums per block
        self.kernel("layernorm", "layernorm_backward")((blocks,), (ceil_div(C // 8, 32) * 32,),
                                                       (dinp, partials, dout, inp, weight, mean, rstd, i32(N), i32(C)))
        self.kernel("layernorm", "layernorm_backward_reduce")((ceil_div(2 * C, 32),), (32, 32),
                                                              (dweight, dbias, partials, i32(blocks), i32(C)))

    def fused_residual_forward(self, residual, normed, mean, rstd, inp1, inp2, weight, bias):
        C = inp1.shape[-1]
        N = inp1.size // C
        assert C % 8 == 0 and residual.shape == normed.shape == inp1.shape == inp2.shape
        assert weight.shape == bias.shape == (C,) and mean.size == rstd.size == N and inp1.size < 2**31
        self.check(self.FLOAT, residual, normed, inp1, inp2, weight, bias, align=16)
        self.check(np.float32, mean, rstd)
        self.kernel("layernorm", "fused_residual_forward")(
            (ceil_div(N, LN_ROWS_PER_BLOCK),), (32 * LN_ROWS_PER_BLOCK,),
            (residual, normed, mean, rstd, inp1, inp2, weight, bias, i32(N), i32(C)))

    def gelu_forward(self, out, inp):
        N = inp.size
        assert out.size == N and 0 < N < 2**31
        self.check(self.FLOAT, out, inp, align=16)
        threads = N // 8 + N % 8  # a thread per whole chunk of 8, then one per leftover value
        self.kernel("gelu", "gelu_forward")((ceil_div(threads, BLOCK),), (BLOCK,), (out, inp, i32(N)))

    def gelu_backward(self, dinp, inp, dout):
        N = inp.size
        assert dinp.size == dout.size == N and 0 < N < 2**31
        self.check(self.FLOAT, dinp, inp, dout, align=16)
        threads = N // 8 + N % 8
        self.kernel("gelu", "gelu_backward")((ceil_div(threads, BLOCK),), (BLOCK,), (dinp, inp, dout, i32(N)))

    # ------------------------------------------------------------------------- matmul
    #
    # The GEMMs are cuBLASLt's (the device's matmul), as in llm.c: a row-major (rows, cols) bf16
    # tensor is, to cuBLASLt, a column-major (cols x rows) matrix, so out (B*T, OC) = inp @ weight^T
    # is posed as the column-major D (OC x B*T) = op(weight) @ inp with op = transpose. bf16
    # A/B/C/D, fp32 compute; the bias add and GELU (forward) and GELU's derivative (backward) run
    # in the epilogue, on the fp32 result before its one rounding to bf16. The bias gradient is our
    # kernel (kernels/matmul.cu).

    def _matmul(self, d, a, b, m, n, k, transa, transb, epilogue, bias=None, aux=None, accumulate=False):
        """Column-major D (m x n, ld m) = op(A) @ op(B), plus D itself if accumulate, through
        `epilogue` (bias: m values; aux: m x n, ld m). All bf16, C-contiguous, 16-byte aligned."""
        self.check(self.FLOAT, *(x for x in (d, a, b, bias, aux) if x is not None), align=MATMUL_ALIGNMENT)
        assert d.size == m * n and a.size == m * k and b.size == k * n
        assert (bias is None or bias.size == m) and (aux is None or aux.size == m * n)
        self.device.matmul(d, a, b, m, n, k, transa, transb, epilogue, bias, aux, accumulate)

    def matmul_forward(self, out, inp, weight, bias, pre_gelu=None):
        OC, C = weight.shape
        BT = inp.size // C
        assert inp.shape[-1] == C and inp.size == BT * C and out.size == BT * OC and out.shape[-1] == OC
        assert bias is None or bias.shape == (OC,)
        if pre_gelu is None:
            epilogue = "default" if bias is None else "bias"
        else:
            assert pre_gelu.shape == out.shape and OC % 8 == 0, "GELU's aux buffer wants a leading dimension % 8"
            epilogue = "gelu_aux" if bias is None else "gelu_aux_bias"
        # column-major: out^T (OC x BT) = weight^T-op (C x OC stored, transposed) @ inp^T (C x BT)
        self._matmul(out, weight, inp, OC, BT, C, True, False, epilogue, bias=bias, aux=pre_gelu)

    def matmul_backward(self, dinp, dweight, dbias, dout, inp, weight, pre_gelu=None):
        OC, C = weight.shape
        BT = inp.size // C
        assert inp.shape[-1] == C and dinp.shape == inp.shape and dout.size == BT * OC and dout.shape[-1] == OC
        assert dweight.shape == weight.shape
        # dweight^T (C x OC, column-major) += inp^T (C x BT) @ dout (BT x OC): beta = 1 accumulates
        self._matmul(dweight, inp, dout, C, OC, BT, False, True, "default", accumulate=True)
        if dbias is not None:
            self.check(self.FLOAT, dbias)  # dout was checked (16-byte aligned rows) by the dweight matmul above
            assert dbias.shape == (OC,) and OC % 8 == 0
            num_slabs = ceil_div(BT, SHAPES["DBIAS_ROWS_PER_SLAB"])
            assert num_slabs <= 65535, "grid.y limit"
            partials = self.scratch(4 * num_slabs * OC)
            warps = SHAPES["DBIAS_WARPS"]
            self.kernel("matmul", "matmul_dbias_partials")((ceil_div(OC, SHAPES["DBIAS_STRIP"]), num_slabs),
                                                           (32, warps), (partials, dout, i32(BT), i32(OC)))
            self.kernel("matmul", "matmul_dbias_accumulate")((ceil_div(OC, 32),), (32, warps),
                                                             (dbias, partials, i32(num_slabs), i32(OC)))
        # dinp^T (C x BT) = weight (C x OC stored) @ dout^T (OC x BT), times gelu'(pre_gelu) if given
        if pre_gelu is None:
            self._matmul(dinp, weight, dout, C, BT, OC, False, False, "default")
        else:
            assert pre_gelu.shape == dinp.shape and C % 8 == 0, "GELU's aux buffer wants a leading dimension % 8"
            self._matmul(dinp, weight, dout, C, BT, OC, False, False, "dgelu", aux=pre_gelu)

    # ------------------------------------------------------------------------- attention

    def attention_forward(self, out, lse, qkv):
        B, NH, T = lse.shape
        assert qkv.shape == (B, T, 3 * NH * HS) and out.shape == (B, T, NH * HS)
        self.check(self.FLOAT, out, qkv, align=16)
        self.check(np.float32, lse)
        assert B * NH <= 65535, "grid.y limit"
        grid = (ceil_div(T, ATTENTION_TILE), B * NH)
        self.kernel("attention", "attention_forward")(grid, (ATTENTION_THREADS,), (out, lse, qkv, i32(T), i32(NH)))

    def attention_backward(self, dqkv, dout, qkv, out, lse):
        B, NH, T = lse.shape
        assert dqkv.shape == qkv.shape == (B, T, 3 * NH * HS) and dout.shape == out.shape
        self.check(self.FLOAT, dqkv, dout, qkv, out, align=16)
        self.check(np.float32, lse)
        assert B * NH <= 65535, "grid.y limit"
        grid = (ceil_div(T, ATTENTION_TILE), B * NH)
        args = (dqkv, dout, qkv, out, lse, i32(T), i32(NH))
        self.kernel("attention", "attention_backward_dq")(grid, (ATTENTION_THREADS,), args)
        self.kernel("attention", "attention_backward_dkdv")(grid, (ATTENTION_THREADS,), args)

    # ------------------------------------------------------------------------- classifier

    def fused_classifier(self, logits, losses, targets, vocab_size, dloss, write_dlogits):
        Vp = logits.shape[-1]
        rows = logits.size // Vp
        self.check(self.FLOAT, logits, align=16)
        self.check(np.float32, losses)
        self.check(np.int32, targets)
        assert losses.size == rows and targets.size == rows
        assert Vp % 8 == 0 and 0 < vocab_size <= Vp
        self.kernel("classifier", "fused_classifier_kernel")(
            (rows,), (CLASSIFIER_THREADS,),
            (logits, losses, targets, i32(vocab_size), i32(Vp), f32(dloss), i32(bool(write_dlogits))))

    # ------------------------------------------------------------------------- optimizer

    def global_norm(self, grads):
        self.check(self.FLOAT, grads)
        n = grads.size
        head = min((-self.device.pointer(grads)) % 16 // 2, n)  # elements before the first 16-byte boundary
        partials = self.scratch(4 * NORM_BLOCKS)[:4 * NORM_BLOCKS].view(np.float32)
        norm = self.xp.empty(1, dtype=np.float64)  # its own, not scratch: it outlives the next kernel
        self.kernel("global_norm", "global_norm_partials")((NORM_BLOCKS,), (NORM_THREADS,),
                                                           (partials, grads, np.int64(n), i32(head)))
        self.kernel("global_norm", "global_norm_finish")((1,), (32,), (norm, partials, i32(NORM_BLOCKS)))
        return norm.reshape(())

    def adamw(self, params, grads, m, v, master, t, lr, beta1, beta2, eps, weight_decay, grad_scale, seed, offset=0):
        n = params.size
        self.check(self.FLOAT, params, grads)
        self.check(np.float32, m, v)
        assert grads.size == n and m.size == n and v.size == n
        assert 0 <= seed < 2**64 and offset >= 0
        # the twin's scalars, folded in float64 as it folds them, then rounded to fp32 as NumPy does
        scalars = (f32(beta1), f32(1.0 - beta1), f32(beta2), f32(1.0 - beta2), f32(1.0 / np.sqrt(1.0 - beta2 ** t)),
                   f32(eps), f32(1.0 - lr * weight_decay), f32(lr / (1.0 - beta1 ** t)), f32(grad_scale),
                   np.uint64(seed), np.int64(offset))
        grid = (ceil_div(n, ADAMW_THREADS),)
        if master is None:
            self.kernel("adamw", "adamw_kernel")(grid, (ADAMW_THREADS,), (params, grads, m, v, np.int64(n), *scalars))
        else:
            self.check(np.float32, master)
            assert master.size == n
            self.kernel("adamw", "adamw_master_kernel")(grid, (ADAMW_THREADS,),
                                                        (params, grads, m, v, master, np.int64(n), *scalars))

"""The GPU as kernels/cuda.py's device: CuPy arrays and streams, the cubins of kernels/*.cu loaded
with cupy.RawModule, and the matmuls in cuBLASLt through NVIDIA's bindings (nvmath-python), as
llm.c calls it from C.

Making one needs a CUDA device: the cubins for its architecture are built (or found in
kernels/build/) then, once. Its methods are the device interface kernels/emulated.py offers too.
"""
import cupy as cp
import numpy as np
from nvmath.bindings import cublasLt as _lt

from kernels import alignment_standin, build, device_arch

# ----------------------------------------------------------------------------- cuBLASLt
#
# Descriptors and the algorithm cuBLASLt's heuristic picks are made once per (shape, epilogue) and
# kept, so a training step after the first asks cuBLASLt nothing but to run. One plan serves every
# layer, whose biases and pre-GELU buffers are 16-byte aligned but not always more (at C=1600 layer
# l's qkvb starts 9600 l bytes after layer 0's: 128-byte aligned at odd l). The heuristic may pick
# by the alignment of the bias and aux pointers it is shown, which no preference bounds as
# MIN_ALIGNMENT_*_BYTES do for A-D; so a plan is made with stand-in pointers aligned to exactly 16
# bytes (kernels.alignment_standin), and kernels/cuda.py checks that the real ones are.

CUBLAS_COMPUTE_32F = 68
CUDA_R_32F = 0
CUDA_R_16BF = 14
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLASLT_WORKSPACE_BYTES = 32 * 1024 * 1024  # llm.c's size for Hopper
# By default the heuristic assumes 256-byte aligned pointers: it is told that 16 is all it can count on
CUBLASLT_ALIGNMENT = 16
# Split-K partial sums only in fp32 (not in bf16, the output type): fp32 accumulation throughout.
CUBLASLT_REDUCTION_SCHEMES = int(_lt.ReductionScheme.COMPUTE_TYPE)
EPILOGUES = {"default": _lt.Epilogue.DEFAULT, "bias": _lt.Epilogue.BIAS, "gelu_aux": _lt.Epilogue.GELU_AUX,
             "gelu_aux_bias": _lt.Epilogue.GELU_AUX_BIAS, "dgelu": _lt.Epilogue.DGELU}
PINNED_STAGING_BYTES = 16 * 2**20  # uploads up to this size (a step's token ids) go through pinned memory

_ALPHA = np.ones(1, dtype=np.float32)  # host scalars, read by cuBLASLt when the call is made
_BETA_OVERWRITE = np.zeros(1, dtype=np.float32)
_BETA_ACCUMULATE = np.ones(1, dtype=np.float32)


def _lt_set(setter, dtype_of, obj, attr, value):
    """Set one cuBLASLt attribute from a host value of the attribute's own type."""
    buf = np.array(value, dtype=dtype_of(attr))
    setter(obj, attr, buf.ctypes.data, buf.nbytes)


def _set_desc(desc, attr, value):
    _lt_set(_lt.matmul_desc_set_attribute, _lt.get_matmul_desc_attribute_dtype, desc, attr, value)


class GPU:
    xp = cp
    emulated = False

    def __init__(self):
        capability = cp.cuda.Device().compute_capability  # e.g. "90"
        self.arch = device_arch(capability)
        self.name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
        # llm.c's choice for -ge -1: cuBLASLt's GELU epilogues (forward and backward) on Hopper and newer
        self.gelu_fusion = 2 if int(capability) >= 90 else 0
        self._modules = {stem: cp.RawModule(path=str(path)) for stem, path in build(self.arch).items()}
        self._cublaslt = None   # (handle, workspace, preference, stand-in address, its buffer), made on first use
        self._plans = {}        # (m, n, k, transa, transb, epilogue) -> (desc, A, B, D layouts, heuristic)
        self._staging = []      # two pinned host buffers and the event of the copy last made from each

    def kernel(self, stem, name):
        """A launcher f(grid, block, args) of the __global__ function `name` of kernels/<stem>.cu."""
        return self._modules[stem].get_function(name)

    @staticmethod
    def pointer(array):
        return array.data.ptr

    @staticmethod
    def stable_argsort(array):
        return cp.argsort(array)  # CuPy's sort is stable (and takes no `kind`)

    @staticmethod
    def synchronize():
        cp.cuda.get_current_stream().synchronize()

    def upload(self, dst, src):
        """dst = src (host, same dtype and shape). Small ones (a step's token ids) are staged in
        pinned memory, so the copy is a true asynchronous DMA as PyTorch's pinned batches are; two
        buffers alternate, each reused only once its previous copy has finished."""
        if src.nbytes > PINNED_STAGING_BYTES:
            dst.set(src)
            return
        if not self._staging:
            self._staging = [[cp.cuda.alloc_pinned_memory(PINNED_STAGING_BYTES), None] for _ in range(2)]
        slot = self._staging[0]
        self._staging.reverse()
        memory, copied = slot
        if copied is not None:
            copied.synchronize()
        staged = np.frombuffer(memory, dtype=src.dtype, count=src.size).reshape(src.shape)
        staged[...] = src
        stream = cp.cuda.get_current_stream()
        dst.set(staged, stream=stream)
        slot[1] = stream.record()

    @staticmethod
    def download(src):
        return src.get()

    # ------------------------------------------------------------------------- cuBLASLt

    def _context(self):
        if self._cublaslt is None:
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
            self._cublaslt = (handle, workspace, pref, alignment_standin(standin.data.ptr, CUBLASLT_ALIGNMENT), standin)
        return self._cublaslt

    @staticmethod
    def _plan(handle, pref, standin, m, n, k, transa, transb, epilogue, with_bias, with_aux):
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

    def matmul(self, d, a, b, m, n, k, transa, transb, epilogue, bias, aux, accumulate):
        """Column-major D (m x n, ld m) = op(A) @ op(B) (+ D if accumulate), through the epilogue
        named (kernels/cuda.py's names: default, bias, gelu_aux, gelu_aux_bias, dgelu)."""
        handle, workspace, pref, standin, _ = self._context()
        key = (m, n, k, transa, transb, int(EPILOGUES[epilogue]))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan(handle, pref, standin, *key, bias is not None, aux is not None)
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

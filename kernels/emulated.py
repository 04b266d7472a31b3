"""The emulated device: kernels/cuda.py's device on the CPU, for CI and for any change to a kernel
made without a GPU. The same kernels/*.cu sources, built by the host C++ compiler against
kernels/emulator/ (what that models, and what it cannot, is in cuda_on_cpu.h), are launched with
the grids, blocks and arguments kernels/cuda.py computes. Arrays are NumPy's; the matmuls, which are
cuBLASLt's on the GPU (not our code), are NumPy's fp32 products here with cuBLASLt's epilogues
(bias, GELU with its pre-GELU aux output, GELU's derivative, accumulation into D) and one rounding
of the output to bf16, which is what the GPU's cuBLASLt computes, though not in its order.

Its results are "emulated", never a GPU's: correct arithmetic and launch code, no speed, no proof
of real hardware limits.

    python train_gpt2.py --device emulated -e d1 -b 2 -t 64 -x 10   # the CUDA path, on the CPU
"""
import ctypes
import os

import ml_dtypes
import numpy as np

from kernels import build_emulated, reference

ERROR_BYTES = 2048


class LaunchError(RuntimeError):
    """The emulated device refused a launch or stopped a kernel (a deadlock, a collective the
    warp's lanes do not all reach, arguments the kernel does not take), with the reason."""


def bf16_bits(values):
    return np.asarray(values, dtype=np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def fp32(bits):
    return bits.view(ml_dtypes.bfloat16).astype(np.float32)


class Kernel:
    """A launcher f(grid, block, args) of one emulated kernel, called as CuPy's RawKernel is:
    arrays pass their address, NumPy scalars their bytes (the kernel's parameter types decide,
    and a mismatch is refused)."""

    def __init__(self, device, library, name):
        self.device, self.library, self.name = device, library, name

    def __call__(self, grid, block, args, shared_mem=0):
        n = len(args)
        values, sizes, kinds = [], (ctypes.c_int * n)(), ctypes.create_string_buffer(n + 1)
        for i, arg in enumerate(args):
            if isinstance(arg, np.ndarray):
                values.append(ctypes.c_void_p(arg.ctypes.data))
                sizes[i], kinds[i] = 8, b"p"
            elif isinstance(arg, np.generic):
                values.append(ctypes.create_string_buffer(arg.tobytes(), arg.nbytes))
                sizes[i], kinds[i] = arg.nbytes, b"f" if arg.dtype.kind == "f" else b"i"
            else:
                raise TypeError(f"{self.name}: argument {i} is a {type(arg).__name__}: pass arrays and NumPy "
                                f"scalars, whose C type is known (CuPy would have to guess)")
        pointers = (ctypes.c_void_p * n)(*(ctypes.addressof(v) for v in values))
        dims = [(ctypes.c_uint * 3)(*(tuple(d) + (1,) * (3 - len(d)))) for d in (grid, block)]
        error = ctypes.create_string_buffer(ERROR_BYTES)
        if self.library.emulated_launch(self.name.encode(), dims[0], dims[1], ctypes.c_size_t(shared_mem), n,
                                        pointers, sizes, kinds, ctypes.c_uint64(self.device.next_seed()), error,
                                        ERROR_BYTES):
            raise LaunchError(f"emulated device: {error.value.decode()}")


class Emulated:
    """seed: where the shuffles of block and thread order start; each launch takes the next.
    sanitize: the address and alignment sanitizer's build of the kernels, for a process that
    preloads the sanitizer's runtime (tests/test_emulated_sanitizer.py). By default both come from
    the environment: EMULATED_SEED (else 0) and EMULATED_SANITIZE=1."""

    xp = np
    emulated = True
    arch = "emulated"
    gelu_fusion = 2  # what -ge -1 means on Hopper, whose GELU epilogues the emulated matmul has

    def __init__(self, seed=None, sanitize=None):
        sanitize = os.environ.get("EMULATED_SANITIZE") == "1" if sanitize is None else sanitize
        self.name = "emulated device (CUDA kernels on the CPU" + (", sanitized)" if sanitize else ")")
        self._seed = int(os.environ.get("EMULATED_SEED", "0")) if seed is None else seed
        self._launches = 0
        self._libraries = {}
        for stem, path in build_emulated(sanitize).items():
            library = ctypes.CDLL(str(path))
            library.emulated_launch.restype = ctypes.c_int
            library.emulated_kernels.restype = ctypes.c_char_p
            self._libraries[stem] = library

    def next_seed(self):
        self._launches += 1
        return (self._seed * 0x9E3779B97F4A7C15 + self._launches) % 2**64

    def kernel(self, stem, name):
        library = self._libraries[stem]
        if name not in library.emulated_kernels().decode().split(","):
            raise LaunchError(f"emulated device: kernels/{stem}.cu has no kernel {name}")
        return Kernel(self, library, name)

    @staticmethod
    def pointer(array):
        return array.ctypes.data

    @staticmethod
    def stable_argsort(array):
        return np.argsort(array, kind="stable")

    @staticmethod
    def synchronize():
        pass  # every launch has run to its end when the call returns

    @staticmethod
    def upload(dst, src):
        np.copyto(dst, src)

    @staticmethod
    def download(src):
        return src.copy()

    @staticmethod
    def matmul(d, a, b, m, n, k, transa, transb, epilogue, bias, aux, accumulate):
        """cuBLASLt's column-major D (m x n, ld m) = op(A) @ op(B) (+ D if accumulate), with the
        epilogue named, in fp32, each output rounded to bf16 once. A column-major (rows x cols)
        matrix with leading dimension `rows` is the C-contiguous array (cols, rows) of its
        transpose, so D^T = op(B)^T @ op(A)^T is computed in d's own row-major layout."""
        at = fp32(a).reshape(m, k).T if transa else fp32(a).reshape(k, m)  # op(A)^T (k, m)
        bt = fp32(b).reshape(k, n).T if transb else fp32(b).reshape(n, k)  # op(B)^T (n, k)
        result = bt @ at                                                  # D^T (n, m)
        if accumulate:
            result += fp32(d).reshape(n, m)
        if bias is not None:
            result += fp32(bias)
        if epilogue in ("gelu_aux", "gelu_aux_bias"):
            aux.reshape(n, m)[...] = bf16_bits(result)  # the pre-GELU values, for backward
            reference.gelu_forward(result, result.copy())
        elif epilogue == "dgelu":
            reference.gelu_backward(result, fp32(aux).reshape(n, m), result)
        else:
            assert epilogue in ("default", "bias") and aux is None, epilogue
        assert (bias is not None) == (epilogue in ("bias", "gelu_aux_bias"))
        d.reshape(n, m)[...] = bf16_bits(result)

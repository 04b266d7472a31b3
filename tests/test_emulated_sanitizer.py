"""The kernels' address-sanitizer run: every emulated kernel test again, on the build with
AddressSanitizer and the alignment check (kernels.SANITIZE_FLAGS), so that an out-of-bounds read or
write, or a misaligned vector load (a fault on the device), stops the run with the sanitizer's
report. The sanitizer's runtime must be the first library of the process, so each run is a new
Python process with it preloaded; the first test shows that such a run does catch both faults."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kernels

REPO = Path(__file__).resolve().parents[1]
KERNEL_TESTS = ["tests/test_cuda_layers.py", "tests/test_cuda_attention.py", "tests/test_cuda_matmul.py",
                "tests/test_cuda_optim.py"]


def sanitizer_runtime():
    try:
        path = subprocess.run([kernels.host_compiler(), "-print-file-name=libasan.so"], capture_output=True,
                              text=True).stdout.strip()
    except kernels.BuildError:
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


RUNTIME = sanitizer_runtime()
pytestmark = pytest.mark.skipif(RUNTIME is None, reason="the C++ compiler has no AddressSanitizer runtime (libasan)")


def sanitized(argv, cwd=REPO):
    env = dict(os.environ, LD_PRELOAD=RUNTIME, ASAN_OPTIONS="detect_leaks=0", EMULATED_SANITIZE="1")
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


FAULTS = r'''
#include "common.cuh"

extern "C" __global__ void copy(float* out, const float* inp, int n, int shift) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = inp[i + shift];
}

extern "C" __global__ void copy8(bf16* out, const bf16* inp) {
    store8(out + 8 * threadIdx.x, load8(inp + 8 * threadIdx.x));
}
'''

RUN = r'''
import sys
import numpy as np
import kernels
from pathlib import Path
kernels.KERNEL_DIR = Path(sys.argv[1])
kernels.BUILD_DIR = Path(sys.argv[1]) / "build"
from kernels.emulated import Emulated
device = Emulated(seed=0)
case = sys.argv[2]
inp = np.arange(64, dtype=np.float32)
if case in ("in bounds", "out of bounds"):
    out = np.zeros(64, np.float32)
    device.kernel("faults", "copy")((2,), (32,), (out, inp, np.int32(64), np.int32(case == "out of bounds")))
    assert (out[:63] == inp[:63] + (case == "out of bounds")).all()
else:
    raw = np.zeros(8 * 32 + 1, np.uint16)
    src = raw[1:] if case == "misaligned" else raw[:-1]
    device.kernel("faults", "copy8")((1,), (32,), (np.zeros(8 * 32, np.uint16), src))
print("ran", case)
'''


@pytest.fixture(scope="module")
def fault_dir(tmp_path_factory, kernel_folder):
    return kernel_folder(tmp_path_factory.mktemp("faults"), faults=FAULTS)


@pytest.mark.parametrize("case, report", [("in bounds", None), ("out of bounds", "heap-buffer-overflow"),
                                          ("aligned", None), ("misaligned", "misaligned address")])
def test_the_sanitized_build_stops_an_out_of_bounds_read_and_a_misaligned_load(fault_dir, case, report):
    result = sanitized(["-c", RUN, str(fault_dir), case])
    if report is None:
        assert result.returncode == 0 and f"ran {case}" in result.stdout, result.stderr[-3000:]
    else:
        assert result.returncode != 0 and report in result.stderr and f"ran {case}" not in result.stdout, \
            result.stderr[-3000:]


def test_every_emulated_kernel_test_passes_under_the_sanitizer():
    result = sanitized(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", *KERNEL_TESTS])
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert " passed" in result.stdout and "failed" not in result.stdout

"""The kernels of train_gpt2.py, one per layer.

- reference.py: the NumPy twins (fp32), the CPU backend and the definition of what each kernel computes;
- *.cu (with common.cuh): the CUDA kernels, one file per layer, forward and backward together;
- cuda.py: the twins' signatures over the CUDA kernels, for CuPy views of the flat GPU buffers.

This module compiles the .cu files with nvcc into cubins, once: each cubin is cached under
kernels/build/<arch>/ by a hash of its source, the shared headers, the flags and nvcc's version, so
an edit rebuilds just what changed. It needs only the standard library (and the repository's cli.py),
so `make kernels` (which compiles every source for sm_80 and sm_90a) runs anywhere nvcc does, GPU or
not:

    python -m kernels sm_80 sm_90a
"""
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

from cli import ArgumentParser, fail, output_folder

KERNEL_DIR = Path(__file__).resolve().parent
BUILD_DIR = KERNEL_DIR / "build"
NVCC_FLAGS = ("-O3", "-std=c++17", "-lineinfo", "-Werror", "all-warnings")
ARCH = re.compile(r"sm_\d+[af]?")  # sm_80; sm_90a, sm_100a: the full instruction set; sm_100f: the family


class BuildError(Exception):
    """nvcc is missing, or a source does not compile (the message holds nvcc's output)."""


def sources():
    return sorted(KERNEL_DIR.glob("*.cu"))


def nvcc_path():
    """nvcc from PATH, else from CUDA_HOME / CUDA_PATH, else the default install location."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    raise BuildError("nvcc not found: the CUDA kernels are compiled with the CUDA toolkit's nvcc; "
                     "put it on PATH or set CUDA_HOME")


def device_arch(compute_capability):
    """nvcc's -arch for a device: '90' -> 'sm_90a' (Hopper's full instruction set), '80' -> 'sm_80'."""
    return f"sm_{compute_capability}a" if compute_capability == "90" else f"sm_{compute_capability}"


def alignment_standin(base, align):
    """The lowest address at or above `base` that is a multiple of `align` (a power of two) and of no
    larger power of two, so within [base, base + 2 * align). cuBLASLt's heuristic may pick its
    algorithm by the alignment of the bias and aux pointers it is shown: a plan made with pointers
    here runs with any `align`-byte aligned ones (kernels/cuda.py)."""
    assert align > 0 and align & (align - 1) == 0, align
    return -(-(base - align) // (2 * align)) * 2 * align + align


def cuda_unavailable():
    """Why the CUDA backend (kernels/cuda.py) cannot run here, in a few words, or None if it can:
    CuPy and nvmath-python installed, and CuPy sees a CUDA device."""
    for module, package in (("cupy", "CuPy"), ("nvmath", "nvmath-python")):
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed (pip install -r requirements-gpu.txt)"
    import cupy
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as e:
        return f"no usable CUDA device ({e})"
    return None if count > 0 else "no CUDA device"


def cubin_path(source, arch, nvcc_version):
    digest = hashlib.sha256()
    for part in (nvcc_version, arch, " ".join(NVCC_FLAGS), source.read_text()):
        digest.update(part.encode() + b"\0")
    for header in sorted(KERNEL_DIR.glob("*.cuh")):
        digest.update(header.read_bytes() + b"\0")
    return BUILD_DIR / arch / f"{source.stem}-{digest.hexdigest()[:16]}.cubin"


def unknown_arch(arch, nvcc):
    """Why nvcc cannot compile cubins for `arch`, in one line, or None if it can: the form sm_NN (an
    a or f suffix allowed), then nvcc's own verdict, from a dry run that compiles nothing."""
    if not ARCH.fullmatch(arch):
        return f"{arch} is not an architecture: give sm_NN, e.g. sm_80 (Ampere) or sm_90a (Hopper)"
    dry = subprocess.run([nvcc, "-cubin", f"-arch={arch}", "--dryrun", "-x", "cu", "-o", os.devnull, os.devnull],
                         capture_output=True, text=True)
    if dry.returncode != 0:
        listed = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True).stdout.split()
        said = " ".join(" ".join(line for line in dry.stderr.splitlines() if not line.startswith("#$")).split())
        return f"{arch}: nvcc does not compile for it ({said}); it compiles for {' '.join(listed)}"
    return None


def build(arch, only=None):
    """Compile every kernels/*.cu (or just the stems in `only`) for `arch`, skipping those already
    cached; returns {stem: cubin path}. A cubin is written under a temporary name and renamed, so
    an interrupted build never leaves a torn one, and a failed one leaves no folder it made empty."""
    nvcc = nvcc_path()
    nvcc_version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    cubins = {}
    for source in sources():
        if only is not None and source.stem not in only:
            continue
        path = cubin_path(source, arch, nvcc_version)
        if not path.exists():
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            with output_folder(path.parent):
                result = subprocess.run([nvcc, "-cubin", f"-arch={arch}", *NVCC_FLAGS, f"-I{KERNEL_DIR}",
                                         "-o", str(tmp), str(source)], capture_output=True, text=True)
                if result.returncode != 0:
                    tmp.unlink(missing_ok=True)
                    raise BuildError(f"{source.name} does not compile for {arch}:\n{result.stderr.strip()}")
            os.replace(tmp, path)
            for stale in path.parent.glob(f"{source.stem}-*.cubin"):
                if stale != path:
                    stale.unlink()
        cubins[source.stem] = path
    return cubins


def main(argv):
    parser = ArgumentParser(prog="python -m kernels", description="Compile kernels/*.cu with nvcc into cubins "
                            "cached under kernels/build/ARCH/ (no GPU needed); make kernels runs sm_80 sm_90a.")
    parser.add_argument("archs", nargs="*", metavar="ARCH", help="an nvcc GPU architecture, sm_NN: sm_80 (Ampere), "
                        "sm_90a (Hopper, its full instruction set), ...")
    archs = parser.parse_args(argv).archs
    if not archs:
        fail("name the architectures to compile for, e.g. python -m kernels sm_80 sm_90a (see --help)")
    try:
        nvcc = nvcc_path()
        for arch in archs:  # every name checked before anything is compiled or made
            if problem := unknown_arch(arch, nvcc):
                fail(problem)
        for arch in archs:
            cubins = build(arch)
            print(f"{arch}: {len(cubins)} kernel files compiled ({', '.join(sorted(cubins))})")
    except BuildError as e:
        fail(str(e))
    return 0

"""The kernels of train_gpt2.py, one per layer.

- reference.py: the NumPy twins (fp32), the CPU backend and the definition of what each kernel computes;
- *.cu (with common.cuh and shapes.cuh): the CUDA kernels, one file per layer, forward and backward together;
- cuda.py: the twins' signatures over the CUDA kernels, on a device: gpu.py (CuPy, cuBLASLt through
  nvmath-python) or emulated.py (the same .cu sources built for the CPU against emulator/, NumPy);
- backend.py: the interface every backend offers the trainer.

This module compiles the .cu files, once: with nvcc into cubins, cached under kernels/build/<arch>/,
and with the host C++ compiler into the emulated device's libraries, under kernels/build/emulated/.
Each is cached by a hash of what makes it (its source, the headers, the flags and the compiler's
release), so an edit rebuilds just what changed. It needs only the standard library (and the
repository's cli.py), so `make kernels` (which compiles every source for sm_80 and sm_90a, and for
the emulated device) runs anywhere nvcc and a C++ compiler do, GPU or not:

    python -m kernels sm_80 sm_90a emulated
"""
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from cli import ArgumentParser, fail, output_folder

KERNEL_DIR = Path(__file__).resolve().parent
BUILD_DIR = KERNEL_DIR / "build"
NVCC_FLAGS = ("-O3", "-std=c++17", "-lineinfo", "-Werror", "all-warnings")
ARCH = re.compile(r"sm_\d+[af]?")  # sm_80; sm_90a, sm_100a: the full instruction set; sm_100f: the family
EMULATED = "emulated"  # the emulated device's "architecture": the same sources built for this CPU
# The emulated device's libraries: IEEE fp32 one operation at a time (no contraction into FMAs),
# type punning through pointers as the kernels do on the device, only the launch entry exported.
EMULATED_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-fvisibility=hidden", "-ffp-contract=off",
                  "-fno-strict-aliasing", "-DCUDA_EMULATED", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-Werror")
# The sanitized build (tests/test_emulated_sanitizer.py): an out-of-bounds access, or a misaligned
# vector load that would fault on the device, stops the run with the sanitizer's report.
SANITIZE_FLAGS = ("-fsanitize=address,alignment", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer")
KERNEL_NAME = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(')


class BuildError(Exception):
    """nvcc or the C++ compiler is missing, or a source does not compile (the message holds the
    compiler's output)."""


def sources():
    return sorted(KERNEL_DIR.glob("*.cu"))


def kernel_names(source):
    """The `extern "C" __global__` functions of a .cu file, in order."""
    return KERNEL_NAME.findall(source.read_text())


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


@functools.cache
def cuda_backend(device):
    """The CUDA kernels (kernels.cuda.Cuda) on `device`: "gpu" (CuPy's current CUDA device; needs
    CuPy, nvmath-python and a GPU) or "emulated" (the CPU, kernels/emulated.py). Made once per device."""
    from kernels.cuda import Cuda
    if device == "gpu":
        from kernels.gpu import GPU
        return Cuda(GPU())
    assert device == EMULATED, device
    from kernels.emulated import Emulated
    return Cuda(Emulated())


def compiler_release(compiler):
    """The part of `compiler --version` that changes what it emits: nvcc's "release 13.0" (not its
    build date, so cubins prepared on one machine are found on another with the same release), or
    the first line of a host compiler's ("c++ (Debian 12.2.0-14) 12.2.0")."""
    text = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    release = re.search(r"release (\d+\.\d+)", text)
    return f"release {release.group(1)}" if release else text.splitlines()[0]


def cached_path(source, target, flags, release, extras=()):
    """Where the build of `source` for `target` lives, named by a hash of what makes it: the
    compiler's release, the target, the flags, the source, every shared header (and `extras`)."""
    digest = hashlib.sha256()
    for part in (release, target, " ".join(flags), source.read_text()):
        digest.update(part.encode() + b"\0")
    for header in sorted(KERNEL_DIR.glob("*.cuh")) + sorted(extras):
        digest.update(header.read_bytes() + b"\0")
    suffix = ".cubin" if ARCH.fullmatch(target) else ".so"
    return BUILD_DIR / target / f"{source.stem}-{digest.hexdigest()[:16]}{suffix}"


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


def compile_cached(path, command, source, target):
    """Run `command` (which writes its output to the file after -o) unless `path` is there: into a
    temporary name renamed to `path`, so an interrupted build never leaves a torn file, a failed one
    no folder it made, and the stale builds of the same source are removed."""
    if path.exists():
        return
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with output_folder(path.parent):
        result = subprocess.run([*command, "-o", str(tmp)], capture_output=True, text=True)
        if result.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise BuildError(f"{source.name} does not compile for {target}:\n{result.stderr.strip()}")
    os.replace(tmp, path)
    for stale in path.parent.glob(f"{source.stem}-*{path.suffix}"):
        if stale != path:
            stale.unlink()


def build(arch, only=None):
    """Compile every kernels/*.cu (or just the stems in `only`) for `arch`, skipping those already
    cached; returns {stem: cubin path}."""
    nvcc = nvcc_path()
    release = compiler_release(nvcc)
    cubins = {}
    for source in sources():
        if only is not None and source.stem not in only:
            continue
        path = cached_path(source, arch, NVCC_FLAGS, release)
        compile_cached(path, [nvcc, "-cubin", f"-arch={arch}", *NVCC_FLAGS, f"-I{KERNEL_DIR}", str(source)],
                       source, arch)
        cubins[source.stem] = path
    return cubins


def host_compiler():
    found = shutil.which("c++") or shutil.which("g++")
    if found is None:
        raise BuildError("no C++ compiler (c++ or g++) on PATH: the emulated device builds the kernels with one")
    return found


def build_emulated(sanitize=False, only=None):
    """Compile every kernels/*.cu (or the stems in `only`) for the emulated device: each into a
    shared library with the emulator's runtime and a registration of each of its kernels (see
    kernels/emulator/); returns {stem: library path}. sanitize: the address and alignment
    sanitizer's build (loadable only into a process that preloads the sanitizer's runtime)."""
    compiler = host_compiler()
    release = compiler_release(compiler)
    flags = EMULATED_FLAGS + (SANITIZE_FLAGS if sanitize else ())
    target = EMULATED + ("-sanitized" if sanitize else "")
    runtime = sorted(p for p in (KERNEL_DIR / "emulator").iterdir() if p.suffix in (".h", ".cpp"))
    libraries = {}
    for source in sources():
        if only is not None and source.stem not in only:
            continue
        path = cached_path(source, target, flags, release, runtime)
        registrations = "".join(f"EMULATED_KERNEL({name})\n" for name in kernel_names(source))
        unit = f'#include "emulator/cuda_on_cpu.h"\n#include "{source}"\n#include "emulator/registry.h"\n{registrations}'
        with tempfile.TemporaryDirectory(prefix="emulated_") as tmp:
            (Path(tmp) / f"{source.stem}.cpp").write_text(unit)
            compile_cached(path, [compiler, *flags, f"-I{KERNEL_DIR}", str(Path(tmp) / f"{source.stem}.cpp"),
                                  str(KERNEL_DIR / "emulator" / "runtime.cpp")], source, target)
        libraries[source.stem] = path
    return libraries


def main(argv):
    parser = ArgumentParser(prog="python -m kernels", description="Compile kernels/*.cu with nvcc into cubins, and "
                            "with the host C++ compiler for the emulated device, cached under kernels/build/TARGET/ "
                            "(no GPU needed); make kernels runs sm_80 sm_90a emulated.")
    parser.add_argument("targets", nargs="*", metavar="TARGET", help="an nvcc GPU architecture, sm_NN: sm_80 "
                        "(Ampere), sm_90a (Hopper, its full instruction set), ...; or emulated (the CPU)")
    targets = parser.parse_args(argv).targets
    if not targets:
        fail("name the architectures to compile for, e.g. python -m kernels sm_80 sm_90a emulated (see --help)")
    try:
        archs = [t for t in targets if t != EMULATED]
        if archs:
            nvcc = nvcc_path()
            for arch in archs:  # every name checked before anything is compiled or made
                if problem := unknown_arch(arch, nvcc):
                    fail(problem)
        for target in targets:
            built = build_emulated() if target == EMULATED else build(target)
            print(f"{target}: {len(built)} kernel files compiled ({', '.join(sorted(built))})")
    except BuildError as e:
        fail(str(e))
    return 0

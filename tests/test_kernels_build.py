"""kernels/__init__.py: nvcc builds each .cu once per architecture, caches it by content, rebuilds
what changed, and reports a source that does not compile by name. (Runs without a GPU; needs nvcc.)"""
import subprocess
import sys
from pathlib import Path

import pytest

import kernels

REPO = Path(__file__).resolve().parents[1]

try:
    kernels.nvcc_path()
    NVCC_REASON = None
except kernels.BuildError as e:
    NVCC_REASON = str(e)
pytestmark = pytest.mark.skipif(NVCC_REASON is not None, reason=str(NVCC_REASON))

GOOD = '#include "shared.cuh"\nextern "C" __global__ void twice(float* x) { x[threadIdx.x] *= TWO; }\n'


@pytest.fixture
def kernel_dir(tmp_path, monkeypatch):
    (tmp_path / "shared.cuh").write_text("#pragma once\n#define TWO 2.0f\n")
    (tmp_path / "twice.cu").write_text(GOOD)
    monkeypatch.setattr(kernels, "KERNEL_DIR", tmp_path)
    monkeypatch.setattr(kernels, "BUILD_DIR", tmp_path / "build")
    return tmp_path


def test_build_caches_by_content_and_rebuilds_what_changed(kernel_dir):
    first = kernels.build("sm_80")["twice"]
    assert first.parent == kernel_dir / "build" / "sm_80" and first.read_bytes().startswith(b"\x7fELF")
    mtime = first.stat().st_mtime_ns
    assert kernels.build("sm_80")["twice"] == first and first.stat().st_mtime_ns == mtime  # cached
    (kernel_dir / "shared.cuh").write_text("#pragma once\n#define TWO 3.0f\n")      # a header edit
    second = kernels.build("sm_80")["twice"]
    assert second != first and not first.exists()                                     # rebuilt, stale one gone
    assert kernels.build("sm_90a")["twice"].parent.name == "sm_90a"
    assert sorted(p.name for p in (kernel_dir / "build").rglob("*")) == sorted(
        ["sm_80", "sm_90a", second.name, kernels.build("sm_90a")["twice"].name])      # no temporary files left


def test_a_source_that_does_not_compile_is_named_with_nvccs_message(kernel_dir):
    (kernel_dir / "broken.cu").write_text('extern "C" __global__ void f() { undeclared_name = 1; }\n')
    with pytest.raises(kernels.BuildError, match=r"broken\.cu does not compile for sm_80:\n.*undeclared_name"):
        kernels.build("sm_80")
    assert not list((kernel_dir / "build").rglob("broken*"))


def test_warnings_are_errors(kernel_dir):
    (kernel_dir / "warns.cu").write_text('extern "C" __global__ void f(int* x) { int unused = 1; x[0] = 0; }\n')
    with pytest.raises(kernels.BuildError, match="warns.cu"):
        kernels.build("sm_80", only={"warns"})


def test_device_arch_names():
    assert kernels.device_arch("90") == "sm_90a" and kernels.device_arch("80") == "sm_80"
    assert kernels.device_arch("86") == "sm_86"


def kernels_command(*args):
    return subprocess.run([sys.executable, "-m", "kernels", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_help_is_help_and_builds_nothing():
    result = kernels_command("--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m kernels") and result.stderr == ""
    assert not (kernels.BUILD_DIR / "--help").exists()


@pytest.mark.parametrize("args, expected", [([], "name the architectures"),
                                            (["sm_bogus"], "sm_bogus is not an architecture: give sm_NN"),
                                            (["sm_1"], "sm_1: nvcc does not compile for it"),
                                            (["sm_80a"], "sm_80a: nvcc does not compile for it"),
                                            (["sm_80", "sm_bogus"], "sm_bogus is not an architecture")])
def test_a_bad_architecture_is_one_line_before_anything_is_built(args, expected):
    before = sorted(kernels.BUILD_DIR.rglob("*")) if kernels.BUILD_DIR.exists() else []
    result = kernels_command(*args)
    lines = result.stderr.splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"error: {expected}"), result.stderr
    assert (sorted(kernels.BUILD_DIR.rglob("*")) if kernels.BUILD_DIR.exists() else []) == before


def test_a_failed_build_leaves_no_empty_folder(kernel_dir):
    """nvcc's own refusal (sm_80a: no such architecture-specific set) comes from the first compile."""
    with pytest.raises(kernels.BuildError, match="twice.cu does not compile for sm_80a"):
        kernels.build("sm_80a")
    assert not (kernel_dir / "build").exists()
    kernels.build("sm_80")
    with pytest.raises(kernels.BuildError):
        kernels.build("sm_80a")
    assert sorted(p.name for p in (kernel_dir / "build").iterdir()) == ["sm_80"]


def fake_compiler(path, version_text):
    path.write_text(f"#!/bin/sh\ncat <<'END'\n{version_text}\nEND\n")
    path.chmod(0o755)
    return str(path)


def test_the_cache_key_is_nvccs_release_not_its_build_date(tmp_path, kernel_dir):
    """Cubins prepared on one machine (make gpu-prep) must be found on another whose nvcc is the
    same release built on another day; another release is another key."""
    versions = ["Cuda compilation tools, release 13.0, V13.0.88\nBuild cuda_13.0.r13.0/compiler.36424714_0",
                "Cuda compilation tools, release 13.0, V13.0.88\nBuild cuda_13.0.r13.0/compiler.99999999_1",
                "Cuda compilation tools, release 13.1, V13.1.12\nBuild cuda_13.1.r13.1/compiler.1_0"]
    releases = [kernels.compiler_release(fake_compiler(tmp_path / f"nvcc{i}", v)) for i, v in enumerate(versions)]
    assert releases[:2] == ["release 13.0"] * 2 and releases[2] == "release 13.1"
    paths = [kernels.cached_path(kernel_dir / "twice.cu", "sm_90a", kernels.NVCC_FLAGS, r) for r in releases]
    assert paths[0] == paths[1] != paths[2]
    assert kernels.cached_path(kernel_dir / "twice.cu", "sm_90a", kernels.NVCC_FLAGS + ("-G",), releases[0]) != paths[0]


# ----------------------------------------------------------------------------- the emulated device's build

EMULATED_GOOD = ('#include "common.cuh"\nextern "C" __global__ void __launch_bounds__(32)\n'
                 'twice(float* x) { x[threadIdx.x] *= 2.0f; }\n'
                 'extern "C" __global__ void thrice(float* x, int n) { if ((int)threadIdx.x < n) x[threadIdx.x] *= 3; }\n')


@pytest.fixture
def emulated_dir(tmp_path, monkeypatch, kernel_folder):
    kernel_folder(tmp_path, twice=EMULATED_GOOD)
    monkeypatch.setattr(kernels, "KERNEL_DIR", tmp_path)
    monkeypatch.setattr(kernels, "BUILD_DIR", tmp_path / "build")
    return tmp_path


def test_every_global_function_is_found_and_registered(emulated_dir):
    assert kernels.kernel_names(emulated_dir / "twice.cu") == ["twice", "thrice"]
    for source in sorted((REPO / "kernels").glob("*.cu")):  # the repository's: as many as __global__ appears
        assert len(kernels.kernel_names(source)) == source.read_text().count("__global__"), source.name
    import ctypes
    library = ctypes.CDLL(str(kernels.build_emulated()["twice"]))
    library.emulated_kernels.restype = ctypes.c_char_p
    assert library.emulated_kernels() == b"twice,thrice"


def test_the_emulated_build_caches_by_content_and_names_what_does_not_compile(emulated_dir):
    first = kernels.build_emulated()["twice"]
    assert first.parent == emulated_dir / "build" / "emulated" and first.suffix == ".so"
    mtime = first.stat().st_mtime_ns
    assert kernels.build_emulated()["twice"] == first and first.stat().st_mtime_ns == mtime
    (emulated_dir / "emulator" / "runtime.cpp").write_text((emulated_dir / "emulator" / "runtime.cpp").read_text()
                                                           + "\n// an edit\n")
    second = kernels.build_emulated()["twice"]
    assert second != first and not first.exists()  # the emulator is part of what makes a library
    (emulated_dir / "broken.cu").write_text('extern "C" __global__ void f() { undeclared_name = 1; }\n')
    with pytest.raises(kernels.BuildError, match=r"(?s)broken\.cu does not compile for emulated:\n.*undeclared_name"):
        kernels.build_emulated()
    (emulated_dir / "broken.cu").write_text('extern "C" __global__ void f(int* x) { int unused = 1; x[0] = 0; }\n')
    with pytest.raises(kernels.BuildError, match="broken.cu does not compile for emulated"):
        kernels.build_emulated(only={"broken"})  # warnings are errors here too
    assert sorted(p.name for p in (emulated_dir / "build" / "emulated").iterdir()) == [second.name]

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

"""kernels/__init__.py: nvcc builds each .cu once per architecture, caches it by content, rebuilds
what changed, and reports a source that does not compile by name. (Runs without a GPU; needs nvcc.)"""
import subprocess
import sys

import pytest

import kernels

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


def test_command_line_exit_status():
    ok = subprocess.run([sys.executable, "-m", "kernels"], capture_output=True, text=True)
    assert ok.returncode == 1 and "usage" in ok.stderr
    bad = subprocess.run([sys.executable, "-m", "kernels", "sm_1"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "sm_1" in bad.stderr

"""Check a GPU machine in one command: everything in this repository that needs a GPU, with no
network (`make gpu-check`), and fill, on a machine with network, the folder that such a machine needs
for it (`make gpu-prep DIR=dir`).

    python dev/gpu_check.py prep gpu_prep                  # wheels, Tiny Shakespeare, cubins (< 60 MiB)
    python dev/gpu_check.py run log_gpu_check --prep gpu_prep [--fetch $OUT] [--commit abc1234+dirty]
                                               [--stages tests,parity] [--tests ARGS]
    python dev/gpu_check.py summary log_gpu_check          # the summary screen again, from the records

`run` starts with a preflight: a GPU on the machine at all (its device files, or nvidia-smi), then the
device through CuPy, then the kernels built for it (nvcc needs none of the wheels, and a cold build is
the preflight's longest step), then the prep folder's wheels that the machine lacks, then the CUDA
backend proven (kernels.cuda_unavailable() is None, one cuBLASLt matmul through kernels.cuda) and the
versions read from the installed packages' metadata (importlib.metadata: no `import torch` for a
version string). It stops with one line when any of that fails. Then each stage of STAGES runs in its
own time slot (a hang costs that stage, not the run; a failed stage does not stop the later ones),
writing its logs and JSON records under OUT/<stage>/, and the run ends with one summary screen (also
OUT/summary.txt) and exit status 0 only if every stage passed. On a GPU machine a skipped GPU test is a
failure: without nvmath-python every GPU test skips, and the run would look green while testing
nothing. The training bench and the parity run rewrite their records as they go, so a stage stopped at
its limit still leaves one, marked so.

What comes back. --fetch DIR (the device tool's $OUT, which returns at most 8 files, 16 MiB each, 2
folders deep) receives, flat, after every stage: summary.txt, gpu_check.json, the stages' JSON records
(<stage>_<record>.json, as many as fit) and logs.tar.gz of all of OUT. The tree copied to a GPU
machine has no .git: --commit (what `git rev-parse --short HEAD` gave where the run was started, with
+dirty for uncommitted changes) goes into every record; without it, and without git, records say
commit "unknown".

The plan: seconds per stage within one 15-minute lease (900 s of device time, the machine's start
included), leaving room for a second start and a rerun of what failed (test_gpu_check holds it):

    machine start (device tool: 1-2 min, taken at 2)      120  estimate
    preflight                                               30  measured here: device probe ~1 s (CuPy import);
        kernels cold 5.3-6.1 s (8 sources, sm_90a, nvcc 13.0, one after another, on 2 cores; 0.0 s when
        the prep's cubins hit the cache); pip install of the 4 prep wheels 0.8-1.0 s; backend probe
        (CuPy, nvmath, 8 cubins loaded, one matmul) a few s: estimate
    tests                                                  140  estimate: 165 GPU tests
    kernels                                                 40  estimate: import torch (2.0 s here for the CPU
        build with its files evicted from the page cache; the CUDA build loads ~3 GB more: 5-10 s, estimate),
        ~20 kernels x 2 sides x 23 calls of < 1 ms
    train (B=16)                                            90  estimate: torch.compile of d12 forward+backward
        30-60 s cold, our set-up ~4 s (init_params of d12 2.5 s here), 3 warm-up + 30 timed steps per side
        (~0.1 s each at B=16)
    train-max (B=64, or 32)                                 90  the same, one compile more; a B that does not fit
        fails in our set-up (seconds) or in PyTorch's first step
    parity                                                  60  three trainers at once on the GPU (ours, PyTorch
        eager fp32 and bf16), 50 steps of 16,384 tokens: fp32 ~0.3 s a step (GEMMs at ~50 of 67 TFLOP/s),
        the bf16 ones ~0.05 s, each process ~10 s to start (torch, 124M init): estimate
    gpu_check itself (tarball, summary)                     10
    = one run 460 s (under the device tool's 600 s per command); then a second start (120) and a rerun
      of the preflight and the longest stage (180): 880 of 900 s.

Each stage's record holds its seconds, and the preflight's record the seconds of each of its steps:
the figures to plan the next run with.

The prep folder mirrors the repository: DIR/wheels/ (what `run` installs, into a temporary folder on
PYTHONPATH, when the machine lacks it), DIR/data/ and DIR/kernels/build/ (copied into the repository
where files are missing).
"""
import argparse
import glob
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "dev/bench")]
import records  # noqa: E402
from cli import ArgumentParser, fail, run  # noqa: E402

# What a machine may lack for the run, as pip requirements: nvmath-python (requirements-gpu.txt's
# pin), the versions of cuda-core and cuda-pathfinder that its import asks for, and the per-test
# timeout plugin. Each is installed from the prep folder only where the machine lacks it.
PREP_REQUIREMENTS = ("nvmath-python==1.0.0", "cuda-core>=0.5.0,<2", "cuda-pathfinder>=1.5.1,<2", "pytest-timeout>=2.1")
PREP_PYTHON, PREP_PLATFORMS = "3.12", ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                                       "manylinux_2_17_x86_64", "manylinux2014_x86_64")
PREP_ARCHS = ("sm_90a",)                  # Hopper (H100, H200); another GPU's nvcc compiles its own in seconds
PREP_OVERLAYS = ("data", "kernels/build")  # copied into the repository where a file is missing
PREP_LIMIT_MIB = 60                       # the device tool carries 64 MiB with the working tree

# The plan of the module docstring, in seconds.
LEASE_S = 900         # one lease of device time, the machine's start included
MACHINE_START_S = 120  # the device tool says 1-2 minutes
OVERHEAD_S = 10       # gpu_check's own: starting, the summary, the tarball
PREFLIGHT_LIMIT_S = 30
GRACE_S = 10          # a slot's last seconds: SIGINT at their start (pytest still writes its junit XML), SIGKILL at the end
TEST_TIMEOUT_S = 60   # pytest-timeout, per GPU test (fixture set-up included)
BENCH_STEPS = ("-n", "30", "-w", "3")
OOM = "ran out of GPU memory"  # dev/bench/train.py's line when a side does not fit

# What the device tool brings back from $OUT: at most 8 files, 16 MiB each, 2 folders deep.
FETCH_FILES, FETCH_FILE_BYTES = 8, 16 * 2**20

# An NVIDIA GPU shows as a device file /dev/nvidia<N> (on Linux, and in a container given one); WSL has
# no such file, and there nvidia-smi lists the GPU.
GPU_DEVICE_FILES = "/dev/nvidia[0-9]*"
NVIDIA_SMI_TIMEOUT_S = 10

# The device, with CuPy alone: what the kernel build needs to know (its architecture).
DEVICE_PROBE = r"""
import importlib.util, json
info = {"cupy": importlib.util.find_spec("cupy") is not None, "device_error": None}
if info["cupy"]:
    import cupy
    from kernels import device_arch
    try:
        if cupy.cuda.runtime.getDeviceCount() > 0:
            info.update(arch=device_arch(cupy.cuda.Device(0).compute_capability),
                        device=cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                        driver=cupy.cuda.runtime.driverGetVersion())
        else:
            info["device_error"] = "no CUDA device"
    except cupy.cuda.runtime.CUDARuntimeError as e:
        info["device_error"] = f"no usable CUDA device ({e})"
print(json.dumps(info))
"""

# The CUDA backend at work, and the versions of what the stages import, from the packages' metadata.
BACKEND_PROBE = r"""
import importlib.metadata, json, sys
from kernels import cuda_unavailable
info = {"reason": cuda_unavailable()}
if info["reason"] is None:
    import cupy, numpy
    from kernels import cuda_backend
    K = cuda_backend("gpu")
    # one bf16 GEMM with the bias in cuBLASLt's epilogue: ones (64 of them summed) plus a bias of 1
    one = numpy.uint16(0x3F80)
    out = cupy.zeros((16, 64), cupy.uint16)
    K.matmul_forward(out, cupy.full((16, 64), one), cupy.full((64, 64), one), cupy.full(64, one))
    K.synchronize()
    assert (out == 0x4282).all(), "a 16x64x64 matmul of ones plus bias 1 is not 65 (bf16 0x4282)"
    distributions = importlib.metadata.packages_distributions()
    info.update(python=sys.version.split()[0],
                versions={d: importlib.metadata.version(d) for module in ("cupy", "nvmath", "torch", "numpy")
                          for d in distributions.get(module, [])[:1]})
print(json.dumps(info))
"""


# ----------------------------------------------------------------------------- running commands in a slot

@dataclass
class Result:
    rc: int
    output: str
    timed_out: bool


@dataclass
class Slot:
    """One stage's time, folder and record: every command it runs shares the stage's deadline, and
    writes its output to OUT/<stage>/log.txt."""
    name: str
    dir: Path
    deadline: float
    env: dict
    tests: list
    record: dict = field(default_factory=dict)

    def command(self, argv):
        """Run argv (from the repository root) until it ends or the slot's time is up."""
        log = self.dir / "log.txt"
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(argv)}\n")
            start = f.tell()
            f.flush()
            proc = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            timed_out = False
            try:
                proc.wait(timeout=max(0.0, self.deadline - GRACE_S - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                stop(proc, grace_s=max(0.0, self.deadline - time.monotonic()))
            kill_group(proc)  # what it left running (compile workers, a launcher's ranks) ends with it
        with open(log) as f:
            f.seek(start)
            output = f.read()
        self.record.setdefault("commands", []).append(
            {"argv": argv, "rc": proc.returncode, "timed_out": timed_out})
        if timed_out:
            self.record["timed_out"] = True
        return Result(proc.returncode, output, timed_out)

    def note(self, line):
        """A line for the summary, kept in the run's record."""
        self.record.setdefault("notes", []).append(line)

    def seconds_left(self):
        return self.deadline - time.monotonic()


def stop(proc, grace_s):
    """SIGINT to the command's process group (Python unwinds, pytest writes its report), then, after
    grace_s, SIGKILL."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    kill_group(proc)
    proc.wait()


def kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ----------------------------------------------------------------------------- the stages

def gpu_test_files():
    """The test files that hold GPU tests: those importing tests/cuda_testing.py, where the gpu marks
    and the devices a kernel test runs on come from. Not all of tests/: a CPU test file that cannot
    even be collected on the GPU machine (a package only CI has) is no failure of the GPU."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if re.search(r"^from cuda_testing import ", p.read_text(), re.M))


def run_tests(slot):
    junit = slot.dir / "tests.xml"
    result = slot.command([sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider",
                           "--continue-on-collection-errors", f"--timeout={TEST_TIMEOUT_S}",
                           "-o", "junit_family=xunit1", f"--junitxml={junit}", *(slot.tests or gpu_test_files())])
    counts = junit_counts(junit) if junit.exists() else {}
    total = sum(sum(c.values()) for c in counts.values())
    return result.rc == 0 and total > 0 and not any(c["skipped"] for c in counts.values())


def run_kernel_bench(slot):
    return slot.command([sys.executable, "dev/bench/kernels.py", "-o", str(slot.dir)]).rc == 0


def train_bench(slot, B):
    return slot.command([sys.executable, "dev/bench/train.py", "--device", "cuda", "-e", "d12", "-b", str(B), "-t",
                         "1024", *BENCH_STEPS, "-o", str(slot.dir)])


def run_train_bench(slot):
    return train_bench(slot, 16).rc == 0


def run_largest_batch(slot):
    """The largest power-of-two B up to 64 at which both trainers fit (16 is the train stage's)."""
    for B in (64, 32):
        result = train_bench(slot, B)
        if result.rc == 0:
            slot.note(f"largest power-of-two B that fits: {B}")
            return True
        if result.timed_out or OOM not in result.output:
            return False
        slot.note(next(line for line in result.output.splitlines() if OOM in line).removeprefix("error: "))
    slot.note("largest power-of-two B that fits: 16 (the train stage's)")
    return True


def run_loss_parity(slot):
    """dev/loss_parity.py's own plan (its defaults: d12, 50 steps of 16,384 tokens), the same on every
    machine: a verdict comparable from run to run, not a step count fitted to the time left."""
    return slot.command([sys.executable, "dev/loss_parity.py", "--device", "cuda", "-o", str(slot.dir / "runs"),
                         "--results", str(slot.dir)]).rc == 0


# ----------------------------------------------------------------------------- summaries, from the records

def junit_counts(junit):
    """{test file: Counter(passed=, failed=, skipped=)} from pytest's junit XML (xunit1: a file per
    test case); errors (set-up, collection) count as failed."""
    counts = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        if "file" not in case.attrib:  # the test a KeyboardInterrupt cut short: no name, no outcome
            continue
        outcome = ("failed" if case.find("failure") is not None or case.find("error") is not None
                   else "skipped" if case.find("skipped") is not None else "passed")
        counts.setdefault(case.get("file"), Counter(passed=0, failed=0, skipped=0))[outcome] += 1
    return counts


def last_test_started(log):
    """The node id of the last test pytest -v began, from its log: where a stopped run was."""
    started = re.findall(r"^(tests/[^\s:]+\.py::.+?) (?:PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS|$)",
                         log.read_text(errors="replace"), re.M) if log.exists() else []
    return started[-1] if started else None


def summarise_tests(folder, record):
    junit = folder / "tests.xml"
    if not junit.exists():
        return ["no junit record (pytest did not get to write it: see log.txt)"]
    counts = junit_counts(junit)
    lines = [f"{'test file':40s} {'passed':>7s} {'failed':>7s} {'skipped':>8s}"]
    for name, c in sorted(counts.items()):
        lines.append(f"{name:40s} {c['passed']:7d} {c['failed']:7d} {c['skipped']:8d}"
                     + ("   <- skipped GPU tests fail" if c["skipped"] else ""))
    total = sum(counts.values(), Counter())
    lines.append(f"{'all':40s} {total['passed']:7d} {total['failed']:7d} {total['skipped']:8d}")
    if record.get("timed_out"):
        lines.append(f"stopped at the slot's limit during {last_test_started(folder / 'log.txt')}")
    return lines


def summarise_kernels(folder, record):
    records = sorted(folder.glob("kernels_*.json"))
    if not records:
        return ["no kernel bench record"]
    bench = json.loads(records[0].read_text())
    rows = bench["kernels"]
    faster = [r for r in rows if r["ratio_torch_eager_over_ours"] >= 1]
    slowest = min(rows, key=lambda r: r["ratio_torch_eager_over_ours"])
    return [f"{len(rows)} kernels; ours as fast as PyTorch eager's or faster in {len(faster)}; the furthest behind: "
            f"{slowest['kernel']} (torch eager/ours {slowest['ratio_torch_eager_over_ours']:.2f}); card: copy "
            f"{bench['peaks']['copy_GBps']} GB/s, bf16 matmul {bench['peaks']['bf16_matmul_TFLOPs']} TFLOP/s"]


def percent(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def number(x, spec):
    return "n/a" if x is None else format(x, spec)


def summarise_train(folder, record):
    """Per record of dev/bench/train.py (one per B): how it ran, then a line per side and the ratios."""
    lines = []
    for path in sorted(folder.glob("train_*.json"), key=lambda p: json.loads(p.read_text())["B"]):
        r = json.loads(path.read_text())
        peak = "no datasheet peak" if r["peak_flops"] is None else f"datasheet {r['peak_flops'] / 1e12:.1f}"
        lines.append(f"B={r['B']} T={r['T']}, {r['rounds']} rounds: {r['status']}; order: {r['order'] or 'n/a'}")
        lines.append(f"  MFU against {peak} | measured matmul {r['matmul_flops'] / 1e12:.1f} TFLOP/s; memory: "
                     f"{r['memory'].split(':')[0]}")
        for side, f in r["sides"].items():
            timing = (f"median {f['median_ms']:.2f} ms (min {f['min_ms']:.2f}, max {f['max_ms']:.2f}, "
                      f"{len(f['step_ms'])} steps), {f['tok_s']:,.0f} tok/s, MFU {percent(f['mfu'])} | "
                      f"{percent(f['mfu_of_matmul'])}" if "median_ms" in f else "no timed step")
            lines.append(f"  {side:14s} {timing}; memory {number(f['memory_mib'], ',.0f')} MiB; set-up "
                         f"{number(f['setup_s'], '.1f')} s, first step {number(f['first_step_s'], '.1f')} s")
        lines += [f"  {name} (tok/s at the medians): {ratio:.3f}" for name, ratio in r["ratios"].items()]
    return lines or ["no train bench record"]


def summarise_parity(folder, record):
    records = sorted(folder.glob("loss_parity_*.json"))
    if not records:
        return ["no loss parity record"]
    r = json.loads(records[0].read_text())
    lines = [f"{r['steps']} steps ({r['epochs']:.2f} epochs): {r['status']}"]
    lines += [f"  {name:10s} {len(run['train'])} steps, {run['seconds']} s (first step "
              f"{number(run['first_step_ms'], ',.0f')} ms, then {number(run['median_step_ms'], ',.0f')} ms); last "
              f"val loss {number(run['val'][-1] if run['val'] else None, '.4f')}" for name, run in r["runs"].items()]
    if r["gaps"] is not None:
        g, bars = r["gaps"], r["bars"]
        lines.append(f"  largest gap to torch fp32, train loss (moving average of {r['smooth']}): ours "
                     f"{g['ours_train']:.4f} | torch bf16 {g['torch_bf16_train']:.4f}, bar {bars['train']:.4f}; val "
                     f"loss: ours {g['ours_val']:.4f} | torch bf16 {g['torch_bf16_val']:.4f}, bar {bars['val']:.4f}: "
                     f"{'PASS' if r['passed'] else 'FAIL'}")
    return lines


@dataclass
class Stage:
    name: str
    limit_s: int
    run: Callable        # run(slot) -> True when the stage passed; its commands go through slot.command
    summary: Callable    # summary(stage folder, the stage's record) -> lines for the summary screen
    proves: str          # one line, for --help and docs/gpu-check.md


# A check that needs a GPU is a stage here: a function that runs its commands through the slot, a
# function that summarises what they left in the stage's folder, and a time limit. The limits are the
# module docstring's plan: a stage added for another check takes its time from the others.
STAGES = [
    Stage("tests", 140, run_tests, summarise_tests,
          "every GPU test (pytest -m gpu): kernels against their twins, d12 against PyTorch with llm.c's bars, "
          "bit-identical reruns, -y 1 bit-exact; a skipped GPU test fails"),
    Stage("kernels", 40, run_kernel_bench, summarise_kernels,
          "each kernel beside its PyTorch eager counterpart at GPT-2 124M shapes (dev/bench/kernels.py)"),
    Stage("train", 90, run_train_bench, summarise_train,
          "d12 training steps at B=16 T=1024, ours alternating with PyTorch compiled: per-step median, min, max, "
          "tok/s, MFU against the datasheet and the measured matmul rate, reserved memory"),
    Stage("train-max", 90, run_largest_batch, summarise_train,
          "the same at the largest power-of-two B up to 64 that fits both"),
    Stage("parity", 60, run_loss_parity, summarise_parity,
          "d12 loss curves on Tiny Shakespeare, 50 steps: ours against PyTorch eager fp32, within a bar set by "
          "PyTorch eager bf16's own distance from it (dev/loss_parity.py)"),
]


def summary(out, stages=STAGES):
    """The summary screen, from OUT's records alone; and whether every stage recorded there passed."""
    record = json.loads((out / "gpu_check.json").read_text())
    probe = record["preflight"]
    lines = [f"gpu-check on {probe['device']} ({probe['arch']}, driver {probe['driver']}, Python {probe['python']}, "
             + ", ".join(f"{k} {v}" for k, v in probe["versions"].items()) + f"), commit {record['commit']}",
             "preflight: " + ", ".join(f"{step} {seconds:.1f} s" for step, seconds in probe["seconds"].items())
             + f" ({probe['cubins_built']} cubins built here)"]
    ran = [s for s in stages if s.name in record["stages"]]
    for stage in ran:
        r = record["stages"][stage.name]
        earlier = "" if r["run"] == record["run"] else " (an earlier run)"
        lines.append(f"\n== {stage.name}: {r['status'].upper()} in {r['seconds']:.0f} s of {r['limit_s']} s{earlier}")
        try:
            found = stage.summary(out / stage.name, r)
        except Exception as e:  # a record cut short by the slot's end, say: the other stages still show
            found = [f"cannot read its records: {type(e).__name__}: {e}"]
        lines += [f"   {line}" for line in r.get("notes", []) + found]
        log = out / stage.name / "log.txt"
        if r["status"] != "passed" and log.exists():
            tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
            lines.append(f"   log.txt ends: {tail[-1][:200] if tail else '(empty)'}")
    failed = [s.name for s in ran if record["stages"][s.name]["status"] != "passed"]
    lines.append("\ngpu-check: " + (f"FAILED: {', '.join(failed)}" if failed else f"PASSED ({len(ran)} stages)"))
    return "\n".join(lines), not failed


# ----------------------------------------------------------------------------- preflight and the run

def distribution_name(wheel):
    return wheel.name.split("-")[0].replace("_", "-").lower()


def wheels_to_install(wheels, installed_version):
    """The prep folder's wheels for the PREP_REQUIREMENTS that this Python does not meet:
    installed_version(name) is the installed version or None."""
    from packaging.requirements import Requirement
    chosen = []
    for requirement in map(Requirement, PREP_REQUIREMENTS):
        have = installed_version(requirement.name)
        if have is not None and requirement.specifier.contains(have, prereleases=True):
            continue
        chosen += [w for w in wheels if distribution_name(w) == requirement.name.lower()]
    return chosen


def installed_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def copy_missing(src_root, dst_root):
    """Every file under src_root that dst_root lacks, copied there (what is there stays)."""
    for src in sorted(p for p in src_root.rglob("*") if p.is_file()):
        dst = dst_root / src.relative_to(src_root)
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


class PreflightError(Exception):
    """Why the machine cannot run the stages, in one line."""


def gpu_missing():
    """Why this machine has no NVIDIA GPU, in one line, or None when it has one. Asked before anything
    imports CuPy, so that a machine without a GPU says that, and not what Python packages it lacks."""
    if glob.glob(GPU_DEVICE_FILES):
        return None
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no GPU on this machine: no /dev/nvidia<N> device and no nvidia-smi"
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"no GPU on this machine: no /dev/nvidia<N> device, and nvidia-smi -L gave no answer in " \
               f"{NVIDIA_SMI_TIMEOUT_S} s"
    if listed.returncode == 0 and re.search(r"^GPU \d+:", listed.stdout, re.MULTILINE):
        return None
    said = [line.strip() for line in (listed.stdout + listed.stderr).splitlines() if line.strip()]
    return f"no GPU on this machine: no /dev/nvidia<N> device, and nvidia-smi -L says " \
           f"{said[0] if said else f'nothing (exit status {listed.returncode})'}"


def logged(argv, env, log, deadline, what):
    """Run argv (from the repository root) before the preflight's deadline, its output appended to
    log; its stdout, or PreflightError naming `what` with its last line of error."""
    try:
        result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise PreflightError(f"{what}: not done within the preflight's {PREFLIGHT_LIMIT_S} s (see {log})") from None
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(argv)}\n{result.stdout}{result.stderr}")
    if result.returncode != 0:
        last = [line for line in result.stderr.splitlines() if line.strip()]
        raise PreflightError(f"{what}: {last[-1] if last else f'exit status {result.returncode}'} (see {log})")
    return result.stdout


def preflight(out, prep, site, env):
    """The device, the kernels built for it, the wheels it lacks installed, the CUDA backend proven:
    its record (with the seconds of each step), or PreflightError. env gains the wheels' PYTHONPATH."""
    deadline = time.monotonic() + PREFLIGHT_LIMIT_S
    log = out / "preflight.log"
    seconds = {}

    def step(name, argv, what):
        start = time.monotonic()
        stdout = logged(argv, env, log, deadline, what)
        seconds[name] = round(time.monotonic() - start, 2)
        return stdout

    def probe(name, code):
        stdout = step(name, [sys.executable, "-c", code], "the GPU backend does not run here")
        return json.loads(stdout.splitlines()[-1])

    missing = gpu_missing()
    if missing is not None:
        raise PreflightError(missing)
    info = probe("device", DEVICE_PROBE)
    if not info["cupy"] or info["device_error"] is not None:  # nothing in the prep folder can help
        raise PreflightError("no usable GPU backend: " + (
            info["device_error"] or "CuPy is not installed (pip install -r requirements-gpu.txt)"))
    build_start = time.time()
    step("kernels", [sys.executable, "-m", "kernels", info["arch"]], f"the kernels do not build for {info['arch']}")
    # 0 when the prep folder's cubins were found in the cache
    info["cubins_built"] = sum(p.stat().st_mtime >= build_start
                               for p in (REPO / "kernels/build" / info["arch"]).glob("*.cubin"))
    wheels = [] if prep is None else wheels_to_install(sorted((prep / "wheels").glob("*.whl")), installed_version)
    if wheels:
        step("wheels", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(site), *map(str, wheels)],
             f"pip could not install {', '.join(w.name for w in wheels)} from {prep / 'wheels'}")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    backend = probe("backend", BACKEND_PROBE)
    if backend["reason"] is not None:
        hint = " (make gpu-prep DIR=... on a machine with network brings it)" if "nvmath" in backend["reason"] else ""
        raise PreflightError(f"no usable GPU backend: {backend['reason']}{hint}")
    del info["cupy"], info["device_error"]
    return dict(info, python=backend["python"], versions=backend["versions"], seconds=seconds)


def parse_names(text, valid, what):
    names = [n for n in re.split(r"[,\s]+", text or "") if n]
    unknown = [n for n in names if n not in valid]
    if unknown:
        fail(f"{what} {' '.join(unknown)}: not one of {', '.join(valid)}")
    return names or list(valid)


def fetch_folder(fetch, out):
    """--fetch, made: one line and exit 1 when it holds files already (everything there is rewritten:
    the device tool empties $OUT before each command), or nests with OUT (the tarball would hold
    itself, or OUT's files would crowd the few that come back)."""
    if fetch is None:
        return None
    if fetch == out or fetch in out.parents or out in fetch.parents:
        fail(f"--fetch {fetch}: must lie outside {out}, and {out} outside it")
    if fetch.exists() and (not fetch.is_dir() or any(fetch.iterdir())):
        fail(f"--fetch {fetch}: not an empty folder: give a new or empty one")
    fetch.mkdir(parents=True, exist_ok=True)
    return fetch


def publish(out, fetch):
    """What a remote caller fetches, flat in `fetch`: summary.txt, gpu_check.json, the stages' JSON
    records (<stage>_<name>.json, in the stages' order) while FETCH_FILES lasts, and logs.tar.gz of
    all of OUT. Each file is
    written to a temporary name and renamed; what an earlier call left there and this one did not
    write goes."""
    if fetch is None:
        return
    chosen = {p.name: p for p in (out / "summary.txt", out / "gpu_check.json") if p.exists()}
    order = [stage.name for stage in STAGES]
    stage_records = sorted(out.glob("*/*.json"), key=lambda p: (order.index(p.parent.name) if p.parent.name in order
                                                                 else len(order), p.parent.name, p.name))
    room = FETCH_FILES - len(chosen) - 1  # the tarball's place
    chosen.update({f"{p.parent.name}_{p.name}": p for p in stage_records[:room]})
    for name, src in chosen.items():
        shutil.copyfile(src, fetch / f"{name}.tmp")
        os.replace(fetch / f"{name}.tmp", fetch / name)
    with tarfile.open(fetch / "logs.tar.gz.tmp", "w:gz") as tar:
        tar.add(out, arcname=out.name)
    os.replace(fetch / "logs.tar.gz.tmp", fetch / "logs.tar.gz")
    for stale in {p.name for p in fetch.iterdir()} - set(chosen) - {"logs.tar.gz"}:
        (fetch / stale).unlink()
    if len(stage_records) > room:
        print(f"{len(stage_records) - room} records are only in {fetch}/logs.tar.gz ({FETCH_FILES} files come back)")
    too_large = [p.name for p in fetch.iterdir() if p.stat().st_size > FETCH_FILE_BYTES]
    if too_large:
        print(f"{', '.join(too_large)} in {fetch}: over the {FETCH_FILE_BYTES // 2**20} MiB that a file may have to "
              "come back")


def check(out, prep, stage_names, tests, fetch=None, commit=None):
    """Preflight, then the stages named (all by default); True when every stage recorded in OUT passed.
    The records name `commit`, or, without it, what records.commit() finds."""
    chosen = parse_names(stage_names, [s.name for s in STAGES], "--stages")
    if commit is not None and not records.COMMIT.fullmatch(commit):
        fail(f"--commit {commit}: give a commit id as git prints it (7 to 40 hex digits), +dirty added for a tree "
             "with uncommitted changes")
    commit = commit or records.commit()
    out.mkdir(parents=True, exist_ok=True)
    fetch = fetch_folder(fetch, out)
    if prep is not None and not prep.is_dir():
        prep = None
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{records.COMMIT_ENV: commit})
    with tempfile.TemporaryDirectory(prefix="gpu_check_site_") as site:
        if prep is not None:
            for overlay in PREP_OVERLAYS:
                copy_missing(prep / overlay, REPO / overlay)
        try:
            info = preflight(out, prep, Path(site), env)
        except PreflightError as e:
            (out / "summary.txt").write_text(f"gpu-check: stopped in the preflight: {e}\n")
            publish(out, fetch)
            fail(str(e))
        return run_stages(out, STAGES, chosen, dict(info, commit=commit), env, shlex.split(tests or ""), fetch)


def run_stages(out, stages, chosen, info, env, tests, fetch=None):
    """Each stage of `stages` named in `chosen`, in its slot, recorded in OUT/gpu_check.json (which
    keeps the other stages' records from earlier runs) and published to `fetch` after each; then the
    summary of all of them."""
    from fileformats import write_json  # needs NumPy: imported once the preflight found the GPU stack, so that
    # a machine without it still gets the preflight's one line
    record_path = out / "gpu_check.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"stages": {}}
    record.update(run=datetime.now().isoformat(timespec="milliseconds"), preflight=info, commit=info["commit"])
    print(f"gpu-check on {info['device']}, commit {info['commit']}: {', '.join(chosen)}; logs and records in {out}/"
          + (f", what comes back in {fetch}/" if fetch else ""), flush=True)
    for stage in (s for s in stages if s.name in chosen):
        folder = out / stage.name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        start = time.monotonic()
        slot = Slot(stage.name, folder, start + stage.limit_s, env, tests)
        print(f"[{stage.name}] up to {stage.limit_s} s ...", flush=True)
        try:
            passed = stage.run(slot)
        except Exception as e:  # a bug of the stage's own (a record it expected, missing) fails that stage only
            slot.note(f"gpu_check's {stage.name} stage raised {type(e).__name__}: {e}")
            passed = False
        status = "timed out" if slot.record.get("timed_out") else "passed" if passed else "failed"
        seconds = time.monotonic() - start
        record["stages"][stage.name] = dict(slot.record, status=status, seconds=seconds, limit_s=stage.limit_s,
                                            run=record["run"])
        write_json(record_path, record)
        print(f"[{stage.name}] {status} in {seconds:.0f} s", flush=True)
        publish(out, fetch)
    text, passed = summary(out, stages)
    (out / "summary.txt").write_text(text + "\n")
    publish(out, fetch)
    print("\n" + text)
    return passed


# ----------------------------------------------------------------------------- prep

def checked(argv):
    if subprocess.run(argv, cwd=REPO).returncode != 0:
        fail(f"{shlex.join(argv[1:4])} ... failed (its output is above)")


def prep_folder(folder):
    """Fill folder with what an offline GPU machine needs for `run`."""
    folder.mkdir(parents=True, exist_ok=True)
    wheels = folder / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)  # one version of each: two would stop the install
    platforms = [x for p in PREP_PLATFORMS for x in ("--platform", p)]
    checked([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
             PREP_PYTHON, "--implementation", "cp", *platforms, "-d", str(wheels), *PREP_REQUIREMENTS])
    # into the repository's own data/ (reused when there), from which the shards and the tokenizer travel
    from train_gpt2 import TOKENIZER, TRAIN_DATA, VAL_DATA
    checked([sys.executable, "-m", "prepro.tinyshakespeare"])
    for name in (TRAIN_DATA, VAL_DATA, TOKENIZER):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, folder / name)
    from kernels import BuildError, build
    for arch in PREP_ARCHS:
        try:
            cubins = build(arch)
        except BuildError as e:
            fail(str(e).splitlines()[0])
        target = folder / "kernels/build" / arch
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for path in cubins.values():
            shutil.copy2(path, target / path.name)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    mib = sum(p.stat().st_size for p in files) / 2**20
    for p in files:
        print(f"{p.stat().st_size / 2**20:8.2f} MiB  {p.relative_to(folder)}")
    print(f"{mib:8.2f} MiB  in all, {folder}/")
    if mib > PREP_LIMIT_MIB:
        fail(f"{folder}: {mib:.1f} MiB, over the {PREP_LIMIT_MIB} MiB a GPU machine's copy can carry")


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="stages of run, in order, each with its time limit:\n" + "\n".join(
                                f"  {s.name:10s} {s.limit_s:3d} s  {s.proves}" for s in STAGES))
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("prep", help="fill DIR with wheels, data and cubins for an offline GPU machine")
    p.add_argument("dir", type=Path)
    r = verbs.add_parser("run", help="check this GPU machine; logs and records under OUT")
    r.add_argument("out", type=Path)
    r.add_argument("--prep", type=Path, help="the folder `prep` filled, used when it exists")
    r.add_argument("--stages", default="", help="stages to run, by name (default: all, in order)")
    r.add_argument("--tests", default="", help="pytest arguments choosing GPU tests (default: every file holding one)")
    r.add_argument("--fetch", type=Path, help="an empty folder to receive, after every stage, what a remote caller "
                                              "fetches (at most 8 files, flat): the device tool's $OUT")
    r.add_argument("--commit", help="the commit the tree is, +dirty for uncommitted changes, for the records (default: "
                                    "git's answer here, or unknown)")
    s = verbs.add_parser("summary", help="print the summary of OUT's records again")
    s.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.verb == "prep":
        prep_folder(args.dir.resolve())
    elif args.verb == "run":
        sys.exit(0 if check(args.out.resolve(), args.prep and args.prep.resolve(), args.stages, args.tests,
                            args.fetch and args.fetch.resolve(), args.commit) else 1)
    else:
        if not (args.out / "gpu_check.json").exists():
            fail(f"{args.out}: no gpu_check.json (not a gpu-check output folder)")
        text, passed = summary(args.out)
        print(text)
        sys.exit(0 if passed else 1)


if __name__ == "__main__":
    run(main)

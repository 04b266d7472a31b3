"""Check a GPU machine in one command: everything in this repository that needs a GPU, in about 7
minutes, with no network (`make gpu-check OUT=dir`). And fill, on a machine with network, the folder
that such a machine needs for it (`make gpu-prep DIR=dir`).

    python dev/gpu_check.py prep gpu_prep                  # wheels, Tiny Shakespeare, cubins (< 60 MiB)
    python dev/gpu_check.py run log_gpu_check --prep gpu_prep [--stages tests,parity] [--tests ARGS]
    python dev/gpu_check.py summary log_gpu_check          # the summary screen again, from the records

`run` first proves that the CUDA backend is really there (kernels.cuda_unavailable() is None, then one
cuBLASLt matmul through kernels.cuda) and fails with one line otherwise. Then each stage of STAGES
runs in its own time slot (a hang costs that stage, not the run; a failed stage does not stop the
later ones), writing its logs and JSON records under OUT/<stage>/, and the run ends with one summary
screen (also OUT/summary.txt) and exit status 0 only if every stage passed. On a GPU machine a
skipped GPU test is a failure: without nvmath-python every GPU test skips, and the run would look
green while testing nothing.

The prep folder mirrors the repository: DIR/wheels/ (what `run` installs, into a temporary folder on
PYTHONPATH, when the machine lacks it), DIR/data/ and DIR/kernels/build/ (copied into the repository
where files are missing).
"""
import argparse
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
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]
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

PREFLIGHT_LIMIT_S = 40
GRACE_S = 10          # a slot's last seconds: SIGINT at their start (pytest still writes its junit XML), SIGKILL at the end
TEST_TIMEOUT_S = 60   # pytest-timeout, per GPU test (fixture set-up included)
BENCH_STEPS = ("-n", "10", "-w", "3")
PARITY_MIN_STEPS, PARITY_VAL_EVERY = 100, 25
PARITY_STEP_SHARE = 0.4  # of the parity slot spent in training steps; the rest starts two trainers (compile)
OOM = "ran out of GPU memory"  # dev/bench/train.py's line when a side does not fit

PROBE = r"""
import importlib.util, json, sys
from kernels import cuda_unavailable
info = {"reason": cuda_unavailable(), "cupy": importlib.util.find_spec("cupy") is not None, "device_error": None}
if info["cupy"]:
    import cupy
    try:
        info["device_error"] = None if cupy.cuda.runtime.getDeviceCount() > 0 else "no CUDA device"
    except cupy.cuda.runtime.CUDARuntimeError as e:
        info["device_error"] = f"no usable CUDA device ({e})"
if info["reason"] is None:
    import cupy, numpy, nvmath, torch
    from kernels import cuda as K
    # one bf16 GEMM with the bias in cuBLASLt's epilogue: ones (64 of them summed) plus a bias of 1
    one = numpy.uint16(0x3F80)
    out = cupy.zeros((16, 64), cupy.uint16)
    K.matmul_forward(out, cupy.full((16, 64), one), cupy.full((64, 64), one), cupy.full(64, one))
    K.synchronize()
    assert (out == 0x4282).all(), "a 16x64x64 matmul of ones plus bias 1 is not 65 (bf16 0x4282)"
    info.update(device=K.DEVICE, arch=K.ARCH, driver=cupy.cuda.runtime.driverGetVersion(), python=sys.version.split()[0],
                versions={m.__name__: m.__version__ for m in (cupy, nvmath, torch, numpy)})
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
    """The test files that hold GPU tests: those importing tests/cuda_testing.py's requires_gpu marks.
    Not all of tests/: a CPU test file that cannot even be collected on the GPU machine (a package
    only CI has) is no failure of the GPU."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if re.search(r"^from cuda_testing import .*\brequires_gpu\b", p.read_text(), re.M))


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


def parity_steps(train_record, limit_s):
    """As many steps as PARITY_STEP_SHARE of the slot holds at the step times the train stage measured
    (B=16, T=1024, ours + PyTorch), in whole val intervals, at least PARITY_MIN_STEPS."""
    if train_record is None:
        return PARITY_MIN_STEPS
    step_s = (train_record["ours_ms_per_step"] + train_record["torch_ms_per_step"]) / 1000
    steps = int(PARITY_STEP_SHARE * limit_s / step_s) // PARITY_VAL_EVERY * PARITY_VAL_EVERY
    return max(PARITY_MIN_STEPS, steps)


def run_loss_parity(slot):
    records = sorted((slot.dir.parent / "train").glob("train_*_d12_b16_t1024.json"))
    steps = parity_steps(json.loads(records[0].read_text()) if records else None, slot.seconds_left())
    slot.note(f"{steps} steps ({'fitted to the train stage step times' if records else 'no train stage record'})")
    return slot.command([sys.executable, "dev/loss_parity.py", "-e", "d12", "-b", "16", "-t", "1024",
                         "-x", str(steps), "-v", str(PARITY_VAL_EVERY), "-o", str(slot.dir / "runs"),
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
    faster = [r for r in rows if r["ratio_torch_over_ours"] >= 1]
    slowest = min(rows, key=lambda r: r["ratio_torch_over_ours"])
    return [f"{len(rows)} kernels; ours as fast as PyTorch's or faster in {len(faster)}; the furthest behind: "
            f"{slowest['kernel']} (torch/ours {slowest['ratio_torch_over_ours']:.2f}); card: copy "
            f"{bench['peaks']['copy_GBps']} GB/s, bf16 matmul {bench['peaks']['bf16_matmul_TFLOPs']} TFLOP/s"]


def percent(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def summarise_train(folder, record):
    lines = []
    for path in sorted(folder.glob("train_*.json"), key=lambda p: json.loads(p.read_text())["B"]):
        r = json.loads(path.read_text())
        lines.append(f"B={r['B']} T={r['T']}: tok/s ours {r['ours_tok_s']:,.0f} | torch {r['torch_tok_s']:,.0f} | "
                     f"ratio {r['ratio']:.3f}; MFU ours {percent(r['mfu'])} | torch {percent(r['torch_mfu'])}; "
                     f"peak MiB ours {r['ours_peak_mib']:,.0f} | torch {r['torch_peak_mib']:,.0f}")
    return lines or ["no train bench record"]


def summarise_parity(folder, record):
    records = sorted(folder.glob("loss_parity_*.json"))
    if not records:
        return ["no loss parity record"]
    r = json.loads(records[0].read_text())
    train_gap = r["ours_train"][-1] - r["torch_train"][-1]
    return [f"{r['steps']} steps; last step's train loss ours {r['ours_train'][-1]:.4f} | torch "
            f"{r['torch_train'][-1]:.4f} (gap {train_gap:+.4f})",
            f"final val loss ours {r['ours_final_val']:.4f} | torch {r['torch_final_val']:.4f}: gap "
            f"{r['ours_final_val'] - r['torch_final_val']:+.4f}, {r['rel_diff']:.2%} (tolerance {r['tol']:.2%}): "
            f"{'PASS' if r['passed'] else 'FAIL'}"]


@dataclass
class Stage:
    name: str
    limit_s: int
    run: Callable        # run(slot) -> True when the stage passed; its commands go through slot.command
    summary: Callable    # summary(stage folder, the stage's record) -> lines for the summary screen
    proves: str          # one line, for --help and the README


# A check that needs a GPU is a stage here: a function that runs its commands through the slot, a
# function that summarises what they left in the stage's folder, and a time limit. The limits add up
# to at most 7 minutes with the preflight's, so one 15-minute lease holds a run, a fix and a rerun.
STAGES = [
    Stage("tests", 140, run_tests, summarise_tests,
          "every GPU test (pytest -m gpu): kernels against their twins, d12 against PyTorch with llm.c's bars, "
          "bit-identical reruns, -y 1 bit-exact; a skipped GPU test fails"),
    Stage("kernels", 40, run_kernel_bench, summarise_kernels,
          "each kernel beside PyTorch's at GPT-2 124M shapes (dev/bench/kernels.py)"),
    Stage("train", 60, run_train_bench, summarise_train,
          "d12 training steps at B=16 T=1024, ours beside PyTorch compiled: tok/s, MFU, peak memory"),
    Stage("train-max", 55, run_largest_batch, summarise_train,
          "the same at the largest power-of-two B up to 64 that fits both"),
    Stage("parity", 85, run_loss_parity, summarise_parity,
          "the d12 loss curve beside PyTorch's on Tiny Shakespeare (T=1024, as many steps as fit, at least 100)"),
]


def summary(out, stages=STAGES):
    """The summary screen, from OUT's records alone; and whether every stage recorded there passed."""
    record = json.loads((out / "gpu_check.json").read_text())
    probe = record["preflight"]
    lines = [f"gpu-check on {probe['device']} ({probe['arch']}, driver {probe['driver']}, Python {probe['python']}, "
             + ", ".join(f"{k} {v}" for k, v in probe["versions"].items()) + ")"]
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


def probe(env, log, deadline):
    """The PROBE's JSON, or fail with its last line of error."""
    try:
        result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        fail(f"the GPU backend did not load within {PREFLIGHT_LIMIT_S} s (see {log})")
    with open(log, "a") as f:
        f.write(result.stdout + result.stderr)
    if result.returncode != 0:
        last = [line for line in result.stderr.splitlines() if line.strip()]
        fail(f"the GPU backend does not run here: {last[-1] if last else f'exit status {result.returncode}'} "
             f"(see {log})")
    return json.loads(result.stdout.splitlines()[-1])


def preflight(out, prep, site):
    """Install what the machine lacks from the prep folder, then prove the CUDA backend runs: its
    record, or one line and exit 1."""
    deadline = time.monotonic() + PREFLIGHT_LIMIT_S
    log = out / "preflight.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    info = probe(env, log, deadline)
    if not info["cupy"] or info["device_error"] is not None:  # nothing in the prep folder can help
        fail(f"no usable GPU backend: {info['reason'] if not info['cupy'] else info['device_error']}")
    wheels = [] if prep is None else wheels_to_install(sorted((prep / "wheels").glob("*.whl")), installed_version)
    if wheels:
        try:
            result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                     "--no-compile", "--target", str(site), *map(str, wheels)],
                                    capture_output=True, text=True, timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            fail(f"pip did not install {prep / 'wheels'} within {PREFLIGHT_LIMIT_S} s")
        with open(log, "a") as f:
            f.write(result.stdout + result.stderr)
        if result.returncode != 0:
            fail(f"pip could not install {', '.join(w.name for w in wheels)} from {prep / 'wheels'} (see {log})")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
        info = probe(env, log, deadline)
    if info["reason"] is not None:
        hint = " (make gpu-prep DIR=... on a machine with network brings it)" if "nvmath" in info["reason"] else ""
        fail(f"no usable GPU backend: {info['reason']}{hint}")
    return info, env


def parse_names(text, valid, what):
    names = [n for n in re.split(r"[,\s]+", text or "") if n]
    unknown = [n for n in names if n not in valid]
    if unknown:
        fail(f"{what} {' '.join(unknown)}: not one of {', '.join(valid)}")
    return names or list(valid)


def check(out, prep, stage_names, tests):
    """Preflight, then the stages named (all by default); True when every stage recorded in OUT passed."""
    chosen = parse_names(stage_names, [s.name for s in STAGES], "--stages")
    out.mkdir(parents=True, exist_ok=True)
    if prep is not None and not prep.is_dir():
        prep = None
    with tempfile.TemporaryDirectory(prefix="gpu_check_site_") as site:
        if prep is not None:
            for overlay in PREP_OVERLAYS:
                copy_missing(prep / overlay, REPO / overlay)
        info, env = preflight(out, prep, Path(site))
        return run_stages(out, STAGES, chosen, info, env, shlex.split(tests or ""))


def run_stages(out, stages, chosen, info, env, tests):
    """Each stage of `stages` named in `chosen`, in its slot, recorded in OUT/gpu_check.json (which
    keeps the other stages' records from earlier runs); then the summary of all of them."""
    from fileformats import write_json  # needs NumPy: imported once the preflight found the GPU stack, so that
    # a machine without it still gets the preflight's one line
    record_path = out / "gpu_check.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"stages": {}}
    record.update(run=datetime.now().isoformat(timespec="milliseconds"), preflight=info)
    print(f"gpu-check on {info['device']}: {', '.join(chosen)}; logs and records in {out}/", flush=True)
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
    text, passed = summary(out, stages)
    (out / "summary.txt").write_text(text + "\n")
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
    s = verbs.add_parser("summary", help="print the summary of OUT's records again")
    s.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.verb == "prep":
        prep_folder(args.dir.resolve())
    elif args.verb == "run":
        sys.exit(0 if check(args.out.resolve(), args.prep and args.prep.resolve(), args.stages, args.tests) else 1)
    else:
        if not (args.out / "gpu_check.json").exists():
            fail(f"{args.out}: no gpu_check.json (not a gpu-check output folder)")
        text, passed = summary(args.out)
        print(text)
        sys.exit(0 if passed else 1)


if __name__ == "__main__":
    run(main)

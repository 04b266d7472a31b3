"""Time whole training steps of our trainer beside PyTorch's on the same model, batch and device, in
one run: every step's time (median, min and max), tokens/s, MFU and memory of each side, and the
ratios. Writes a JSON record per model (-e takes several) to dev/bench/results/, rewritten as the run
goes, so that a run cut short (SIGINT, a time limit) leaves what it measured, marked so.

A step is what train_gpt2.py's loop does: zero the gradients, -d/(B*T) micro-steps of forward and
backward, the global grad norm, the clip and AdamW (weight decay on 2-D weights). Every side sees the
same random tokens (fixed seed), uploaded from the host in every micro-step, and computes the same
logits width: PyTorch's wte/lm_head get the padded vocabulary Vp = 50304 rows, as ours has.

The sides. On a GPU, ours is the CUDA kernels (bf16, fp32 master weights) and PyTorch's is
torch.compile, flash SDPA (the only attention backend left enabled), bf16 autocast and fused AdamW on
fp32 weights. On the CPU (no GPU, or --device cpu) ours is the NumPy backend, beside PyTorch eager and
torch.compile (where it compiles), all fp32. --torch chooses PyTorch's sides.

Timing. Each side is set up, then warmed up (-w steps; the first is timed apart: it compiles, or
builds cuBLASLt plans and grows scratch buffers). Then -n rounds, each one step of every side, the
order rotating by one each round (ours, PyTorch; PyTorch, ours; ...), so that a drift of the machine
(clocks, heat, other load) and the cost of going second fall on every side alike. Each step is timed
alone, from an idle device to the end of its work. When the sides do not fit in memory together, each
runs its set-up, warm-up and -n steps alone, one after the other: said in one line and in the record.

Memory, like for like: what each side's allocator holds, as its growth over the side's set-up and
warm-up. On a GPU, reserved against reserved: CuPy's default pool (total_bytes: blocks in use and
cached) for ours, torch.cuda.max_memory_reserved for PyTorch; neither counts the CUDA context or
library handles. On the CPU, the peak resident set of the process (VmHWM, reset through
/proc/self/clear_refs) over the side's set-up and warm-up, less what was resident before it.

MFU: llm.c's flops per token, against two rates: the device's datasheet bf16 dense peak
(train_gpt2.PEAK_BF16_FLOPS, by exact device name: none for another device, which is said), and the
matrix-product rate measured here first (torch.matmul of 8192^3 in bf16 on a GPU, 1024^3 in fp32 on
the CPU: the precision the sides compute in).

    python dev/bench/train.py -e d12 -b 16 -t 1024                  # GPT-2 124M on one GPU
    python dev/bench/train.py --device cpu -e d2 d12 -b 4 -t 64      # ours, PyTorch eager and compiled
"""
import ctypes
import gc
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "dev"), str(REPO / "dev/bench")]  # records.py, under -m too
import records  # noqa: E402
import torch_gpt2  # noqa: E402
import train_gpt2 as gpt  # noqa: E402
from cli import ArgumentParser, fail, run  # noqa: E402
from kernels import reference  # noqa: E402

LR, WEIGHT_DECAY = 3e-4, 0.1  # any values time alike; constant, so every step does the same work
MIB = 2 ** 20
TORCH_SIDES = ("eager", "compile")
MATMUL_N = {"cuda": 8192, "cpu": 1024}  # the square product whose rate is the measured peak
OOM = "ran out of GPU memory"  # the line dev/gpu_check.py looks for to try a smaller batch
LIBC = ctypes.CDLL(None)


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("-e", nargs="+", default=["d12"], help="models: dN or gpt2:dN, a record each (default: d12, GPT-2 124M)")
    add("-b", type=int, default=16, help="micro-batch size B (default: %(default)s)")
    add("-t", type=int, default=1024, help="sequence length T (default: %(default)s)")
    add("-d", type=int, default=-1, help="total batch in tokens; grad accumulation = d / (B*T) (-1: B*T)")
    add("-n", type=int, default=30, help="timed rounds, a step of every side each (default: %(default)s)")
    add("-w", type=int, default=3, help="warm-up steps of each side, the first timed apart (default: %(default)s)")
    add("-r", type=int, default=1, choices=(0, 1, 2), help="our recompute: 0 none, 1 GELU, 2 GELU and layernorm")
    add("-ge", type=int, default=-1, choices=(-1, 0, 1, 2), help="our GELU fusion (-1: the backend's default)")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda when a GPU is usable")
    add("--torch", help="PyTorch's sides: eager, compile, or eager,compile (default: compile on cuda, "
                        "eager,compile on cpu)")
    add("-o", default=str(records.RESULTS), help="directory for the JSON records (default: dev/bench/results)")
    args = parser.parse_args(argv)
    for flag, least in (("b", 1), ("t", 1), ("n", 1), ("w", 1)):
        if getattr(args, flag) < least:
            fail(f"-{flag} {getattr(args, flag)}: must be at least {least}")
    if args.t > gpt.GPT2_MAX_SEQ_LEN:
        fail(f"-t {args.t}: GPT-2's wpe has {gpt.GPT2_MAX_SEQ_LEN} positions")
    if args.d != -1 and (args.d <= 0 or args.d % (args.b * args.t)):
        fail(f"-d {args.d}: the total batch must be a multiple of B*T = {args.b * args.t}")
    try:
        args.configs = {e: gpt.config_from_descriptor(e) for e in args.e}
    except ValueError as e:
        fail(str(e))
    if args.torch is not None:
        args.torch = [s for s in re.split(r"[,\s]+", args.torch) if s]
        if not args.torch or any(s not in TORCH_SIDES for s in args.torch):
            fail(f"--torch {','.join(args.torch)}: give eager, compile or eager,compile")
    return args


# ----------------------------------------------------------------------------- the sides

@dataclass
class Side:
    """One trainer of the comparison. build() sets it up and returns step(i), one whole training step
    (i counts from 0); synchronize() waits for the device. figures collect what the record says of it."""
    key: str                 # its name in the record: ours, torch_eager, torch_compile
    label: str               # its name in the printout
    build: Callable
    synchronize: Callable
    step: Callable = None
    steps_done: int = 0
    figures: dict = field(default_factory=dict)


def ours(K, config, args, batches, grad_accum_steps):
    def build():
        model = gpt.GPT2(config, gpt.init_params(config), args.b, args.t, K, recompute=args.r,
                         gelu_fusion=K.GELU_FUSION if args.ge == -1 else args.ge, master_weights=True)

        def step(i):
            gpt.zero_grad(model)
            for x, y in batches:
                gpt.forward(model, x)
                gpt.backward(model, y, grad_accum_steps)
            norm = gpt.grad_norm(model)
            gpt.update(model, LR, WEIGHT_DECAY, i, K.clip_scale(norm, gpt.GRAD_CLIP), seed=i)

        return step

    return Side("ours", "ours", build, K.synchronize)


def pytorch(mode, config, batches, grad_accum_steps, device):
    """The PyTorch reference GPT-2 (dev/torch_gpt2.py) with Vp-row wte/lm_head, eager or compiled."""
    on_gpu = device == "cuda"

    def build():
        Vp = config.padded_vocab_size
        model = torch_gpt2.init_llmc(torch_gpt2.GPT2(torch_gpt2.Config(
            num_layers=config.num_layers, num_heads=config.num_heads, channels=config.channels,
            max_seq_len=config.max_seq_len, vocab_size=Vp, padded_vocab_size=Vp))).to(device)
        forward = torch.compile(model) if mode == "compile" else model
        optimizer = torch_gpt2.llmc_adamw(model, LR, WEIGHT_DECAY,
                                          **({"fused": True} if on_gpu else {"foreach": False, "fused": False}))
        data = [(torch.from_numpy(x).long(), torch.from_numpy(y).long()) for x, y in batches]
        if on_gpu:
            data = [(x.pin_memory(), y.pin_memory()) for x, y in data]

        def step(_):
            optimizer.zero_grad(set_to_none=True)
            for x, y in data:
                with torch.autocast(device, dtype=torch.bfloat16, enabled=on_gpu):
                    _, loss = forward(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                (loss / grad_accum_steps).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), gpt.GRAD_CLIP)
            optimizer.step()

        return step

    return Side(f"torch_{mode}", f"pytorch {mode}", build, torch.cuda.synchronize if on_gpu else lambda: None)


# ----------------------------------------------------------------------------- memory

def resident_mib():
    """(VmRSS, VmHWM) of this process in MiB, from /proc/self/status."""
    fields = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M))
    return int(fields["VmRSS"]) / 1024, int(fields["VmHWM"]) / 1024


def memory_meter(side, on_gpu):
    """Start measuring the memory side's set-up and warm-up take: a function giving it in MiB (None
    where the host's peak cannot be reset)."""
    if on_gpu and side.key == "ours":
        import cupy
        pool = cupy.get_default_memory_pool()
        before = pool.total_bytes()
        return lambda: (pool.total_bytes() - before) / MIB
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_reserved()
        return lambda: (torch.cuda.max_memory_reserved() - before) / MIB
    gc.collect()
    if hasattr(LIBC, "malloc_trim"):  # glibc keeps freed pages for reuse: the next side's growth would miss them
        LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident set starts again from the current one
    except OSError:
        return lambda: None
    before, _ = resident_mib()
    return lambda: resident_mib()[1] - before


# ----------------------------------------------------------------------------- running the sides

def timed_s(side):
    """Seconds one step of side takes, from an idle device to the end of its work."""
    t0 = time.perf_counter()
    side.step(side.steps_done)
    side.synchronize()
    side.steps_done += 1
    return time.perf_counter() - t0


def is_out_of_memory(error, on_gpu):
    """Whether error, or one it was raised from (torch.compile wraps what its graph raised), is a
    memory allocation that failed."""
    kinds = (MemoryError,)
    if on_gpu:
        import cupy
        kinds += (cupy.cuda.memory.OutOfMemoryError, torch.OutOfMemoryError)
    while error is not None:
        if isinstance(error, kinds):
            return True
        error = error.__cause__ or error.__context__
    return False


def prepare(side, args, on_gpu):
    """Set side up and warm it up, recording its set-up time, first step, other warm-up steps and
    memory; its step times start empty."""
    meter = memory_meter(side, on_gpu)
    side.figures = {"setup_s": None, "first_step_s": None, "warmup_ms": [], "step_ms": [], "memory_mib": None}
    t0 = time.perf_counter()
    side.step, side.steps_done = side.build(), 0
    side.synchronize()
    side.figures["setup_s"] = round(time.perf_counter() - t0, 2)
    side.figures["first_step_s"] = round(timed_s(side), 3)
    side.figures["warmup_ms"] = [round(1000 * timed_s(side), 2) for _ in range(args.w - 1)]
    memory = meter()
    side.figures["memory_mib"] = None if memory is None else round(memory, 1)


def release(sides, on_gpu):
    """Drop the sides' models and give their memory back, so that another can have it."""
    for side in sides:
        side.step = None
    if on_gpu:
        torch._dynamo.reset()  # compiled graphs may hold on to what they were traced with
    gc.collect()
    if on_gpu:
        import cupy
        cupy.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()


class DoesNotFit(Exception):
    """A side ran out of memory while set up or warmed up."""


class CannotCompile(Exception):
    """torch.compile failed on the CPU (no C++ compiler, say): (side, why)."""


def prepare_or_say(side, args, on_gpu):
    """prepare(side); DoesNotFit(side) when it runs out of memory, CannotCompile(side, why) when
    torch.compile fails on the CPU. Either is raised once the failure's frames, which hold its
    tensors, are gone."""
    failed = None
    try:
        prepare(side, args, on_gpu)
    except Exception as e:
        if is_out_of_memory(e, on_gpu):
            failed = DoesNotFit(side)
        elif side.key == "torch_compile" and not on_gpu:
            failed = CannotCompile(side, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}")
        else:
            raise
    if failed is not None:
        raise failed


def run_sides(sides, args, on_gpu, progress):
    """Every side prepared, then -n alternating rounds; or, when they do not fit together, each side
    alone. progress(status) rewrites the record. Returns the order the steps ran in."""
    prepared = []
    try:
        for side in list(sides):
            try:
                prepare_or_say(side, args, on_gpu)
            except CannotCompile as e:
                print(f"torch.compile does not run here ({e.args[1]}): no {side.label} side", flush=True)
                sides.remove(side)
                release([side], on_gpu)
                continue
            prepared.append(side)
            progress(f"running: {side.label} warmed up")
    except DoesNotFit as e:
        if not prepared:
            raise
        release(sides, on_gpu)  # the one that failed too: its model may be built
        for side in sides:
            side.figures = {}
        order = (f"one side after another: {e.args[0].label} ran out of memory beside "
                 f"{', '.join(s.label for s in prepared)}, so each ran its set-up, warm-up and steps alone")
        print(order, flush=True)
        for side in sides:
            prepare_or_say(side, args, on_gpu)
            for i in range(args.n):
                side.figures["step_ms"].append(round(1000 * timed_s(side), 2))
                progress(f"running: {side.label} alone, {i + 1} of {args.n} steps")
            release([side], on_gpu)
        return order
    for r in range(args.n):
        for side in sides[r % len(sides):] + sides[:r % len(sides)]:
            side.figures["step_ms"].append(round(1000 * timed_s(side), 2))
        progress(f"running: {r + 1} of {args.n} rounds")
    release(sides, on_gpu)
    return "alternating: each round a step of every side, the first side rotating by one each round"


# ----------------------------------------------------------------------------- figures and the record

def measured_matmul_flops(device):
    """FLOP/s of a square torch.matmul in the sides' precision (bf16 on a GPU, fp32 on the CPU): the
    median of 10 timed products after 3 untimed."""
    n = MATMUL_N[device]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    synchronize = torch.cuda.synchronize if device == "cuda" else lambda: None
    times = []
    for i in range(13):
        synchronize()
        t0 = time.perf_counter()
        a @ b
        synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    del a, b
    if device == "cuda":
        torch.cuda.empty_cache()
    return 2 * n ** 3 / statistics.median(times)


def side_figures(side, tokens_per_step, flops_per_token, peak, matmul):
    """The side's recorded times, and what follows from their median: tok/s and MFU against both rates."""
    figures = dict(side.figures)
    steps = figures["step_ms"]
    if steps:
        median = statistics.median(steps)
        tok_s = tokens_per_step / (median / 1000)
        figures.update(median_ms=round(median, 2), min_ms=min(steps), max_ms=max(steps), tok_s=round(tok_s, 1),
                       mfu=None if peak is None else round(flops_per_token * tok_s / peak, 4),
                       mfu_of_matmul=round(flops_per_token * tok_s / matmul, 4))
    return figures


def cpu_name():
    names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M) \
        if os.path.exists("/proc/cpuinfo") else []
    return names[0] if names else platform.processor() or "unknown"


def percent(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def table(record):
    sides = record["sides"]
    lines = [f"{'':16s} {'median ms':>10s} {'min ms':>9s} {'max ms':>9s} {'tok/s':>11s} {'MFU sheet':>9s} "
             f"{'MFU matmul':>10s} {'memory MiB':>10s} {'first step s':>12s}"]
    for key, f in sides.items():
        if "median_ms" not in f:
            lines.append(f"{key:16s} (no timed step)")
            continue
        memory = "n/a" if f["memory_mib"] is None else f"{f['memory_mib']:.1f}"
        lines.append(f"{key:16s} {f['median_ms']:10.2f} {f['min_ms']:9.2f} {f['max_ms']:9.2f} {f['tok_s']:11.1f} "
                     f"{percent(f['mfu']):>9s} {percent(f['mfu_of_matmul']):>10s} {memory:>10s} "
                     f"{f['first_step_s']:12.2f}")
    lines += [f"{name} (tok/s at the medians): {ratio:.3f}" for name, ratio in record["ratios"].items()]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    K = gpt.select_backend(args.device)
    on_gpu = K is not reference
    device = "cuda" if on_gpu else "cpu"
    if on_gpu and not torch.cuda.is_available():
        fail(f"PyTorch {torch.__version__} sees no CUDA device (a CPU-only build?): install a CUDA build of torch")
    torch_modes = args.torch or (["compile"] if on_gpu else list(TORCH_SIDES))
    B, T = args.b, args.t
    tokens_per_step = B * T if args.d == -1 else args.d
    grad_accum_steps = tokens_per_step // (B * T)
    if on_gpu:
        import cupy
        # flash attention or an error, never a silent fallback to another SDPA backend
        torch.backends.cuda.enable_flash_sdp(True)
        for other in ("cudnn", "mem_efficient", "math"):
            getattr(torch.backends.cuda, f"enable_{other}_sdp")(False)
        description = f"{K.DEVICE}, torch {torch.__version__}, cupy {cupy.__version__}"
        precision = ("ours: bf16 parameters, gradients and activations, fp32 AdamW m, v and master weights; torch: "
                     "fp32 weights, gradients and AdamW state, bf16 autocast (forward and loss), fused AdamW")
        attention = ("ours: kernels/attention.cu (our flash attention); torch: F.scaled_dot_product_attention with "
                     "only the flash backend enabled (cuDNN, memory-efficient and math disabled)")
        memory = ("reserved against reserved, each side's growth over its set-up and warm-up: ours, CuPy's default "
                  "pool total_bytes (parameters, gradients, AdamW state, activations, scratch, cuBLASLt workspace, "
                  "in use or cached); torch, torch.cuda.max_memory_reserved; neither counts the CUDA context or "
                  "library handles")
        matmul_how = f"torch.matmul bf16 {MATMUL_N[device]}^3, median of 10"
    else:
        description = (f"CPU: {cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__} "
                       f"({torch.get_num_threads()} threads), numpy {np.__version__}")
        precision = "all fp32: our NumPy backend; torch AdamW foreach=False fused=False"
        attention = "ours: kernels/reference.py (NumPy); torch: F.scaled_dot_product_attention, the CPU's own choice"
        memory = ("host memory, each side's growth over its set-up and warm-up: the peak resident set of the process "
                  "(VmHWM, reset through /proc/self/clear_refs) less what was resident before")
        matmul_how = f"torch.matmul fp32 {MATMUL_N[device]}^3, median of 10"
        print(f"CPU comparison, all fp32: our NumPy backend beside PyTorch {' and '.join(torch_modes)}")
    peak = gpt.peak_flops(K.DEVICE)
    if on_gpu and peak is None:
        print(f"no datasheet MFU: '{K.DEVICE}' is not in train_gpt2.PEAK_BF16_FLOPS (MFU against the measured "
              "matmul rate only)")
    matmul = measured_matmul_flops(device)
    print(f"{description} | matmul rate measured: {matmul / 1e12:.3f} TFLOP/s ({matmul_how}) | datasheet bf16 peak: "
          f"{'none' if peak is None else f'{peak / 1e12:.1f} TFLOP/s'}\nattention: {attention}\nmemory: {memory}",
          flush=True)

    tokens = np.random.default_rng(0).integers(0, gpt.GPT2_VOCAB_SIZE, (grad_accum_steps, B, T + 1), dtype=np.int32)
    batches = [(np.ascontiguousarray(t[:, :-1]), np.ascontiguousarray(t[:, 1:])) for t in tokens]
    command = "python dev/bench/train.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for model_name, config in args.configs.items():
        sides = [ours(K, config, args, batches, grad_accum_steps)]
        sides += [pytorch(mode, config, batches, grad_accum_steps, device) for mode in torch_modes]
        flops = gpt.flops_per_token(config, T)
        name = f"train_{records.tag(K.DEVICE)}_{records.tag(model_name)}_b{B}_t{T}.json"
        record = {
            "device": description, "commit": records.commit(), "command": command,
            "what": f"training steps of {model_name} (zero grad, forward+backward per micro-step, grad norm, clip, "
                    "AdamW) by each side on the same random tokens; step_ms: every timed step; tok/s = tokens per "
                    "step / the median step; ratios = ours tok/s / theirs; mfu = flops per token (llm.c's) x tok/s "
                    "/ the datasheet peak (peak_flops), mfu_of_matmul = the same / the measured matmul rate",
            "status": "running: set-up", "precision": precision, "attention": attention, "memory": memory,
            "vocab": f"all compute Vp={config.padded_vocab_size} logit columns: torch's wte/lm_head have Vp rows (its "
                     f"cross-entropy spans all Vp), ours has Vp rows and its cross-entropy the {config.vocab_size} "
                     "real ones",
            "model": model_name, "parameters": gpt.num_parameters(config), "B": B, "T": T,
            "grad_accum_steps": grad_accum_steps, "tokens_per_step": tokens_per_step, "warmup_steps": args.w,
            "rounds": args.n, "order": None, "recompute": args.r,
            "gelu_fusion": K.GELU_FUSION if args.ge == -1 else args.ge, "flops_per_token": flops,
            "peak_flops": peak, "matmul_flops": round(matmul, 1), "matmul": matmul_how,
            "sides": {}, "ratios": {},
        }

        def progress(status):
            record["status"] = status
            record["sides"] = {s.key: side_figures(s, tokens_per_step, flops, peak, matmul) for s in sides if s.figures}
            ours_tok_s = record["sides"].get("ours", {}).get("tok_s")
            record["ratios"] = {f"ours / {key}": round(ours_tok_s / f["tok_s"], 3) for key, f in record["sides"].items()
                                if key != "ours" and ours_tok_s and f.get("tok_s")}
            records.write(args.o, name, record, announce=False)

        print(f"{model_name}: {gpt.num_parameters(config):,} parameters | B={B} T={T} | grad accumulation "
              f"{grad_accum_steps} ({tokens_per_step:,} tokens per step) | {args.w} warm-up steps per side, then "
              f"{args.n} rounds of {', '.join(s.label for s in sides)}", flush=True)
        try:
            record["order"] = run_sides(sides, args, on_gpu, progress)
        except DoesNotFit as e:
            fail(f"-b {B}: {e.args[0].label} {OOM if on_gpu else 'ran out of memory'} at B={B}, T={T}: lower -b "
                 "(-d keeps the total batch)")
        except KeyboardInterrupt:
            progress(f"interrupted (SIGINT) at: {record['status'].removeprefix('running: ')}")
            fail(f"interrupted: {args.o}/{name} holds what was measured until then")
        progress("complete")
        print(table(record))
        print(f"wrote {Path(args.o) / name}", flush=True)


if __name__ == "__main__":
    run(main)

"""Time whole training steps of our trainer beside PyTorch's on the same model, batch and device, in
one run: tokens/s, MFU (llm.c's formula) and peak memory of each, and the ratio. Writes a JSON record
to dev/bench/results/.

A step is what train_gpt2.py's loop does: zero the gradients, -d/(B*T) micro-steps of forward and
backward, the global grad norm, the clip and AdamW (weight decay on 2-D weights). Both sides see the
same random tokens (fixed seed), uploaded from the host in every micro-step, and compute the same
logits width: PyTorch's wte/lm_head get the padded vocabulary Vp = 50304 rows, as ours has.

On a GPU, ours is the CUDA kernels (bf16, fp32 master weights) and PyTorch's is torch.compile, flash
SDPA, bf16 autocast and fused AdamW on fp32 weights. On the CPU (no GPU, or --device cpu) it is our
NumPy backend against PyTorch eager, both fp32: that run checks the script, its speeds are no GPU's.

    python dev/bench/train.py -e d12 -b 16 -t 1024               # GPT-2 124M on one GPU
    python dev/bench/train.py --device cpu -e d6 -b 4 -t 128 -n 5
"""
import gc
import os
import platform
import re
import resource
import sys
import time
from pathlib import Path

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


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("-e", default="d12", help="model: dN or gpt2:dN (default: %(default)s, GPT-2 124M)")
    add("-b", type=int, default=16, help="micro-batch size B (default: %(default)s)")
    add("-t", type=int, default=1024, help="sequence length T (default: %(default)s)")
    add("-d", type=int, default=-1, help="total batch in tokens; grad accumulation = d / (B*T) (-1: B*T)")
    add("-n", type=int, default=20, help="timed steps (default: %(default)s)")
    add("-w", type=int, default=3, help="warm-up steps before timing (default: %(default)s)")
    add("-r", type=int, default=1, choices=(0, 1, 2), help="our recompute: 0 none, 1 GELU, 2 GELU and layernorm")
    add("-ge", type=int, default=-1, choices=(-1, 0, 1, 2), help="our GELU fusion (-1: the backend's default)")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda when a GPU is usable")
    add("--torch-compile", type=int, choices=(0, 1), help="torch.compile PyTorch's model (default: 1 on cuda, "
                                                          "0 on cpu)")
    add("-o", default=str(records.RESULTS), help="directory for the JSON record (default: dev/bench/results)")
    args = parser.parse_args(argv)
    for flag, least in (("b", 1), ("t", 1), ("n", 1), ("w", 0)):
        if getattr(args, flag) < least:
            fail(f"-{flag} {getattr(args, flag)}: must be at least {least}")
    if args.t > gpt.GPT2_MAX_SEQ_LEN:
        fail(f"-t {args.t}: GPT-2's wpe has {gpt.GPT2_MAX_SEQ_LEN} positions")
    if args.d != -1 and (args.d <= 0 or args.d % (args.b * args.t)):
        fail(f"-d {args.d}: the total batch must be a multiple of B*T = {args.b * args.t}")
    return args


def timed(step, synchronize, warmup, steps):
    """Seconds that `steps` calls of step(i) take, after `warmup` untimed ones (the first build
    cuBLASLt plans, grow scratch buffers, compile)."""
    for i in range(warmup):
        step(i)
    synchronize()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    synchronize()
    return time.perf_counter() - t0


def run_ours(K, config, args, batches, grad_accum_steps):
    """Seconds for -n steps of train_gpt2's model on backend K; its buffers are freed on return."""
    model = gpt.GPT2(config, gpt.init_params(config), args.b, args.t, K, recompute=args.r,
                     gelu_fusion=K.GELU_FUSION if args.ge == -1 else args.ge, master_weights=True)

    def step(i):
        gpt.zero_grad(model)
        for x, y in batches:
            gpt.forward(model, x)
            gpt.backward(model, y, grad_accum_steps)
        norm = gpt.grad_norm(model)
        gpt.update(model, LR, WEIGHT_DECAY, i, K.clip_scale(norm, gpt.GRAD_CLIP), seed=i)

    return timed(step, K.synchronize, args.w, args.n)


def run_torch(config, args, batches, grad_accum_steps, device, compile_model):
    """Seconds for -n steps of the PyTorch reference GPT-2 (dev/torch_gpt2.py) with Vp-row wte/lm_head."""
    on_gpu = device == "cuda"
    if on_gpu:  # flash attention or an error, never a silent fallback to another SDPA backend
        torch.backends.cuda.enable_flash_sdp(True)
        for other in ("cudnn", "mem_efficient", "math"):
            getattr(torch.backends.cuda, f"enable_{other}_sdp")(False)
    Vp = config.padded_vocab_size
    model = torch_gpt2.init_llmc(torch_gpt2.GPT2(torch_gpt2.Config(
        num_layers=config.num_layers, num_heads=config.num_heads, channels=config.channels,
        max_seq_len=config.max_seq_len, vocab_size=Vp, padded_vocab_size=Vp))).to(device)
    forward = torch.compile(model) if compile_model else model
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

    return timed(step, torch.cuda.synchronize if on_gpu else lambda: None, args.w, args.n)


def host_peak_meter():
    """Start a new count of the process's peak RSS (Linux's clear_refs), so that each side's
    ru_maxrss is its own: a function giving that peak in MiB, or None where the reset is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return lambda: None
    return lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(K, config, args, batches, grad_accum_steps, compile_model):
    """Ours, then PyTorch's: (ours seconds, torch seconds, ours peak MiB, torch peak MiB, torch
    peak reserved MiB); on a GPU, one line on the side that ran out of memory."""
    if K is reference:
        ours_meter = host_peak_meter()
        ours_s = run_ours(K, config, args, batches, grad_accum_steps)
        ours_peak = ours_meter()
        gc.collect()
        torch_meter = host_peak_meter()
        torch_s = run_torch(config, args, batches, grad_accum_steps, "cpu", compile_model)
        return ours_s, torch_s, ours_peak, torch_meter(), None
    import cupy
    pool = cupy.get_default_memory_pool()
    side = "our trainer"
    try:
        ours_s = run_ours(K, config, args, batches, grad_accum_steps)
        ours_peak = pool.total_bytes() / MIB  # the pool keeps the blocks the model freed: its high-water mark
        gc.collect()
        pool.free_all_blocks()
        torch.cuda.reset_peak_memory_stats()
        side = "PyTorch"
        torch_s = run_torch(config, args, batches, grad_accum_steps, "cuda", compile_model)
    except (cupy.cuda.memory.OutOfMemoryError, torch.OutOfMemoryError):
        fail(f"-b {args.b}: {side} ran out of GPU memory at B={args.b}, T={args.t}: lower -b "
             "(-d keeps the total batch)")
    return ours_s, torch_s, ours_peak, torch.cuda.max_memory_allocated() / MIB, torch.cuda.max_memory_reserved() / MIB


def cpu_name():
    names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M) \
        if os.path.exists("/proc/cpuinfo") else []
    return names[0] if names else platform.processor() or "unknown"


def main(argv=None):
    args = parse_args(argv)
    try:
        config = gpt.config_from_descriptor(args.e)
    except ValueError as e:
        fail(str(e))
    K = gpt.select_backend(args.device)
    on_gpu = K is not reference
    if on_gpu and not torch.cuda.is_available():
        fail(f"PyTorch {torch.__version__} sees no CUDA device (a CPU-only build?): install a CUDA build of torch")
    compile_model = bool(on_gpu if args.torch_compile is None else args.torch_compile)
    torch_mode = "torch.compile" if compile_model else "eager"
    B, T = args.b, args.t
    tokens_per_step = B * T if args.d == -1 else args.d
    grad_accum_steps = tokens_per_step // (B * T)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (grad_accum_steps, B, T + 1), dtype=np.int32)
    batches = [(np.ascontiguousarray(t[:, :-1]), np.ascontiguousarray(t[:, 1:])) for t in tokens]

    if on_gpu:
        import cupy
        description = f"{K.DEVICE}, torch {torch.__version__}, cupy {cupy.__version__}"
        precision = ("ours: bf16 parameters, gradients and activations, fp32 AdamW m, v and master weights; torch: "
                     "fp32 weights, gradients and AdamW state, bf16 autocast (forward and loss), "
                     f"{torch_mode}, flash SDPA only, fused AdamW")
        memory = ("ours: CuPy's default pool, total bytes held after the timed steps (parameters, gradients, AdamW "
                  "state, activations, scratch, cuBLASLt workspace); torch: torch.cuda.max_memory_allocated (its "
                  "caching allocator's high-water mark; torch_peak_reserved_mib is what it reserved); neither counts "
                  "the CUDA context or library handles")
    else:
        description = (f"CPU: {cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__} "
                       f"({torch.get_num_threads()} threads), numpy {np.__version__}")
        precision = f"both fp32: our NumPy backend; torch {torch_mode}, AdamW foreach=False fused=False"
        memory = ("host peak RSS of the process (ru_maxrss) while each side runs, reset in between through "
                  "/proc/self/clear_refs; includes the interpreter and the numpy and torch libraries")
        print(f"CPU comparison: our NumPy backend (fp32) against PyTorch {torch_mode} (fp32); no MFU, peak memory "
              "is host RSS")
    print(f"{args.e}: {gpt.num_parameters(config):,} parameters | B={B} T={T} | grad accumulation {grad_accum_steps} "
          f"({tokens_per_step:,} tokens per step) | {args.w} warm-up + {args.n} timed steps | {description}",
          flush=True)

    ours_s, torch_s, ours_peak, torch_peak, torch_reserved = measure(K, config, args, batches, grad_accum_steps,
                                                                     compile_model)
    ours_tok_s, torch_tok_s = tokens_per_step * args.n / ours_s, tokens_per_step * args.n / torch_s
    peak = gpt.peak_flops(K.DEVICE)
    flops = gpt.flops_per_token(config, T)
    mfu = lambda tok_s: None if peak is None else round(flops * tok_s / peak, 4)  # noqa: E731
    mib = lambda x: None if x is None else round(x, 1)  # noqa: E731
    record = {
        "device": description, "commit": records.commit(),
        "command": "python dev/bench/train.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "what": f"training steps of {args.e} (zero grad, forward+backward per micro-step, grad norm, clip, AdamW), "
                "ours vs PyTorch on the same random tokens; tok/s = B*T*grad_accum*steps / seconds; "
                "ratio = ours / torch tok/s; mfu = fraction of the bf16 peak, llm.c's flops per token",
        "precision": precision,
        "vocab": f"both compute Vp={config.padded_vocab_size} logit columns: torch's wte/lm_head have Vp rows (its "
                 f"cross-entropy spans all Vp), ours has Vp rows and its cross-entropy the {config.vocab_size} "
                 "real ones",
        "B": B, "T": T, "grad_accum_steps": grad_accum_steps, "tokens_per_step": tokens_per_step,
        "warmup_steps": args.w, "steps_timed": args.n, "recompute": args.r,
        "gelu_fusion": K.GELU_FUSION if args.ge == -1 else args.ge, "torch_compile": compile_model,
        "ours_tok_s": round(ours_tok_s, 1), "torch_tok_s": round(torch_tok_s, 1),
        "ratio": round(ours_tok_s / torch_tok_s, 3),
        "ours_ms_per_step": round(1000 * ours_s / args.n, 2), "torch_ms_per_step": round(1000 * torch_s / args.n, 2),
        "mfu": mfu(ours_tok_s), "torch_mfu": mfu(torch_tok_s), "peak_flops": peak, "flops_per_token": flops,
        "ours_peak_mib": mib(ours_peak), "torch_peak_mib": mib(torch_peak),
        "torch_peak_reserved_mib": mib(torch_reserved), "peak_memory": memory,
    }

    def row(name, tok_s, mfu_, peak_mib):
        mfu_text = "n/a" if mfu_ is None else f"{100 * mfu_:.1f}%"
        peak_text = "n/a" if peak_mib is None else f"{peak_mib:.1f}"
        return f"{name:10s} {tok_s:12.1f} {1000 * tokens_per_step / tok_s:10.2f} {mfu_text:>7s} {peak_text:>10s}"

    print(f"{'':10s} {'tok/s':>12s} {'ms/step':>10s} {'MFU':>7s} {'peak MiB':>10s}\n"
          f"{row('ours', ours_tok_s, record['mfu'], record['ours_peak_mib'])}\n"
          f"{row('pytorch', torch_tok_s, record['torch_mfu'], record['torch_peak_mib'])}\n"
          f"ratio (ours / torch tok/s): {record['ratio']:.3f}")
    records.write(args.o, f"train_{records.tag(K.DEVICE)}_{records.tag(args.e)}_b{B}_t{T}.json", record)


if __name__ == "__main__":
    run(main)

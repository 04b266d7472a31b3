"""train_gpt2.py's training loop in PyTorch, for loss curves to compare against ours.

The same init (llm.c's, seed 42), the same batches (the repo's DataLoader, shuffled as
train_gpt2.py shuffles them), the same schedule (train_gpt2.learning_rate), the same clip
(global norm in fp32, grads times 1/norm when it is above 1.0, no epsilon), AdamW with
weight decay on 2-D weights only, and the same step, val and main.log lines. What differs is
the arithmetic: torch autograd instead of the NumPy twins or our kernels, and optionally bf16
autocast and torch.compile. No checkpoints, no sampling: a fresh run directory only.

    python dev/torch_train.py -e d12 -b 8 -t 1024 -x 300 -l 6e-4 -u 30 -q 0.1 -c 0.1 -v 25 -m 20 \
        --device cuda --dtype bf16 --compile 1 -o log_torch
"""
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "dev")]
from cli import ArgumentParser, fail, run  # noqa: E402
from dataloader import DataLoader  # noqa: E402
from fileformats import FormatError  # noqa: E402
from torch_gpt2 import GPT2, Config, init_llmc, llmc_adamw  # noqa: E402
from train_gpt2 import GRAD_CLIP, TRAIN_DATA, VAL_DATA, config_from_descriptor, learning_rate  # noqa: E402


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    add = parser.add_argument
    add("--help", action="help", help="show this help and exit")
    add("-i", default=TRAIN_DATA, help="train data: a shard path or glob (default: %(default)s)")
    add("-j", default=VAL_DATA, help="val data: a shard path or glob (default: %(default)s)")
    add("-e", default="d12", help="model: dN or gpt2:dN, a fresh GPT-2 of depth N (default: %(default)s)")
    add("-o", default=None, help="run directory for main.log (default: none)")
    add("-b", type=int, default=4, help="micro-batch size B (default: %(default)s)")
    add("-t", type=int, default=1024, help="sequence length T (default: %(default)s)")
    add("-d", type=int, default=-1, help="total batch in tokens; grad accumulation = d / (B*T) (-1: B*T)")
    add("-x", type=int, default=-1, help="steps to train (-1: one epoch of -i)")
    add("-l", type=float, default=3e-4, help="peak learning rate (default: %(default)s)")
    add("-k", default="cosine", choices=("cosine", "linear", "constant", "wsd"), help="learning rate schedule")
    add("-u", type=int, default=0, help="learning rate warmup steps (default: 0)")
    add("-q", type=float, default=1.0, help="final learning rate as a fraction of -l (default: 1.0, no decay)")
    add("-c", type=float, default=0.0, help="weight decay, on 2-D weights only (default: 0)")
    add("-v", type=int, default=20, help="val loss every v steps, and at the end (0: never)")
    add("-m", type=int, default=20, help="val batches per val loss (-1: the whole val split)")
    add("--device", default="cpu", choices=("cpu", "cuda"), help="where to train (default: cpu)")
    add("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast the forward (the loss in "
                                                                   "fp32); weights and AdamW stay fp32 (default: fp32)")
    add("--compile", type=int, default=0, choices=(0, 1), help="1: torch.compile the model (default: 0)")
    args = parser.parse_args(argv)
    rules = [
        (args.b > 0 and args.t > 0, f"-b {args.b} -t {args.t}: batch size and sequence length must be positive"),
        (args.d == -1 or (args.d > 0 and args.d % (args.b * args.t) == 0),
         f"-d {args.d}: the total batch must be a multiple of B*T = {args.b * args.t}"),
        (args.x == -1 or args.x > 0, f"-x {args.x}: steps must be positive, or -1 for one epoch"),
        (args.l >= 0 and args.c >= 0 and args.u >= 0, f"-l {args.l} -c {args.c} -u {args.u}: must not be negative"),
        (0 <= args.q <= 1, f"-q {args.q}: the final learning rate fraction must be in [0, 1]"),
        (args.v >= 0, f"-v {args.v}: must not be negative"),
        (args.m == -1 or args.m > 0, f"-m {args.m}: val batches must be positive, or -1 for the whole split"),
        (args.device == "cpu" or torch.cuda.is_available(), "--device cuda: this torch sees no CUDA device"),
        (args.o is None or not os.path.exists(os.path.join(args.o, "main.log")),
         f"-o {args.o}: already holds a main.log; this trainer only starts fresh runs: give another directory"),
    ]
    for ok, message in rules:
        if not ok:
            fail(message)
    return args


def batch_loss(model, inputs, targets, device, bf16):
    """Mean cross-entropy over one (B, T) batch from the loader's int32 arrays."""
    x = torch.from_numpy(inputs).to(device, torch.long)
    y = torch.from_numpy(targets).to(device, torch.long)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(x)[0]  # (B, T, V): the real vocabulary only, as our classifier's loss sees it
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


@torch.no_grad()
def val_loss(model, loader, num_batches, device, bf16):
    """Mean of the per-batch mean losses over the first num_batches batches of the val split."""
    loader.reset()
    losses = [batch_loss(model, *loader.next_batch(), device, bf16).item() for _ in range(num_batches)]
    return sum(losses) / num_batches


def main(argv=None):
    args = parse_args(argv)
    B, T, device = args.b, args.t, torch.device(args.device)
    tokens_per_step = args.d if args.d != -1 else B * T
    grad_accum_steps = tokens_per_step // (B * T)
    try:
        gpt2 = config_from_descriptor(args.e)
        if T > gpt2.max_seq_len:
            fail(f"-t {T}: above the model's maximum sequence length {gpt2.max_seq_len}")
        train_loader = DataLoader(args.i, B, T, gpt2.vocab_size, 0, 1, shuffle=True)
        val_loader = DataLoader(args.j, B, T, gpt2.vocab_size) if args.v else None
    except (FormatError, ValueError) as e:
        fail(str(e))
    num_steps = args.x if args.x != -1 else train_loader.num_tokens // tokens_per_step
    if num_steps == 0:
        fail(f"-i {args.i}: {train_loader.num_tokens} tokens, less than one step of {tokens_per_step}: set -x")
    val_batches = 0
    if val_loader:
        val_batches = val_loader.num_batches if args.m == -1 else min(args.m, val_loader.num_batches)

    config = Config(num_layers=gpt2.num_layers, num_heads=gpt2.num_heads, channels=gpt2.channels,
                    max_seq_len=gpt2.max_seq_len, vocab_size=gpt2.vocab_size, padded_vocab_size=gpt2.padded_vocab_size)
    model = init_llmc(GPT2(config), seed=42).to(device)  # drawn on the CPU: train_gpt2's init_params, exactly
    params = list(model.parameters())  # the tied wte / lm_head once
    on_cuda = device.type == "cuda"
    implementation = {"fused": True} if on_cuda else {"foreach": False, "fused": False}  # the CPU: one tensor at a time
    optimizer = llmc_adamw(model, args.l, args.c, **implementation)
    step_model = torch.compile(model) if args.compile else model
    bf16 = args.dtype == "bf16"  # autocast: matmuls and attention in bf16, the weights and AdamW in fp32
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)

    print(f"torch_train: device {args.device} | dtype {args.dtype} | compile {args.compile} | torch {torch.__version__}"
          f" | model: L={config.num_layers} NH={config.num_heads} C={config.channels} "
          f"| parameters: {sum(p.numel() for p in params):,}")
    print(f"batch: B={B} T={T} | {tokens_per_step:,} tokens per step, grad accumulation {grad_accum_steps} "
          f"| {num_steps} steps | lr {args.l:g} {args.k}, warmup {args.u}, final fraction {args.q:g} | wd {args.c:g}"
          f" | val: " + (f"{val_batches} batches every {args.v} steps" if val_loader else "off"))
    log = None
    if args.o is not None:
        os.makedirs(args.o, exist_ok=True)
        log = open(os.path.join(args.o, "main.log"), "a")  # a fresh file: parse_args refused an existing one

    timed_s = 0.0
    for step in range(num_steps + 1):
        last_step = step == num_steps
        if val_loader and (step % args.v == 0 or last_step):
            loss = val_loss(step_model, val_loader, val_batches, device, bf16)
            print(f"val loss {loss:.6f}")
            if log:
                print(f"s:{step} tel:{loss:.4f}", file=log, flush=True)
        if last_step:
            break

        sync()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=device)
        for _ in range(grad_accum_steps):
            micro_loss = batch_loss(step_model, *train_loader.next_batch(), device, bf16) / grad_accum_steps
            micro_loss.backward()
            loss += micro_loss.detach()
        with torch.no_grad():
            # a sum of squares: torch.linalg.vector_norm on the CPU drifts in fp32 (1e-5 relative at 3M elements)
            norm = torch.stack([(p.grad.float() ** 2).sum() for p in params]).sum().sqrt()
            if norm > GRAD_CLIP:  # llm.c's clip: exactly GRAD_CLIP / norm, where clip_grad_norm_ adds 1e-6
                for p in params:
                    p.grad.mul_(GRAD_CLIP / norm)
        lr = learning_rate(args.k, step, num_steps, args.l, args.u, args.q)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        sync()
        seconds = time.perf_counter() - t0
        if step > 0:  # the first step warms up (and compiles)
            timed_s += seconds
        loss, norm = loss.item(), norm.item()
        print(f"step {step + 1:4d}/{num_steps} | loss {loss:.6f} | norm {norm:6.4f} | lr {lr:.2e} "
              f"| {1000 * seconds:.2f} ms | {tokens_per_step / seconds:.0f} tok/s", flush=True)
        if log:
            print(f"s:{step} trl:{loss:.4f} lr:{lr:.6f} norm:{norm:.2f}", file=log, flush=True)

    if num_steps > 1:
        print(f"total average iteration time: {1000 * timed_s / (num_steps - 1):.2f} ms")
    if log:
        log.close()
        print(f"run directory: {args.o}")


if __name__ == "__main__":
    run(main)

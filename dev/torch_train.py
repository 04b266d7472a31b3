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
from cli import ArgumentParser, add_llmc_flags, fail, run  # noqa: E402
from dataloader import DataLoader  # noqa: E402
from fileformats import FormatError  # noqa: E402
from torch_gpt2 import GPT2, Config, init_llmc, llmc_adamw  # noqa: E402
from train_gpt2 import GRAD_CLIP, TRAIN_DATA, VAL_DATA, config_from_descriptor, learning_rate  # noqa: E402


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    add = parser.add_argument
    add("--help", action="help", help="show this help and exit")
    add_llmc_flags(parser, "-i -j -e -o -b -t -d -x -l -k -u -q -c -v -m", train_data=TRAIN_DATA, val_data=VAL_DATA)
    add("--device", default="cpu", choices=("cpu", "cuda"), help="where to train (default: cpu)")
    add("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast the forward (the loss in "
                                                                   "fp32); weights and AdamW stay fp32 (default: fp32)")
    add("--compile", type=int, default=0, choices=(0, 1), help="1: torch.compile the model (default: 0)")
    a = args = parser.parse_args(argv)
    B, T = a.micro_batch_size, a.seq_len
    rules = [
        (B > 0 and T > 0, f"-b {B} -t {T}: batch size and sequence length must be positive"),
        (a.total_batch_size == -1 or (a.total_batch_size > 0 and a.total_batch_size % (B * T) == 0),
         f"-d {a.total_batch_size}: the total batch must be a multiple of B*T = {B * T}"),
        (a.max_steps == -1 or a.max_steps > 0, f"-x {a.max_steps}: steps must be positive, or -1 for one epoch"),
        (min(a.learning_rate, a.weight_decay, a.warmup_steps) >= 0,
         f"-l {a.learning_rate} -c {a.weight_decay} -u {a.warmup_steps}: must not be negative"),
        (0 <= a.final_lr_frac <= 1, f"-q {a.final_lr_frac}: the final learning rate fraction must be in [0, 1]"),
        (a.val_loss_every >= 0, f"-v {a.val_loss_every}: must not be negative"),
        (a.val_batches == -1 or a.val_batches > 0,
         f"-m {a.val_batches}: val batches must be positive, or -1 for the whole split"),
        (a.device == "cpu" or torch.cuda.is_available(), "--device cuda: this torch sees no CUDA device"),
        (a.output_dir is None or not os.path.exists(os.path.join(a.output_dir, "main.log")),
         f"-o {a.output_dir}: already holds a main.log; this trainer only starts fresh runs: give another directory"),
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
    B, T, device = args.micro_batch_size, args.seq_len, torch.device(args.device)
    tokens_per_step = args.total_batch_size if args.total_batch_size != -1 else B * T
    grad_accum_steps = tokens_per_step // (B * T)
    try:
        gpt2 = config_from_descriptor(args.model)
        if T > gpt2.max_seq_len:
            fail(f"-t {T}: above the model's maximum sequence length {gpt2.max_seq_len}")
        train_loader = DataLoader(args.train_data, B, T, gpt2.vocab_size, 0, 1, shuffle=True)
        val_loader = DataLoader(args.val_data, B, T, gpt2.vocab_size) if args.val_loss_every else None
    except (FormatError, ValueError) as e:
        fail(str(e))
    num_steps = args.max_steps if args.max_steps != -1 else train_loader.num_tokens // tokens_per_step
    if num_steps == 0:
        fail(f"-i {args.train_data}: {train_loader.num_tokens} tokens, less than one step of {tokens_per_step}: set -x")
    val_batches = 0
    if val_loader:
        val_batches = val_loader.num_batches if args.val_batches == -1 else \
            min(args.val_batches, val_loader.num_batches)

    config = Config(num_layers=gpt2.num_layers, num_heads=gpt2.num_heads, channels=gpt2.channels,
                    max_seq_len=gpt2.max_seq_len, vocab_size=gpt2.vocab_size, padded_vocab_size=gpt2.padded_vocab_size)
    model = init_llmc(GPT2(config), seed=42).to(device)  # drawn on the CPU: train_gpt2's init_params, exactly
    params = list(model.parameters())  # the tied wte / lm_head once
    on_cuda = device.type == "cuda"
    implementation = {"fused": True} if on_cuda else {"foreach": False, "fused": False}  # the CPU: one tensor at a time
    optimizer = llmc_adamw(model, args.learning_rate, args.weight_decay, **implementation)
    step_model = torch.compile(model) if args.compile else model
    bf16 = args.dtype == "bf16"  # autocast: matmuls and attention in bf16, the weights and AdamW in fp32
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)

    print(f"torch_train: device {args.device} | dtype {args.dtype} | compile {args.compile} | torch {torch.__version__}"
          f" | model: L={config.num_layers} NH={config.num_heads} C={config.channels} "
          f"| parameters: {sum(p.numel() for p in params):,}")
    print(f"batch: B={B} T={T} | {tokens_per_step:,} tokens per step, grad accumulation {grad_accum_steps} "
          f"| {num_steps} steps | lr {args.learning_rate:g} {args.lr_schedule}, warmup {args.warmup_steps}, final "
          f"fraction {args.final_lr_frac:g} | wd {args.weight_decay:g}"
          f" | val: " + (f"{val_batches} batches every {args.val_loss_every} steps" if val_loader else "off"))
    log = None
    if args.output_dir is not None:
        os.makedirs(args.output_dir, exist_ok=True)
        log = open(os.path.join(args.output_dir, "main.log"), "a")  # a fresh file: parse_args refused an existing one

    timed_s = 0.0
    for step in range(num_steps + 1):
        last_step = step == num_steps
        if val_loader and (step % args.val_loss_every == 0 or last_step):
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
        lr = learning_rate(args.lr_schedule, step, num_steps, args.learning_rate, args.warmup_steps, args.final_lr_frac)
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
        print(f"run directory: {args.output_dir}")


if __name__ == "__main__":
    run(main)

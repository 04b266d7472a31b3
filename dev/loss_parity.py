"""Loss-curve parity: train the same model on the same data with the same schedule through our
trainer (train_gpt2.py) and through PyTorch (dev/torch_train.py), from the same init, and check
that the final val losses agree within --tol (relative). Writes both run directories under -o,
a plot of the two curves and a JSON record (dev/bench/results/loss_parity_<device>.{png,json});
exits 1 when the val losses are further apart than --tol.

The defaults are GPT-2 124M on Tiny Shakespeare on one GPU, ours against PyTorch with bf16
autocast and torch.compile: -e d12 -b 8 -t 1024 -x 300, 8192 tokens a step (2.5M tokens: about
8 epochs of the canonical 300k-token train split, 1.6 of the larger offline stand-in), lr 6e-4
with 30 warmup steps and cosine decay to 6e-5 (-q 0.1), weight decay 0.1, val loss every 25
steps over up to 20 batches (the 32,768-token val split holds 3 at this B*T). On the CPU
(--device cpu) PyTorch runs fp32 without compile, so give a small model:

    python -m prepro.tinyshakespeare
    python dev/loss_parity.py                        # the d12 run, on a CUDA machine
    python dev/loss_parity.py --device cpu -e d2 -b 4 -t 64 -x 50 -v 10 -o log_parity_cpu
"""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "dev"), str(REPO / "dev/bench")]
import records  # noqa: E402
from cli import ArgumentParser, fail, run  # noqa: E402
from plot_logs import plot, read_log  # noqa: E402
from train_gpt2 import TRAIN_DATA, VAL_DATA  # noqa: E402

SHARED = ("-i", "-j", "-e", "-b", "-t", "-d", "-x", "-k", "-l", "-u", "-q", "-c", "-v", "-m")  # the same for both


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    add = parser.add_argument
    add("--help", action="help", help="show this help and exit")
    add("-i", default=TRAIN_DATA, help="train data (default: %(default)s)")
    add("-j", default=VAL_DATA, help="val data (default: %(default)s)")
    add("-e", default="d12", help="model: dN or gpt2:dN (default: %(default)s)")
    add("-b", type=int, default=8, help="micro-batch size (default: %(default)s)")
    add("-t", type=int, default=1024, help="sequence length (default: %(default)s)")
    add("-d", type=int, default=-1, help="total batch in tokens (default: -1, B*T)")
    add("-x", type=int, default=300, help="steps (default: %(default)s)")
    add("-k", default="cosine", help="learning rate schedule (default: %(default)s)")
    add("-l", type=float, default=6e-4, help="peak learning rate (default: %(default)s)")
    add("-u", type=int, default=30, help="warmup steps (default: %(default)s)")
    add("-q", type=float, default=0.1, help="final learning rate fraction (default: %(default)s)")
    add("-c", type=float, default=0.1, help="weight decay (default: %(default)s)")
    add("-v", type=int, default=25, help="val loss every v steps (default: %(default)s)")
    add("-m", type=int, default=20, help="val batches (default: %(default)s)")
    add("-o", default="log_parity", help="directory for the two runs, OUT/ours and OUT/torch (default: %(default)s)")
    add("--device", default="cuda", choices=("cpu", "cuda"), help="where both run (default: %(default)s)")
    add("--dtype", choices=("fp32", "bf16"), help="PyTorch's precision (default: bf16 on cuda, fp32 on cpu)")
    add("--compile", type=int, choices=(0, 1), help="torch.compile PyTorch's model (default: 1 on cuda, 0 on cpu)")
    add("--tol", type=float, default=0.01, help="largest relative difference of the final val losses "
                                                "(default: %(default)s)")
    add("--results", default=str(records.RESULTS), help="directory for the PNG and JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    on_cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bf16" if on_cuda else "fp32")
    args.compile = (1 if on_cuda else 0) if args.compile is None else args.compile
    if args.v <= 0:
        fail(f"-v {args.v}: the comparison needs val losses: give -v > 0")
    if not args.tol >= 0:
        fail(f"--tol {args.tol}: must not be negative")
    for name in ("ours", "torch"):
        if os.path.exists(os.path.join(args.o, name)):
            fail(f"-o {args.o}: already holds a {name} run: remove it, or give another directory")
    return args


def device_name(device):
    if device == "cpu":
        return "cpu"
    import torch  # only the GPU's name needs torch here
    return torch.cuda.get_device_name()


def train(name, script, flags):
    """Run one trainer, its output going straight to ours; exit 1 if it fails."""
    command = [sys.executable, str(REPO / script), *flags]
    print(f"== {name}: {' '.join(command[1:])}", flush=True)
    result = subprocess.run(command)
    if result.returncode != 0:
        fail(f"{script} exited with status {result.returncode} (its output is above)")


def main(argv=None):
    args = parse_args(argv)
    shared = [x for flag in SHARED for x in (flag, str(getattr(args, flag[1:])))]
    ours_dir, torch_dir = os.path.join(args.o, "ours"), os.path.join(args.o, "torch")
    train("ours", "train_gpt2.py", [*shared, "--device", args.device, "-s", "0", "-n", "0", "-o", ours_dir])
    train("torch", "dev/torch_train.py", [*shared, "--device", args.device, "--dtype", args.dtype,
                                          "--compile", str(args.compile), "-o", torch_dir])

    ours, theirs = read_log(os.path.join(ours_dir, "main.log")), read_log(os.path.join(torch_dir, "main.log"))
    last = max(ours["tel"])
    assert ours["tel"].keys() == theirs["tel"].keys() and ours["trl"].keys() == theirs["trl"].keys() == set(range(last))
    ours_val, torch_val = ours["tel"][last], theirs["tel"][last]
    rel_diff = abs(ours_val - torch_val) / abs(torch_val)
    passed = rel_diff <= args.tol

    device = device_name(args.device)
    tag = records.tag(device)
    os.makedirs(args.results, exist_ok=True)
    png = os.path.join(args.results, f"loss_parity_{tag}.png")
    plot({"ours (train_gpt2.py)": ours,
          f"torch ({args.dtype}{', compiled' if args.compile else ''})": theirs}, png)
    print(f"wrote {png}")
    records.write(args.results, f"loss_parity_{tag}.json", {
        "device": device,
        "commit": records.commit(),
        "command": "python dev/loss_parity.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "what": f"{args.e} B={args.b} T={args.t} d={args.d}; ours on {args.device}, torch {args.device} "
                f"{args.dtype} compile={args.compile}",
        "steps": last,
        "ours_final_val": ours_val,
        "torch_final_val": torch_val,
        "rel_diff": round(rel_diff, 6),
        "tol": args.tol,
        "passed": passed,
        "ours_train": [ours["trl"][s] for s in range(last)],  # the train loss of steps 0 .. steps-1
        "torch_train": [theirs["trl"][s] for s in range(last)],
        "val_steps": sorted(ours["tel"]),
        "ours_val": [ours["tel"][s] for s in sorted(ours["tel"])],
        "torch_val": [theirs["tel"][s] for s in sorted(ours["tel"])],
    })
    print(f"final val loss at step {last}: ours {ours_val:.4f} | torch {torch_val:.4f} | relative difference "
          f"{rel_diff:.4%} (tolerance {args.tol:.2%}): {'PASS' if passed else 'FAIL'}")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    run(main)

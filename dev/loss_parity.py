"""Loss-curve parity: train the same model on the same data with the same schedule, from the same
init, through our trainer (train_gpt2.py) and through PyTorch eager (dev/torch_train.py) twice, in
fp32 and in bf16 autocast; then judge ours against PyTorch fp32 by a yardstick taken from the same
run: how far PyTorch's own bf16 lands from its fp32.

The verdict looks at the whole curves, not one final number: the train loss smoothed over SMOOTH steps
(dev/plot_logs.smooth, a centred moving average: one step's batch noise is not a trend) and every val
loss. On each, the largest gap between ours and PyTorch fp32 must be at most TOL_MULTIPLE times the
largest gap between PyTorch bf16 and PyTorch fp32, or TOL_FLOOR nats, whichever is larger. A multiple
of 3, because ours rounds in more places than autocast does (bf16 weights, activations and gradients,
stochastic rounding of the update, where autocast rounds only the inputs of matmuls and attention), so
it may land further from fp32 than PyTorch's bf16; a wrong kernel moves the curve by tenths of a nat.
A floor of 0.02 nats, because two runs can happen to track closely for a few steps, and a bar of 3
times almost nothing would fail rounding alone. On the CPU ours is fp32 too: its gap is rounding
(about 1e-4), far inside.

The three trainers run at once on a GPU (numerics, not speed: they share it), one after another on
the CPU (whose cores they would fight over), each with its run directory and its output under -o
(OUT/<run>/main.log, OUT/<run>.txt). Writes a plot and a JSON record
(loss_parity_<device>.{png,json}, with the curves, the gaps, the bars, each trainer's seconds and its
first step apart from the others: the first one compiles and builds plans); exits 1 when ours is
outside a bar. A run cut short (SIGINT) leaves the record of the curves so far, without a verdict.

The defaults are the plan dev/gpu_check.py runs on a GPU: GPT-2 124M (d12) on Tiny Shakespeare at
B=8, T=1024 and -d 16384 (two micro-steps of gradient accumulation, bf16 on ours), 50 steps (819,200
tokens: 2.7 epochs of the canonical 305,260-token train split, 0.5 of the larger offline stand-in;
more than MAX_EPOCHS is refused: past it both memorise the split and the curves say little), lr 6e-4
with 10 warmup steps and cosine decay to 6e-5, weight decay 0.1, val loss every 10 steps over every
batch of the val split (32,768 tokens: 3 batches of B*T). On the CPU (--device cpu) give a small model:

    python -m prepro.tinyshakespeare
    python dev/loss_parity.py                        # the d12 plan, on a CUDA machine
    python dev/loss_parity.py --device cpu -e d2 -b 4 -t 64 -d 512 -x 40 -v 10 -o log_parity_cpu
"""
import glob
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "dev"), str(REPO / "dev/bench")]
import records  # noqa: E402
from cli import LLMC_FLAGS, ArgumentParser, add_llmc_flags, fail, run  # noqa: E402
from fileformats import FormatError, read_shard  # noqa: E402
from plot_logs import plot, read_log, smooth  # noqa: E402
from train_gpt2 import TRAIN_DATA, VAL_DATA  # noqa: E402

SHARED = ("-i", "-j", "-e", "-b", "-t", "-d", "-x", "-k", "-l", "-u", "-q", "-c", "-v", "-m")  # the same for all
RUNS = ("ours", "torch_fp32", "torch_bf16")
SMOOTH = 10          # steps in the train loss's moving average
TOL_MULTIPLE = 3.0   # ours may be this many times further from PyTorch fp32 than PyTorch bf16 is
TOL_FLOOR = 0.02     # nats: the smallest bar
MAX_EPOCHS = 3.0
STEP_MS = re.compile(r"^step +\d+/\d+ \|.*\| ([\d.]+) ms \|", re.M)  # both trainers' step lines


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    add = parser.add_argument
    add("--help", action="help", help="show this help and exit")
    add_llmc_flags(parser, " ".join(SHARED), train_data=TRAIN_DATA, val_data=VAL_DATA, micro_batch_size=8,
                   total_batch_size=16384, max_steps=50, learning_rate=6e-4, warmup_steps=10, final_lr_frac=0.1,
                   weight_decay=0.1, val_loss_every=10, val_batches=-1)
    add("-o", dest="output_dir", default="log_parity", help="directory for the three runs and their output "
                                                             "(default: %(default)s)")
    add("--device", default="cuda", choices=("cpu", "cuda"), help="where all three run (default: %(default)s)")
    add("--results", default=str(records.RESULTS), help="directory for the PNG and JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.val_loss_every <= 0:
        fail(f"-v {args.val_loss_every}: the comparison needs val losses: give -v > 0")
    if args.max_steps <= 0:
        fail(f"-x {args.max_steps}: give a positive number of steps")
    for name in RUNS:
        if os.path.exists(os.path.join(args.output_dir, name)):
            fail(f"-o {args.output_dir}: already holds a {name} run: remove it, or give another directory")
    return args


def epochs(args):
    """How many times the run goes through -i's tokens; one line and exit 1 above MAX_EPOCHS."""
    paths = sorted(glob.glob(args.train_data))
    if not paths:
        fail(f"-i {args.train_data}: no file matches (python -m prepro.tinyshakespeare writes the default)")
    try:
        tokens = sum(len(read_shard(p)) for p in paths)
    except FormatError as e:
        fail(str(e))
    tokens_per_step = args.total_batch_size if args.total_batch_size != -1 else args.micro_batch_size * args.seq_len
    n = args.max_steps * tokens_per_step / tokens
    if n > MAX_EPOCHS:
        fail(f"-x {args.max_steps}: {args.max_steps} steps of {tokens_per_step:,} tokens are {n:.1f} epochs of -i "
             f"({tokens:,} tokens), over {MAX_EPOCHS:g}: lower -x or -d")
    return n


def device_name(device):
    if device == "cpu":
        return "cpu"
    import torch  # only the GPU's name needs torch here
    return torch.cuda.get_device_name()


def commands(args):
    shared = [x for flag in SHARED for x in (flag, str(getattr(args, LLMC_FLAGS[flag][0])))]
    torch_train = [sys.executable, str(REPO / "dev/torch_train.py"), *shared, "--device", args.device, "--compile", "0"]
    return {"ours": [sys.executable, str(REPO / "train_gpt2.py"), *shared, "--device", args.device, "-s", "0",
                     "-n", "0", "-o", os.path.join(args.output_dir, "ours")],
            "torch_fp32": [*torch_train, "--dtype", "fp32", "-o", os.path.join(args.output_dir, "torch_fp32")],
            "torch_bf16": [*torch_train, "--dtype", "bf16", "-o", os.path.join(args.output_dir, "torch_bf16")]}


def train_all(runs, out, at_once):
    """Run every trainer of runs ({name: argv}), its output to OUT/<name>.txt: all at once (on a GPU,
    which they share), or one after another (on the CPU, whose cores they would fight over).
    {name: (exit status, seconds)}; on SIGINT (which a terminal or dev/gpu_check.py also sends to the
    trainers) the ones still running are stopped and KeyboardInterrupt goes on."""
    os.makedirs(out, exist_ok=True)
    waiting, running, ended = list(runs.items()), {}, {}
    try:
        while waiting or running:
            while waiting and (at_once or not running):
                name, argv = waiting.pop(0)
                print(f"== {name}: {shlex.join(argv[1:])}", flush=True)
                with open(os.path.join(out, f"{name}.txt"), "w") as f:
                    running[name] = (subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT), time.monotonic())
            for name, (proc, t0) in list(running.items()):
                if proc.poll() is not None:
                    ended[name] = (proc.returncode, round(time.monotonic() - t0, 1))
                    del running[name]
                    print(f"{name}: exit status {proc.returncode} after {ended[name][1]} s", flush=True)
            time.sleep(0.1)
    except KeyboardInterrupt:
        for proc, _ in running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc, _ in running.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise
    return ended


def step_times(output):
    """(first step ms, median ms of the others) from a trainer's step lines, None where missing."""
    ms = [float(x) for x in STEP_MS.findall(output)]
    return (ms[0] if ms else None), (statistics.median(ms[1:]) if len(ms) > 1 else None)


def max_gap(a, b):
    return max(abs(x - y) for x, y in zip(a, b))


def verdict(curves, steps):
    """From the three runs' read_log curves (each complete to `steps`): the largest gaps to PyTorch fp32
    of ours and of PyTorch bf16, on the smoothed train loss and on the val losses, the bars, and
    whether ours is within both."""
    train = {name: smooth([c["trl"][s] for s in range(steps)], SMOOTH) for name, c in curves.items()}
    val_steps = sorted(curves["torch_fp32"]["tel"])
    val = {name: [c["tel"][s] for s in val_steps] for name, c in curves.items()}
    gaps = {f"{name}_{kind}": round(float(max_gap(values[name], values["torch_fp32"])), 6)
            for name in ("ours", "torch_bf16") for kind, values in (("train", train), ("val", val))}
    bars = {kind: round(max(TOL_MULTIPLE * gaps[f"torch_bf16_{kind}"], TOL_FLOOR), 6) for kind in ("train", "val")}
    passed = all(gaps[f"ours_{kind}"] <= bars[kind] for kind in bars)
    return gaps, bars, passed


def main(argv=None):
    args = parse_args(argv)
    n_epochs = epochs(args)
    runs = commands(args)
    device = device_name(args.device)
    tag = records.tag(device)
    print(f"{args.max_steps} steps, {n_epochs:.2f} epochs of -i; three trainers, "
          f"{'at once' if args.device == 'cuda' else 'one after another'}: ours, PyTorch eager fp32 and bf16",
          flush=True)
    status, ended = "complete", {}
    try:
        ended = train_all(runs, args.output_dir, at_once=args.device == "cuda")
    except KeyboardInterrupt:
        status = "interrupted (SIGINT): the curves so far, no verdict"

    curves, figures = {}, {}
    for name, command in runs.items():
        log = os.path.join(args.output_dir, name, "main.log")
        curves[name] = read_log(log) if os.path.exists(log) else {"trl": {}, "tel": {}, "eval": {}}
        output_path = os.path.join(args.output_dir, f"{name}.txt")
        output = Path(output_path).read_text(errors="replace") if os.path.exists(output_path) else ""
        first_ms, median_ms = step_times(output)
        steps = sorted(curves[name]["trl"])
        script = os.path.relpath(command[1], REPO)
        exit_status, seconds = ended.get(name, (None, None))
        figures[name] = {"command": shlex.join(["python", script, *command[2:]]), "exit_status": exit_status,
                         "seconds": seconds, "first_step_ms": first_ms,
                         "median_step_ms": median_ms, "train": [curves[name]["trl"][s] for s in steps],
                         "val_steps": sorted(curves[name]["tel"]),
                         "val": [curves[name]["tel"][s] for s in sorted(curves[name]["tel"])]}
    failed = [name for name, (rc, _) in ended.items() if rc != 0]
    if status == "complete" and failed:
        status = f"failed: {', '.join(failed)} exited non-zero"

    record = {
        "device": device, "commit": records.commit(),
        "command": "python dev/loss_parity.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "what": f"{args.model} B={args.micro_batch_size} T={args.seq_len} d={args.total_batch_size}, {args.max_steps} "
                f"steps ({n_epochs:.2f} epochs), val every {args.val_loss_every}; ours on {args.device} against "
                f"PyTorch eager fp32, with PyTorch eager bf16 autocast as the "
                f"yardstick; gaps: the largest |difference| to torch_fp32 of the train loss (moving average of "
                f"{SMOOTH}) and of the val losses; bar = max({TOL_MULTIPLE:g} x torch_bf16's gap, {TOL_FLOOR} nats)",
        "status": status, "steps": args.max_steps, "epochs": round(n_epochs, 3), "smooth": SMOOTH,
        "tol_multiple": TOL_MULTIPLE, "tol_floor": TOL_FLOOR, "runs": figures,
        "gaps": None, "bars": None, "passed": None,
    }
    complete = status == "complete" and all(set(c["trl"]) == set(range(args.max_steps)) for c in curves.values())
    if status == "complete" and not complete:
        record["status"] = status = "failed: a trainer's main.log lacks steps"
    if complete:
        record["gaps"], record["bars"], record["passed"] = verdict(curves, args.max_steps)

    os.makedirs(args.results, exist_ok=True)
    if all(c["trl"] for c in curves.values()):
        png = os.path.join(args.results, f"loss_parity_{tag}.png")
        plot({"ours (train_gpt2.py)": curves["ours"], "torch eager fp32": curves["torch_fp32"],
              "torch eager bf16 autocast": curves["torch_bf16"]}, png, smoothing=SMOOTH)
        print(f"wrote {png}")
    records.write(args.results, f"loss_parity_{tag}.json", record)
    if not complete:
        fail(f"{status} (the trainers' output is in {args.output_dir}/<run>.txt)")
    gaps, bars = record["gaps"], record["bars"]
    for kind, what in (("train", f"train loss (moving average of {SMOOTH})"), ("val", "val loss")):
        print(f"{what}: largest gap to torch fp32: ours {gaps[f'ours_{kind}']:.4f} | torch bf16 "
              f"{gaps[f'torch_bf16_{kind}']:.4f}; bar {bars[kind]:.4f}")
    print(f"ours against PyTorch fp32: {'PASS' if record['passed'] else 'FAIL'}")
    sys.exit(0 if record["passed"] else 1)


if __name__ == "__main__":
    run(main)

"""Plot llm.c-format main.log files: train loss (trl) and val loss (tel) against step, one panel
each, one line per run.

    python dev/plot_logs.py -o curves.png ours=log_ours/main.log torch=log_torch/main.log
"""
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import ArgumentParser, fail  # noqa: E402

LINE = re.compile(r"s:(\d+) (trl|tel):(\S+)")


def read_log(path):
    """main.log -> {'trl': {step: train loss}, 'tel': {step: val loss}}; other lines (eval:) are skipped."""
    curves = {"trl": {}, "tel": {}}
    with open(path) as f:
        for line in f:
            if m := LINE.match(line):
                curves[m.group(2)][int(m.group(1))] = float(m.group(3))
    return curves


def plot(runs, path):
    """runs: {label: read_log(...)}; writes a PNG with a train-loss and a val-loss panel."""
    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, curves in runs.items():
        for ax, key, style in ((train_ax, "trl", "-"), (val_ax, "tel", "o-")):
            steps = sorted(curves[key])
            ax.plot(steps, [curves[key][s] for s in steps], style, label=label, markersize=3, linewidth=1)
    for ax, title in ((train_ax, "train loss"), (val_ax, "val loss")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats per token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", default="curves.png", help="output PNG (default: %(default)s)")
    parser.add_argument("logs", nargs="+", metavar="LABEL=PATH", help="a run's label and its main.log")
    args = parser.parse_args(argv)
    runs = {}
    for spec in args.logs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            fail(f"'{spec}': give each log as LABEL=PATH, e.g. ours=log_ours/main.log")
        try:
            runs[label] = read_log(path)
        except OSError as e:
            fail(f"{path}: {e.strerror}")
        if not runs[label]["trl"] and not runs[label]["tel"]:
            fail(f"{path}: no s:<step> trl:/tel: lines: is it an llm.c main.log?")
    plot(runs, args.o)
    print(f"wrote {args.o}")


if __name__ == "__main__":
    main()

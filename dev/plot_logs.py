"""Plot runs from their main.log, as llm.c's dev/vislog.ipynb does: train loss (smoothed, the raw
values faint behind), val loss, and HellaSwag accuracy against steps, one line per run, with
optional reference lines for OpenAI's GPT-2 at the same size.

    python dev/plot_logs.py log_d12 log_d12_lr2x -o runs.png --gpt2 124M
    python dev/plot_logs.py ours=log_ours/main.log torch=log_torch/main.log -o curves.png

Each run is a run directory (its main.log), a main.log path, or LABEL=either. A run that was
stopped and resumed may have logged some steps twice (llm.c appends on resume): the newer value of
a step wins, as in vislog.
"""
import os
import re
import sys
from pathlib import Path

import numpy as np
import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import ArgumentParser, fail, run  # noqa: E402

LINE = re.compile(r"s:(\d+) (trl|tel|eval):(\S+)")
# OpenAI's GPT-2 checkpoints, as llm.c's dev/vislog.ipynb lists them: val loss on llm.c's FineWeb val
# split, and HellaSwag accuracy
GPT2_VAL_LOSS = {"124M": 3.424958, "350M": 3.083089, "774M": 3.000580, "1558M": 2.831273}
GPT2_HELLASWAG = {"124M": 0.294463, "350M": 0.375224, "774M": 0.431986, "1558M": 0.488946}
FORMATS = ("png", "pdf", "svg")  # -o's extension picks one; matplotlib writes each without extra packages
DEFAULT_NAME = "runs.png"


def read_log(path):
    """main.log -> {'trl': {step: train loss}, 'tel': {step: val loss}, 'eval': {step: HellaSwag}};
    a step logged twice keeps its later value. A value that is not a number is a ValueError naming
    the file and line."""
    curves = {"trl": {}, "tel": {}, "eval": {}}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if m := LINE.match(line):
                try:
                    curves[m.group(2)][int(m.group(1))] = float(m.group(3))
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: {m.group(2)}:{m.group(3)} is not a number") from None
    return curves


def smooth(values, window):
    """vislog's moving average: a centred window of `window` values, the ends padded with the edge value."""
    values = np.asarray(values, dtype=np.float64)
    if window < 3 or values.size < window:
        return values
    padded = np.pad(values, (window // 2, window - 1 - window // 2), mode="edge")
    return np.convolve(padded, np.ones(window) / window, mode="valid")


def plot(runs, path, smoothing=0, gpt2=None):
    """runs: {label: read_log(...)}; writes an image, in the format of path's extension (one of FORMATS):
    train loss, val loss, and HellaSwag when any run has it (or gpt2, one of GPT2_VAL_LOSS's sizes,
    asks for its reference line)."""
    hellaswag = gpt2 is not None or any(curves["eval"] for curves in runs.values())
    fig, axes = plt.subplots(1, 3 if hellaswag else 2, figsize=(18 if hellaswag else 12, 4.5))
    train_ax, val_ax = axes[0], axes[1]
    for i, (label, curves) in enumerate(runs.items()):
        color = f"C{i}"
        steps = sorted(curves["trl"])
        values = [curves["trl"][s] for s in steps]
        if smoothing >= 3:
            train_ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        train_ax.plot(steps, smooth(values, smoothing), color=color, label=label, linewidth=1.2)
        steps = sorted(curves["tel"])
        val_ax.plot(steps, [curves["tel"][s] for s in steps], "o-", color=color, label=label, markersize=3,
                    linewidth=1)
        if hellaswag:
            steps = sorted(curves["eval"])
            axes[2].plot(steps, [curves["eval"][s] for s in steps], "o-", color=color, label=label, markersize=3,
                         linewidth=1)
    if gpt2 is not None:
        val_ax.axhline(GPT2_VAL_LOSS[gpt2], color="r", linestyle="--", label=f"OpenAI GPT-2 ({gpt2}) checkpoint")
        axes[2].axhline(GPT2_HELLASWAG[gpt2], color="r", linestyle="--", label=f"OpenAI GPT-2 ({gpt2}) checkpoint")
    titles = [f"train loss{f' (moving average of {smoothing})' if smoothing >= 3 else ''}", "val loss",
              "HellaSwag"][:len(axes)]
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy" if title == "HellaSwag" else "loss (nats per token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format=os.path.splitext(path)[1][1:].lower())
    plt.close(fig)


def resolve(spec):
    """A run argument -> (label, main.log path): DIR, DIR/main.log or LABEL=either; one line if it is none."""
    label, sep, target = spec.partition("=")
    if not sep:
        label, target = None, spec
    if not target:
        fail(f"'{spec}': give a run directory, its main.log, or LABEL=either")
    log = os.path.join(target, "main.log") if os.path.isdir(target) else target
    if not os.path.isfile(log):
        problem = "no main.log in this directory" if os.path.isdir(target) else "no such run directory or file"
        fail(f"{target}: {problem}")
    if label is None:
        label = os.path.basename(os.path.dirname(os.path.abspath(log))) if os.path.basename(log) == "main.log" else log
    return label, log


def output_path(o):
    """-o as the file to write: a directory gets runs.png inside it; the extension must be one of
    FORMATS (matplotlib would take a missing one as .png and add it, writing another file)."""
    path = os.path.join(o, DEFAULT_NAME) if os.path.isdir(o) else o
    extension = os.path.splitext(path)[1][1:].lower()
    if extension not in FORMATS:
        problem = f".{extension} is not an image format written here" if extension else "no extension names the format"
        fail(f"-o {o}: {problem}: end it in {', '.join(f'.{f}' for f in FORMATS)}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        fail(f"-o {o}: no directory {os.path.dirname(os.path.abspath(path))}")
    return path


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="a run directory, its main.log, or LABEL=either")
    parser.add_argument("-o", default=DEFAULT_NAME, help=f"output image: .png, .pdf or .svg, or a directory to "
                                                         f"write {DEFAULT_NAME} in (default: %(default)s)")
    parser.add_argument("--smooth", type=int, default=21, help="train loss moving-average window, in steps "
                                                               "(below 3: none; default: %(default)s)")
    parser.add_argument("--gpt2", choices=tuple(GPT2_VAL_LOSS), help="draw OpenAI's GPT-2 of this size: its val "
                                                                     "loss and HellaSwag, as llm.c's vislog lists them")
    args = parser.parse_args(argv)
    path = output_path(args.o)
    runs = {}
    for spec in args.runs:
        label, log = resolve(spec)
        try:
            curves = read_log(log)
        except (OSError, UnicodeDecodeError) as e:
            fail(f"{log}: {getattr(e, 'strerror', None) or e}")
        except ValueError as e:  # its message names the file and line
            fail(str(e))
        if not any(curves.values()):
            fail(f"{log}: no s:<step> trl:/tel:/eval: lines: is it an llm.c main.log?")
        if label in runs:
            label = f"{label} ({log})"
        runs[label] = curves
    plot(runs, path, args.smooth, args.gpt2)
    print(f"wrote {path}")


if __name__ == "__main__":
    run(main)

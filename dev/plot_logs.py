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
    """A centred moving average of `window` values, as vislog's, but for the ends: there the window holds
    the values there are, fewer, where vislog pads with copies of the edge value, so that one noisy last
    step counted window/2 times bent the curve up (or down) at its end."""
    values = np.asarray(values, dtype=np.float64)
    if window < 3:
        return values
    edges = (window // 2, window - 1 - window // 2)  # values before and after the centre
    sums = np.convolve(np.pad(values, edges), np.ones(window), mode="valid")  # zeros beyond the ends add nothing
    counts = np.convolve(np.pad(np.ones(values.size), edges), np.ones(window), mode="valid")
    return sums / counts


PANELS = {"trl": "train loss", "tel": "val loss", "eval": "HellaSwag"}  # read_log's curves, in panel order
GPT2 = {"tel": GPT2_VAL_LOSS, "eval": GPT2_HELLASWAG}


def missing_panels(runs):
    """The titles of PANELS that no run has values for."""
    return [title for kind, title in PANELS.items() if not any(curves[kind] for curves in runs.values())]


def figure(runs, smoothing=0, gpt2=None):
    """runs: {label: read_log(...)} -> a Figure with a panel for each of train loss, val loss and HellaSwag
    that some run has values for, and in each a line for each run with values there (a run keeps its
    colour across panels). gpt2, one of GPT2_VAL_LOSS's sizes, adds OpenAI's GPT-2 as a reference line
    to the val loss and HellaSwag panels there are."""
    missing = missing_panels(runs)
    kinds = [kind for kind, title in PANELS.items() if title not in missing]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for i, (label, curves) in enumerate(runs.items()):
            if not curves[kind]:
                continue
            steps = sorted(curves[kind])
            values = [curves[kind][s] for s in steps]
            if kind == "trl":
                if smoothing >= 3:
                    ax.plot(steps, values, color=f"C{i}", alpha=0.25, linewidth=0.8)
                ax.plot(steps, smooth(values, smoothing), color=f"C{i}", label=label, linewidth=1.2)
            else:
                ax.plot(steps, values, "o-", color=f"C{i}", label=label, markersize=3, linewidth=1)
        if gpt2 is not None and kind in GPT2:
            ax.axhline(GPT2[kind][gpt2], color="r", linestyle="--", label=f"OpenAI GPT-2 ({gpt2}) checkpoint")
        smoothed = f" (moving average of {smoothing})" if kind == "trl" and smoothing >= 3 else ""
        ax.set_title(PANELS[kind] + smoothed)
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy" if kind == "eval" else "loss (nats per token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def plot(runs, path, smoothing=0, gpt2=None):
    """figure(runs, smoothing, gpt2) written to path, in the format of its extension (one of FORMATS)."""
    fig = figure(runs, smoothing, gpt2)
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
    dropped = [title for title in missing_panels(runs) if title != PANELS["trl"]]
    if args.gpt2 is not None and dropped:
        lines = "line is" if len(dropped) == 1 else "lines are"
        print(f"--gpt2 {args.gpt2}: no run has {' or '.join(dropped)} values, so OpenAI GPT-2's "
              f"{' and '.join(dropped)} {lines} left out, with the panel")
    plot(runs, path, args.smooth, args.gpt2)
    print(f"wrote {path}")


if __name__ == "__main__":
    run(main)

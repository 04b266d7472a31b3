"""llm.c's test_gpt2, as a command: our model against the PyTorch reference's debug state.

Loads a model file and a debug state (dev/torch_gpt2.py writes both, as llm.c's train_gpt2.py
does), runs train_gpt2.py's forward and backward on the state's tokens and prints llm.c's report:
the logits, the loss, each of the 16 gradient tensors OK / NOT OK with its largest difference, then
ten AdamW steps' losses beside the reference's (recorded in the state by dev/torch_gpt2.py --steps;
llm.c's own state file carries none, and then they are printed unchecked). Exits 0 only when all
is OK. The bars (dev/llmc_thresholds.py): fp32 ones on the CPU, llm.c's bf16 ones on the GPU.

    python -m prepro.gpt2_weights gpt2          # data/gpt2_124M.bin
    python dev/torch_gpt2.py --model-in data/gpt2_124M.bin -b 4 -t 64 --steps 10 --lr 1e-4 \\
           --tokens data/tinyshakespeare/tiny_shakespeare_val.bin --state-out data/gpt2_124M_debug_state.bin
    python dev/test_gpt2.py                     # -e data/gpt2_124M.bin -s data/gpt2_124M_debug_state.bin
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import llmc_thresholds as bars  # noqa: E402
import train_gpt2 as gpt  # noqa: E402
from cli import ArgumentParser, fail, run  # noqa: E402
from fileformats import FormatError, num_parameters, param_shapes, read_debug_state  # noqa: E402


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-e", default="data/gpt2_124M.bin", help="model file (default: %(default)s)")
    parser.add_argument("-s", default="data/gpt2_124M_debug_state.bin", help="debug state (default: %(default)s)")
    parser.add_argument("--device", default="auto", choices=gpt.DEVICES,
                        help="as train_gpt2.py's (default: %(default)s)")
    return parser.parse_args(argv)


def recorded_steps(path):
    """(lr, weight decay, losses) of the reference's AdamW steps, from the header slots
    dev/torch_gpt2.py fills, or None (llm.c's own file leaves them 0)."""
    header = np.fromfile(path, dtype="<i4", count=256)
    n = int(header[4])
    if n == 0:
        return None
    lr, weight_decay = header[5:7].view("<f4").tolist()
    return lr, weight_decay, header[8:8 + n].view("<f4").astype(np.float64).tolist()


def check_grads(ours, theirs, bf16):
    """name -> (ok, largest |difference|, the bar it was held to)."""
    report = {}
    for name in ours:
        diff = np.abs(ours[name] - theirs[name])
        if bf16:  # llm.c's: each element within its tensor's threshold + eps * |reference|
            excess = diff - bars.LLMC_BF16_EPS * np.abs(theirs[name]) - bars.LLMC_GRAD_THRESHOLDS[name]
            report[name] = (float(excess.max()) <= 0, float(diff.max()),
                            f"{bars.LLMC_GRAD_THRESHOLDS[name]:g} + {bars.LLMC_BF16_EPS:g} |ref|")
        else:
            bar = bars.FP32_GRAD_REL * float(np.abs(theirs[name]).max())
            report[name] = (float(diff.max()) <= bar, float(diff.max()), f"{bar:.3e}")
    return report


def main(argv=None):
    args = parse_args(argv)
    try:
        config, params = gpt.load_params(args.e)
        debug = read_debug_state(args.s, config.vocab_size, num_parameters(config))
    except FormatError as e:
        fail(f"{e} (a model and the debug state the PyTorch reference wrote from it: see --help)")
    steps = recorded_steps(args.s)
    B, T = debug.x.shape
    if T > config.max_seq_len:
        fail(f"{args.s}: T={T} is above the model's maximum sequence length {config.max_seq_len}: "
             f"not this model's state")
    K = gpt.select_backend(args.device)
    model = gpt.GPT2(config, params, B, T, K)
    bf16 = model.params_memory.dtype != np.float32
    V = config.vocab_size
    print("[State]")
    print(f"batch_size: {B}\nseq_len: {T}")
    print(f"model: {args.e} (L={config.num_layers} NH={config.num_heads} C={config.channels}, "
          f"{num_parameters(config):,} parameters) on {K.DEVICE}, {'bf16: llm.c' if bf16 else 'fp32: our'} bars")
    all_ok = True

    def verdict(ok, what):
        nonlocal all_ok
        all_ok &= bool(ok)
        print(f"{'OK' if ok else 'NOT OK'} {what}")

    num_steps = len(steps[2]) if steps else 10
    lr, weight_decay = (steps[0], steps[1]) if steps else (1e-4, 0.0)
    losses = []
    for step in range(num_steps):
        gpt.zero_grad(model)
        gpt.forward(model, debug.x)
        if step == 0:
            logits = K.download(model.acts_for(B, T)["logits"])[..., :V]
            diff = float(np.abs(logits - debug.logits).max())
            if bf16:
                rel = float(np.linalg.norm(logits - debug.logits) / np.linalg.norm(debug.logits))
                ok = diff <= bars.LLMC_LOGITS_ATOL and rel <= bars.LOGITS_REL_ERR
                bar = f"{bars.LLMC_LOGITS_ATOL:g}, and {rel:.2%} <= {bars.LOGITS_REL_ERR:.0%} as a whole"
            else:
                bar_value = bars.FP32_LOGITS_REL * float(np.abs(debug.logits).max())
                ok, bar = diff <= bar_value, f"{bar_value:.3e}"
            verdict(ok, f"(LOGITS), max_diff = {diff:.6e} (bar {bar})")
        loss = float(gpt.backward(model, debug.y))
        losses.append(loss)
        if step == 0:
            bar = bars.LLMC_LOSS_ATOL if bf16 else bars.FP32_LOSS_REL * abs(debug.loss)
            verdict(abs(loss - debug.loss) <= bar, f"(LOSS): {loss:.6f} reference {debug.loss:.6f} (bar {bar:.3e})")
            shapes = param_shapes(config)
            report = check_grads(gpt.carve(K.download(model.grads_memory)[:num_parameters(config)], shapes),
                                 gpt.carve(debug.grads, shapes), bf16)
            for name, (ok, diff, bar) in report.items():
                verdict(ok, f"{name}: max_diff = {diff:.6e} (bar {bar})")
        gpt.update(model, lr, weight_decay, step, K.clip_scale(gpt.grad_norm(model), gpt.GRAD_CLIP), seed=1000 + step)
    step_bar = bars.LLMC_STEP_LOSS_ATOL if bf16 else bars.FP32_STEP_LOSS_ATOL
    if steps is None:
        print(f"{args.s} records no reference losses (llm.c's own file; dev/torch_gpt2.py --steps records them): "
              f"our {num_steps} steps at lr {lr:g}, unchecked")
    for step, loss in enumerate(losses):
        if steps is None:
            print(f"step {step}: loss {loss:.6f}")
        else:
            verdict(abs(loss - steps[2][step]) <= step_bar,
                    f"step {step}: loss {loss:.6f} reference {steps[2][step]:.6f} (bar {step_bar:g})")
    print(f"overall okay: {int(all_ok)}")
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    run(main)

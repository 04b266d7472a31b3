"""Time one training step of our NumPy GPT-2 beside the PyTorch reference's (eager, fp32) on the
same model, batch and CPU, in one run: forward, backward, global-norm clip and AdamW (torch's
default CPU AdamW, weight decay on 2-D weights). Print both, the ratio, and write a JSON record.

    python dev/bench/cpu_step.py -e d6 -b 4 -t 128 -n 5
"""
import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "dev")]
import torch_gpt2 as ref  # noqa: E402
import records  # noqa: E402
import train_gpt2 as gpt  # noqa: E402
from kernels import reference as K  # noqa: E402

LR, WEIGHT_DECAY = 3e-4, 0.1


def median_seconds(fn, repeats):
    fn()  # warm-up: first-touch of buffers, BLAS threads
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-e", default="d12", help="model descriptor dN")
    parser.add_argument("-b", type=int, default=4, help="batch size")
    parser.add_argument("-t", type=int, default=64, help="sequence length")
    parser.add_argument("-n", type=int, default=5, help="timed repeats (median reported)")
    parser.add_argument("-o", default=str(records.RESULTS), help="directory for the JSON record")
    args = parser.parse_args()

    config = gpt.config_from_descriptor(args.e)
    params = gpt.init_params(config)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(args.b, args.t + 1), dtype=np.int32)
    x, y = np.ascontiguousarray(tokens[:, :-1]), np.ascontiguousarray(tokens[:, 1:])

    model = gpt.GPT2(config, params, args.b, args.t)

    def ours():
        gpt.zero_grad(model)
        gpt.forward(model, x)
        gpt.backward(model, x, y)
        norm = gpt.grad_norm(model)
        gpt.update(model, LR, WEIGHT_DECAY, 0, K.clip_scale(norm, gpt.GRAD_CLIP), seed=0)

    torch_model = ref.init_llmc(ref.GPT2(ref.Config(
        num_layers=config.num_layers, num_heads=config.num_heads, channels=config.channels,
        max_seq_len=config.max_seq_len, vocab_size=config.vocab_size, padded_vocab_size=config.padded_vocab_size)))
    tx, ty = torch.from_numpy(x).long(), torch.from_numpy(y).long()
    optimizer = ref.llmc_adamw(torch_model, LR, WEIGHT_DECAY)  # torch's default CPU implementation

    def theirs():
        optimizer.zero_grad(set_to_none=False)
        _, loss = torch_model(tx, ty)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(torch_model.parameters(), gpt.GRAD_CLIP)
        optimizer.step()

    ours_s = median_seconds(ours, args.n)
    torch_s = median_seconds(theirs, args.n)
    record = {
        "device": f"CPU: {cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__} threads "
                  f"{torch.get_num_threads()}, numpy {np.__version__}",
        "commit": records.commit(),
        "command": "python dev/bench/cpu_step.py " + " ".join(sys.argv[1:]),
        "what": f"training step (forward, backward, clip, AdamW), {args.e}, B={args.b}, T={args.t}, fp32, "
                f"median of {args.n}",
        "ours_ms": round(1000 * ours_s, 2),
        "torch_ms": round(1000 * torch_s, 2),
        "ratio_ours_over_torch": round(ours_s / torch_s, 3),
    }
    print(f"{record['what']}\nNumPy twins   {record['ours_ms']:9.2f} ms\nPyTorch eager {record['torch_ms']:9.2f} ms\n"
          f"ratio (ours / torch time) {record['ratio_ours_over_torch']:.3f}")
    records.write(args.o, f"cpu_step_{args.e}_b{args.b}_t{args.t}.json", record)


if __name__ == "__main__":
    main()

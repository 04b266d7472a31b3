"""Time every CUDA kernel of kernels/cuda.py beside its PyTorch eager counterpart, at GPT-2 124M's
shapes, in one run on one GPU. Print a table and write a JSON record to dev/bench/results/.

PyTorch's side is eager: each counterpart is a composition of eager calls (add then layer_norm, linear
then gelu, cross-entropy on a strided [:, :V] slice, which adds a copy), not what torch.compile would
fuse them into. "Faster than PyTorch eager" is what a ratio above 1 says, nothing more.

Each figure is the median of -n CUDA-event timings, taken after -w warm-up calls, with a 1 GiB
buffer zeroed before every timed call: it flushes the L2 cache (the trainer's activations do not
stay there between layers) and keeps the GPU busy while the host queues the call, so a timing is
the GPU's time, not Python's launch latency. Ours and PyTorch eager's run on one stream, on the same input
values (our kernels see PyTorch's tensors through DLPack, bf16 as uint16 bits).

Rates: GB/s counts the bytes a kernel must move at the least (each formula is in the record), on
both sides with the same formula; TFLOP/s counts the matmuls' 2*M*N*K. The references are the card's
own: a 1 GiB device-to-device copy (bytes read + written) and a bf16 8192^3 torch matmul.

    python dev/bench/kernels.py -b 8 -n 20
"""
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "dev/bench")]  # records.py, under -m too
import records  # noqa: E402
from cli import ArgumentParser, fail, run  # noqa: E402

C, NH = 768, 12                  # GPT-2 124M
HS = C // NH
V, VP = 50257, 50304             # vocab, padded to a multiple of 128
NUM_PARAMS = 124_475_904         # with the padded vocab
FLUSH_BYTES = 1 << 30            # 20 times an H100's 50 MB L2; ~0.3 ms of writes


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-b", type=int, default=8, help="batch size B")
    parser.add_argument("-t", type=int, default=1024, help="sequence length T")
    parser.add_argument("-n", type=int, default=20, help="timed repeats (the median is reported)")
    parser.add_argument("-w", type=int, default=3, help="warm-up calls before timing")
    parser.add_argument("-o", default=str(records.RESULTS), help="directory for the JSON record")
    args = parser.parse_args(argv)
    for flag, least in (("b", 1), ("t", 1), ("n", 1), ("w", 0)):
        if getattr(args, flag) < least:
            fail(f"-{flag} {getattr(args, flag)}: must be at least {least}")
    return args


def load_backends():
    """torch, cupy and our kernels, or one line on why not."""
    try:
        import torch
    except ImportError:
        fail("PyTorch is not installed: this benchmark compares against it (pip install torch)")
    if not torch.cuda.is_available():
        fail("no CUDA device: this benchmark times GPU kernels")
    try:
        import cupy
        from kernels import cuda_backend
        cuda = cuda_backend("gpu")
    except Exception as e:  # CuPy or nvcc missing, a kernel that does not compile
        fail(f"cannot load our CUDA kernels: {str(e).strip().splitlines()[0]}")
    return torch, cupy, cuda


class Bench:
    """The timing loop, shared by both sides."""

    def __init__(self, torch, repeats, warmup):
        self.torch, self.repeats, self.warmup = torch, repeats, warmup
        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")

    def ms(self, fn):
        torch = self.torch
        for _ in range(self.warmup):
            fn()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.repeats)]
        for start, end in events:
            self.flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events)


def peaks(torch, bench):
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = bench.ms(lambda: dst.copy_(src))
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    matmul_ms = bench.ms(lambda: a @ b)
    return {"copy_GBps": round(2 * (1 << 30) / copy_ms / 1e6, 1),
            "bf16_matmul_TFLOPs": round(2 * n ** 3 / matmul_ms / 1e9, 1)}


def cases(torch, cp, K, B, T):
    """(name, what, ours, theirs, unit, amount, formula) per kernel: ours and theirs are zero-argument
    callables; amount is bytes (unit GB/s) or flops (unit TFLOP/s)."""
    F = torch.nn.functional
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dev, bf16, f32 = "cuda", torch.bfloat16, torch.float32
    BT = B * T
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, scale=1.0, grad=False):
        x = (torch.randn(*shape, device=dev, generator=gen) * scale).to(bf16)
        return x.requires_grad_() if grad else x

    def empty(*shape, dtype=bf16):
        return torch.empty(*shape, device=dev, dtype=dtype)

    def call(name, *args):
        """Our kernel `name` on CuPy views of the torch tensors in args (bf16 as uint16 bits), made
        once here so that the timed call is just the kernel's wrapper."""
        fn = getattr(K, name)
        views = []
        for a in args:
            if torch.is_tensor(a):
                a = a.detach()
                a = cp.from_dlpack(a.view(torch.int16)).view(cp.uint16) if a.dtype == bf16 else cp.from_dlpack(a)
            views.append(a)
        return lambda: fn(*views)

    def grad(outputs, inputs, dout):
        return lambda: torch.autograd.grad(outputs, inputs, dout, retain_graph=True)

    # ------------------------------------------------------------------ encoder
    idx = torch.randint(0, V, (B, T), device=dev, generator=gen, dtype=torch.int32)
    idx_long = idx.long()
    wte, wpe = randn(VP, C, scale=0.02, grad=True), randn(1024, C, scale=0.01, grad=True)
    wte_, wpe_ = wte.detach(), wpe.detach()
    enc_out, dx = empty(B, T, C), randn(B, T, C)
    dwte, dwpe = randn(VP, C), randn(1024, C)
    unique_rows = int(torch.unique(idx).numel())
    enc = F.embedding(idx_long, wte) + wpe[:T]
    yield ("encoder_forward", "wte[idx] + wpe", call("encoder_forward", enc_out, idx, wte, wpe),
           lambda: F.embedding(idx_long, wte_) + wpe_[:T], "GB/s",
           2 * BT * C * 2 + T * C * 2 + 4 * BT, "read BT*C wte rows + T*C wpe + BT ids, write BT*C (bf16)")
    yield ("encoder_backward", "dwte rows, dwpe += dout", call("encoder_backward", dwte, dwpe, dx, idx),
           grad(enc, (wte, wpe), dx), "GB/s",
           BT * C * 2 + 2 * unique_rows * C * 2 + 2 * T * C * 2 + 4 * BT,
           f"read dout BT*C + ids, read+write the {unique_rows} dwte rows used and T*C dwpe (bf16)")

    # ------------------------------------------------------------------ layernorm
    x, lnw, lnb = randn(B, T, C, grad=True), randn(C, grad=True), randn(C, grad=True)
    x_, lnw_, lnb_ = x.detach(), lnw.detach(), lnb.detach()
    ln_out, mean, rstd = empty(B, T, C), empty(B, T, dtype=f32), empty(B, T, dtype=f32)
    dinp_c, dlnw, dlnb = randn(B, T, C), randn(C), randn(C)
    ln_forward = call("layernorm_forward", ln_out, mean, rstd, x, lnw, lnb)
    ln_forward()  # the mean and rstd that the backward reads
    ln = F.layer_norm(x, (C,), lnw, lnb)
    yield ("layernorm_forward", "(B,T,C)", ln_forward, lambda: F.layer_norm(x_, (C,), lnw_, lnb_), "GB/s",
           2 * BT * C * 2 + 2 * BT * 4 + 2 * C * 2, "read x, write out (BT*C bf16), write mean, rstd (fp32)")
    yield ("layernorm_backward", "dinp, dweight, dbias",
           call("layernorm_backward", dinp_c, dlnw, dlnb, dx, x, lnw, mean, rstd), grad(ln, (x, lnw, lnb), dx), "GB/s",
           4 * BT * C * 2 + 2 * BT * 4 + 5 * C * 2,
           "read dout, x, read+write dinp (BT*C bf16 each), read mean, rstd, w, read+write dw, db")
    x2 = randn(B, T, C)
    residual, normed, mean2, rstd2 = empty(B, T, C), empty(B, T, C), empty(B, T, dtype=f32), empty(B, T, dtype=f32)
    yield ("fused_residual_forward", "residual + layernorm",
           call("fused_residual_forward", residual, normed, mean2, rstd2, x, x2, lnw, lnb),
           lambda: F.layer_norm(x_ + x2, (C,), lnw_, lnb_), "GB/s",
           4 * BT * C * 2 + 2 * BT * 4 + 2 * C * 2, "read 2, write 2 (BT*C bf16), write mean, rstd (fp32)")

    # ------------------------------------------------------------------ matmuls
    def linear(name, what, OC, with_gelu=False, with_bias=True, weight=None):
        inp = randn(B, T, C)
        w = weight.detach() if weight is not None else randn(OC, C, scale=C ** -0.5)
        b = randn(OC, scale=0.1) if with_bias else None
        out, pre = empty(B, T, OC), (empty(B, T, OC) if with_gelu else None)

        def theirs():
            y = F.linear(inp, w, b)
            return F.gelu(y, approximate="tanh") if with_gelu else y

        return (name, what, call("matmul_forward", out, inp, w, b, pre), theirs, "TFLOP/s", 2 * BT * C * OC,
                "2*BT*C*OC")

    yield linear("matmul_forward qkv", f"(BT,{C}) x ({3 * C},{C})^T + bias", 3 * C)
    yield linear("matmul_forward fc+gelu", f"gelu((BT,{C}) x ({4 * C},{C})^T + bias)", 4 * C, with_gelu=True)
    yield linear("matmul_forward classifier", f"(BT,{C}) x ({VP},{C})^T", VP, with_bias=False, weight=wte)

    def linear_backward(name, what, IC, OC, with_gelu=False, with_bias=True, weight=None):
        pre = randn(B, T, IC, grad=True) if with_gelu else None
        inp = randn(B, T, IC, grad=not with_gelu)  # for ours, gelu(pre) in the trainer: any values time alike
        w = weight if weight is not None else randn(OC, IC, scale=IC ** -0.5, grad=True)
        b = randn(OC, scale=0.1, grad=True) if with_bias else None
        dout = randn(B, T, OC)
        dinp, dw, db = empty(B, T, IC), randn(OC, IC), (randn(OC) if with_bias else None)
        y = F.linear(F.gelu(pre, approximate="tanh") if with_gelu else inp, w, b)
        wrt = tuple(t for t in (pre if with_gelu else inp, w, b) if t is not None)
        return (name, what, call("matmul_backward", dinp, dw, db, dout, inp, w, pre), grad(y, wrt, dout),
                "TFLOP/s", 4 * BT * IC * OC, "4*BT*C*OC (dinp and dweight)")

    yield linear_backward("matmul_backward qkv", "dinp, dweight, dbias", C, 3 * C)
    yield linear_backward("matmul_backward fcproj+gelu'", "dinp through gelu', dweight, dbias", 4 * C, C,
                          with_gelu=True)
    yield linear_backward("matmul_backward classifier", "dinp, dwte", C, VP, with_bias=False, weight=wte)

    # ------------------------------------------------------------------ attention
    qkv = randn(B, T, 3 * C, grad=True)
    qkv_ = qkv.detach()
    att_out, lse, datt, dqkv = empty(B, T, C), empty(B, NH, T, dtype=f32), randn(B, T, C), empty(B, T, 3 * C)

    def sdpa(qkv):
        q, k, v = qkv.view(B, T, 3, NH, HS).permute(2, 0, 3, 1, 4)  # each (B, NH, T, HS)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(B, T, C)

    att_forward = call("attention_forward", att_out, lse, qkv)
    att_forward()  # the out and lse that the backward reads
    att = sdpa(qkv)
    causal_flops = 2 * B * NH * T * T * HS  # QK^T and PV, 2*T*T*HS flops each, half of them masked
    yield ("attention_forward", f"causal, NH={NH}, HS={HS}; torch eager: flash SDPA", att_forward, lambda: sdpa(qkv_),
           "TFLOP/s", causal_flops, "4*B*NH*T^2*HS / 2 (causal)")
    yield ("attention_backward", "dqkv", call("attention_backward", dqkv, datt, qkv, att_out, lse),
           grad(att, (qkv,), datt), "TFLOP/s", 5 * causal_flops // 2, "2.5 x forward (5 matmuls to its 2)")

    # ------------------------------------------------------------------ gelu
    h = randn(B, T, 4 * C, grad=True)
    h_ = h.detach()
    h_out, dh_in, dh = empty(B, T, 4 * C), randn(B, T, 4 * C), empty(B, T, 4 * C)
    gelu = F.gelu(h, approximate="tanh")
    n4 = BT * 4 * C
    yield ("gelu_forward", "(B,T,4C), tanh", call("gelu_forward", h_out, h), lambda: F.gelu(h_, approximate="tanh"),
           "GB/s", 2 * n4 * 2, "read + write B*T*4C bf16")
    yield ("gelu_backward", "(B,T,4C)", call("gelu_backward", dh, h, dh_in), grad(gelu, (h,), dh_in),
           "GB/s", 3 * n4 * 2, "read inp, dout, write dinp (B*T*4C bf16)")

    # ------------------------------------------------------------------ classifier
    logits_theirs = randn(BT, VP, grad=True)
    logits_ours = logits_theirs.detach().clone()  # ours overwrites it with dlogits, call after call
    targets = torch.randint(0, V, (BT,), device=dev, generator=gen, dtype=torch.int32)
    targets_long = targets.long()
    losses = empty(BT, dtype=f32)

    def cross_entropy():
        loss = F.cross_entropy(logits_theirs[:, :V], targets_long)
        return torch.autograd.grad(loss, logits_theirs)

    yield ("fused_classifier", "softmax + cross-entropy + dlogits; torch eager: F.cross_entropy fwd+bwd on the "
           "strided [:, :V] slice (a copy)",
           call("fused_classifier", logits_ours, losses, targets, V, 1.0 / BT, True),
           cross_entropy, "GB/s", 2 * BT * VP * 2, "read logits, write dlogits (BT*Vp bf16)")

    # ------------------------------------------------------------------ optimizer
    params, grads = randn(NUM_PARAMS, scale=0.02), randn(NUM_PARAMS, scale=1e-3)
    m, v = torch.zeros(NUM_PARAMS, device=dev), torch.zeros(NUM_PARAMS, device=dev)
    master = params.float()
    p32 = params.float().requires_grad_()
    p32.grad = grads.float()
    optimizer = torch.optim.AdamW([p32], lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    yield ("adamw", f"{NUM_PARAMS} params; ours: bf16 params + fp32 master; torch eager: fused AdamW, fp32 params "
           "and grads",
           call("adamw", params, grads, m, v, master, 1, 6e-4, 0.9, 0.95, 1e-8, 0.1, 1.0, 42),
           optimizer.step, "GB/s", 28 * NUM_PARAMS,
           "ours: grad 2 + param 2 + m, v, master 2*4 each = 28 B/param; torch eager: param 2*4 + grad 4 "
           "+ m, v 2*4 each = 28 B/param")
    yield ("global_norm", f"{NUM_PARAMS} bf16 grads, the norm back on the host (both sides)",
           call("global_norm", grads), lambda: torch.linalg.vector_norm(grads, dtype=f32).item(),
           "GB/s", 2 * NUM_PARAMS, "read 2 B/param")


def row_text(e):
    return (f"{e['kernel']:30s} {e['ours_ms']:9.4f} {e['torch_eager_ms']:9.4f} "
            f"{e['ratio_torch_eager_over_ours']:10.2f} {e['ours_rate']:9.1f} {e['torch_eager_rate']:9.1f} "
            f"{e['unit']:8s} {e['ours_fraction_of_peak']:5.2f}")


def main(argv=None):
    args = parse_args(argv)
    torch, cp, K = load_backends()
    B, T = args.b, args.t
    if T > 1024:
        fail(f"-t {T}: GPT-2 124M's wpe has 1024 positions")
    device = torch.cuda.get_device_name()
    bench = Bench(torch, args.n, args.w)
    stream = torch.cuda.Stream()
    rows = []
    with torch.cuda.stream(stream), cp.cuda.ExternalStream(stream.cuda_stream):
        reference = peaks(torch, bench)
        print(f"{device}: GPT-2 124M shapes B={B} T={T} C={C} NH={NH} Vp={VP}, median of {args.n}\n"
              f"reference peaks: copy {reference['copy_GBps']} GB/s (read + write), "
              f"bf16 matmul {reference['bf16_matmul_TFLOPs']} TFLOP/s (8192^3)\n"
              f"{'kernel':30s} {'ours ms':>9s} {'eager ms':>9s} {'eager/ours':>10s} {'ours':>9s} {'eager':>9s} "
              f"{'rate':8s} {'peak':>5s}")
        for name, what, ours, theirs, unit, amount, formula in cases(torch, cp, K, B, T):
            ours_ms, torch_ms = bench.ms(ours), bench.ms(theirs)
            scale = 1e6 if unit == "GB/s" else 1e9  # amount per ms -> GB/s or TFLOP/s
            peak = reference["copy_GBps"] if unit == "GB/s" else reference["bf16_matmul_TFLOPs"]
            entry = {"kernel": name, "what": what, "unit": unit, "formula": formula,
                     "ours_ms": round(ours_ms, 4), "torch_eager_ms": round(torch_ms, 4),
                     "ratio_torch_eager_over_ours": round(torch_ms / ours_ms, 3),
                     "ours_rate": round(amount / ours_ms / scale, 1),
                     "torch_eager_rate": round(amount / torch_ms / scale, 1),
                     "ours_fraction_of_peak": round(amount / ours_ms / scale / peak, 3)}
            rows.append(entry)
            print(row_text(entry), flush=True)

    record = {
        "device": f"{device}, torch {torch.__version__}, cupy {cp.__version__}",
        "commit": records.commit(),
        "command": "python dev/bench/kernels.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "what": f"each CUDA kernel vs its PyTorch eager counterpart (eager compositions, not torch.compile), GPT-2 "
                f"124M shapes B={B} T={T} C={C} NH={NH} Vp={VP}, median of {args.n} CUDA-event timings after {args.w} "
                "warm-up, L2 flushed before each; ratio = torch eager ms / ours ms (> 1: ours is faster); rates from "
                "the formula of each kernel, peak = ours as a fraction of the reference peak",
        "peaks": reference,
        "kernels": rows,
    }
    records.write(args.o, f"kernels_{records.tag(device)}.json", record)


if __name__ == "__main__":
    run(main)

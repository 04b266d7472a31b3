"""prepro/tinystories.py on a small archive shaped as TinyStories_all_data.tar.gz: val is the first json
file, train the rest, each file's stories shuffled as llm.c shuffles them, each story stripped with EOT
before it; a bad archive is one line with nothing written."""
import functools
import io
import json
import random
import tarfile

import numpy as np
import pytest

from prepro.gpt2_tokenizer import EOT, gpt2_encoding
from prepro.tinystories import main


@functools.cache
def encoding():
    return gpt2_encoding()


def stories(file_index, n):
    return [{"story": f"\n  Once upon a time, story {file_index}.{i}: Lily saw {i * 31} ducks. "
                      f"She said, \"Wow!\"\n\nThe end.  ", "instruction": {"words": ["duck"]}, "source": "GPT-4"}
            for i in range(n)]


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Three json files of stories, stored out of name order, and a non-json member to leave alone."""
    path = tmp_path_factory.mktemp("tinystories") / "TinyStories_all_data.tar.gz"
    files = {f"data{k:02d}.json": stories(k, 40 + 7 * k) for k in range(3)}
    with tarfile.open(path, "w:gz") as tar:
        for name in ["data02.json", "data00.json", "data01.json"]:
            add(tar, name, json.dumps(files[name]).encode())
        add(tar, "README.txt", b"not a shard")
    return path, files


def expected_tokens(file_stories, place):
    """llm.c's process_shard: random.Random(1337 + place in the split) shuffles the file's stories; each,
    stripped, is EOT and its tokens."""
    shuffled = list(file_stories)
    random.Random(1337 + place).shuffle(shuffled)
    return [t for s in shuffled for t in [EOT] + encoding().encode_ordinary(s["story"].strip())], shuffled


def read_raw_shard(path):
    data = path.read_bytes()
    header = np.frombuffer(data[:1024], "<i4")
    assert header[0] == 20240520 and header[1] == 1 and not header[3:].any()
    assert len(data) == 1024 + 2 * header[2]
    return np.frombuffer(data[1024:], "<u2")


def test_val_is_the_first_file_and_train_the_rest_shuffled_as_llm_c_does(archive, tmp_path):
    path, files = archive
    main(["-o", str(tmp_path), "--source", str(path)])
    folder = tmp_path / "tinystories"
    assert sorted(p.name for p in folder.iterdir()) == ["TinyStories_train.bin", "TinyStories_val.bin"]
    val, val_order = expected_tokens(files["data00.json"], 0)
    train1, order1 = expected_tokens(files["data01.json"], 0)
    train2, order2 = expected_tokens(files["data02.json"], 1)
    assert read_raw_shard(folder / "TinyStories_val.bin").tolist() == val
    train = read_raw_shard(folder / "TinyStories_train.bin")
    assert train.tolist() == train1 + train2
    assert np.count_nonzero(train == EOT) == len(files["data01.json"]) + len(files["data02.json"])
    pieces = np.split(train, np.flatnonzero(train == EOT))[1:]
    assert [encoding().decode(p[1:].tolist()) for p in pieces] == [s["story"].strip() for s in order1 + order2]


def test_the_download_is_used_when_there_is_no_source(archive, tmp_path):
    path, files = archive
    main(["-o", str(tmp_path), "--url", path.as_uri()])
    assert (tmp_path / "tinystories" / "TinyStories_all_data.tar.gz").read_bytes() == path.read_bytes()
    val, _ = expected_tokens(files["data00.json"], 0)
    assert read_raw_shard(tmp_path / "tinystories" / "TinyStories_val.bin").tolist() == val


def bad_json_member(tmp_path):
    path = tmp_path / "bad.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        add(tar, "data00.json", json.dumps(stories(0, 3)).encode())
        add(tar, "data01.json", json.dumps(stories(1, 3)).encode())
        add(tar, "data02.json", b'[{"story": "cut')
    return path, "data02.json: not JSON"


def no_story(tmp_path):
    path = tmp_path / "bad.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        add(tar, "data00.json", json.dumps(stories(0, 3)).encode())
        add(tar, "data01.json", json.dumps([{"text": "no story key"}]).encode())
    return path, "data01.json: expected a JSON list of objects with a `story`"


def one_file(tmp_path):
    path = tmp_path / "bad.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        add(tar, "data00.json", json.dumps(stories(0, 3)).encode())
    return path, "holds 1 .json file(s)"


def not_a_tar(tmp_path):
    path = tmp_path / "bad.tar.gz"
    path.write_bytes(b"\x1f\x8b not really gzip")
    return path, "not a readable tar.gz archive"


@pytest.mark.parametrize("make", [bad_json_member, no_story, one_file, not_a_tar])
def test_a_bad_archive_is_one_line_and_exit_1_with_nothing_written(tmp_path, capsys, make):
    path, problem = make(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["-o", str(tmp_path / "data"), "--source", str(path)])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and problem in err[0], err
    assert not (tmp_path / "data").exists()  # not even an empty folder


def test_an_unreachable_download_is_one_line_and_leaves_no_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["-o", str(tmp_path / "data"), "--url", (tmp_path / "missing.tar.gz").as_uri()])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not download") and "--source" in err[0], err
    assert not (tmp_path / "data").exists()

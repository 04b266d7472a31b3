"""GPT-2's tokenizer, built offline, and its export to llm.c's gpt2_tokenizer.bin."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fileformats import read_tokenizer
from prepro.gpt2_tokenizer import bpe_files, export_tokenizer, gpt2_encoding


@pytest.fixture(scope="module")
def encoding():
    return gpt2_encoding()


@pytest.fixture(scope="module")
def exported(encoding, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "gpt2_tokenizer.bin"
    export_tokenizer(path, encoding)
    return read_tokenizer(path)


def gpt2_byte_decoder():
    """GPT-2's encoder.json spells each byte as a printable character: bytes that are printable
    Latin-1 stand for themselves, the other 68 take the code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}
    return table


def test_encoding_gives_gpt2s_published_ids(encoding):
    assert encoding.n_vocab == 50257 and encoding.eot_token == 50256
    assert encoding.encode("Hello world") == [15496, 995]
    assert encoding.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_exported_file_holds_every_token_as_encoder_json_defines_it(exported):
    tokens, eot = exported
    assert len(tokens) == 50257 and eot == 50256
    decoder = gpt2_byte_decoder()
    encoder = json.loads(bpe_files()[1].read_text(encoding="utf-8"))
    assert len(encoder) == 50257
    for text, token_id in encoder.items():
        expected = b"<|endoftext|>" if token_id == eot else bytes(decoder[ch] for ch in text)
        assert tokens[token_id] == expected, token_id


def test_text_decoded_through_the_file_is_the_original(encoding, exported):
    tokens, _ = exported
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\tÜber naïve café — 東京 🚀"
    ids = encoding.encode(text)
    assert b"".join(tokens[i] for i in ids) == text.encode("utf-8")


def test_cli_writes_the_tokenizer_file(tmp_path):
    out = tmp_path / "sub" / "gpt2_tokenizer.bin"
    result = subprocess.run([sys.executable, "-m", "prepro.gpt2_tokenizer", "-o", str(out)],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    tokens, eot = read_tokenizer(out)
    assert len(tokens) == 50257 and tokens[eot] == b"<|endoftext|>"

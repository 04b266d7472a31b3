"""fileformats, specified: every llm.c file round-trips exactly and byte for byte, its header is the
one llm.c writes (checked from the raw bytes), and every kind of damage is a one-line FormatError
that names the file."""
import os
import pickle
import re
import struct
from dataclasses import replace
from pathlib import Path
from typing import Callable, NamedTuple

import ml_dtypes
import numpy as np
import pytest
import torch

import fileformats as ff
from fileformats import FormatError, GPT2Config

TINY = GPT2Config(max_seq_len=8, vocab_size=100, num_layers=2, num_heads=2, channels=8, padded_vocab_size=128)
GPT2_124M = GPT2Config(max_seq_len=1024, vocab_size=50257, num_layers=12, num_heads=12, channels=768,
                       padded_vocab_size=50304)
SHARD_SIZE = 37  # optimizer state values per rank in the samples below


def header_of(path, dtype="<i4"):
    """The 256 header slots, read straight from the file without fileformats."""
    return np.fromfile(path, dtype=dtype, count=256)


def patch_slot(path, slot, value, fmt="<i"):
    data = bytearray(Path(path).read_bytes())
    struct.pack_into(fmt, data, 4 * slot, value)
    Path(path).write_bytes(data)


def assert_format_error(path, read, pattern):
    with pytest.raises(FormatError) as info:
        read(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message, message
    assert re.search(pattern, message), message
    assert info.value.path == path


# ----------------------------------------------------------------------------
# samples, one per format

def shard_tokens():
    return np.array([50256, 0, 1, 65535, 42, 50256, 7, 300], dtype=np.int64)


def model_params():
    return np.random.default_rng(0).standard_normal(ff.num_parameters(TINY)).astype(np.float32)


def optimizer_state(use_master_weights=True, shuffle=False, windows=(5, 3)):
    rng = np.random.default_rng(1)
    m, v, master = (rng.standard_normal(SHARD_SIZE).astype(np.float32) for _ in range(3))
    # the u64 fields get values whose high halves are non-zero, and one with the top bit set
    return ff.OptimizerState(
        num_processes=4, rank=3, use_master_weights=use_master_weights, shuffle=shuffle, step=123456,
        rng_state=2**64 - 3, rng_state_last_update=2**40 + 17, shard_index=2**33 + 5, sample_index=2**32 + 1,
        m=m, v=v, master=master if use_master_weights else None,
        epoch=2**35 + 9, epoch_samples=2**33 + 7, micro_batch=16, seq_len=1024, tokens_per_step=2**20, layout_processes=8,
        layout_micro_batch=32, data_shards=1000, data_tokens=10**11, data_hash=-2**63 + 5,
        loss_window=rng.standard_normal(windows[0]), norm_window=rng.standard_normal(windows[1]))


def debug_state(B=2, T=3):
    rng = np.random.default_rng(2)
    return ff.DebugState(
        x=rng.integers(0, TINY.vocab_size, (B, T)).astype(np.int32),
        y=rng.integers(0, TINY.vocab_size, (B, T)).astype(np.int32),
        logits=rng.standard_normal((B, T, TINY.vocab_size)).astype(np.float32),
        loss=float(np.float32(4.6137)),  # a value fp32 holds exactly, as the file does
        grads=rng.standard_normal(ff.num_parameters(TINY)).astype(np.float32))


def tokenizer_tokens():
    # every single byte, multi-byte tokens, and the longest allowed; EOT last, as in GPT-2
    return [bytes([i]) for i in range(256)] + [b" the", "é".encode(), b"\xff" * 255, b"<|endoftext|>"]


def hellaswag_examples():
    return [ff.HellaSwagExample(index=0, label=2, context=[50256, 11, 12], endings=[[1], [2, 3], [4, 5, 6], [7]]),
            ff.HellaSwagExample(index=1, label=0, context=[9] * 40, endings=[[65535], [0], [8, 8], [3] * 10]),
            ff.HellaSwagExample(index=2, label=3, context=[], endings=[[], [5], [], [6]])]


class Format(NamedTuple):
    write: Callable       # path -> writes the sample
    read: Callable        # path -> what the module reads
    rewrite: Callable     # (what was read, path) -> writes it again
    truncated: str        # pattern of the error for a file cut short
    extra: str            # pattern of the error for bytes appended


SIZE = r"file is \d+ bytes, expected 1024 \+ .* = \d+"
FORMATS = {
    "shard": Format(lambda p: ff.write_shard(p, shard_tokens()), ff.read_shard, lambda t, p: ff.write_shard(p, t),
                    SIZE, SIZE),
    "model_fp32": Format(lambda p: ff.write_model(p, TINY, model_params(), 3), ff.read_model,
                         lambda cp, p: ff.write_model(p, *cp, 3), SIZE, SIZE),
    "model_bf16": Format(lambda p: ff.write_model(p, TINY, model_params(), 5), ff.read_model,
                         lambda cp, p: ff.write_model(p, *cp, 5), SIZE, SIZE),
    "state": Format(lambda p: ff.write_state(p, optimizer_state()), lambda p: ff.read_state(p, SHARD_SIZE),
                    lambda s, p: ff.write_state(p, s), SIZE, SIZE),
    "debug": Format(lambda p: ff.write_debug_state(p, debug_state()),
                    lambda p: ff.read_debug_state(p, TINY.vocab_size, ff.num_parameters(TINY)),
                    lambda d, p: ff.write_debug_state(p, d), SIZE, SIZE),
    "tokenizer": Format(lambda p: ff.write_tokenizer(p, tokenizer_tokens(), 259), ff.read_tokenizer,
                        lambda te, p: ff.write_tokenizer(p, *te), "truncated in token", "trailing bytes"),
    "hellaswag": Format(lambda p: ff.write_hellaswag(p, hellaswag_examples()), ff.read_hellaswag,
                        lambda e, p: ff.write_hellaswag(p, e), "truncated in example|not a whole number of uint16",
                        "trailing bytes|not a whole number of uint16"),
}
ROUND_TRIPS = {**FORMATS, "state_no_windows": Format(
    lambda p: ff.write_state(p, optimizer_state(shuffle=True, windows=(0, 0))),
    lambda p: ff.read_state(p, SHARD_SIZE), lambda s, p: ff.write_state(p, s), SIZE, SIZE)}


@pytest.fixture(params=list(FORMATS))
def fmt(request):
    return FORMATS[request.param]


# ----------------------------------------------------------------------------
# properties every format shares

@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_writing_what_was_read_gives_a_byte_identical_file(tmp_path, name):
    fmt = ROUND_TRIPS[name]
    first, second = tmp_path / "first.bin", tmp_path / "second.bin"
    fmt.write(first)
    fmt.rewrite(fmt.read(first), second)
    assert first.read_bytes() == second.read_bytes()


def test_wrong_magic_is_a_format_error(tmp_path, fmt):
    path = tmp_path / "f.bin"
    fmt.write(path)
    magic = int(header_of(path)[0])
    patch_slot(path, 0, 1234)
    assert_format_error(path, fmt.read, rf"bad magic 1234 \(expected {magic}, an? .+\)")


def test_wrong_version_is_a_format_error(tmp_path, fmt):
    path = tmp_path / "f.bin"
    fmt.write(path)
    patch_slot(path, 1, 4)
    assert_format_error(path, fmt.read, r"unsupported version 4 \(expected \d")


@pytest.mark.parametrize("cut", [1, 2, 4])
def test_truncated_file_is_a_format_error(tmp_path, fmt, cut):
    path = tmp_path / "f.bin"
    fmt.write(path)
    path.write_bytes(path.read_bytes()[:-cut])
    assert_format_error(path, fmt.read, fmt.truncated)


@pytest.mark.parametrize("extra", [1, 2, 4])
def test_bytes_appended_are_a_format_error(tmp_path, fmt, extra):
    path = tmp_path / "f.bin"
    fmt.write(path)
    path.write_bytes(path.read_bytes() + b"\x01" * extra)
    assert_format_error(path, fmt.read, fmt.extra)


@pytest.mark.parametrize("keep", [0, 8, 1023])
def test_file_shorter_than_a_header_is_a_format_error(tmp_path, fmt, keep):
    path = tmp_path / "f.bin"
    fmt.write(path)
    path.write_bytes(path.read_bytes()[:keep])
    assert_format_error(path, fmt.read, rf"file is {keep} bytes, shorter than the 1024-byte header")


def test_missing_file_is_a_format_error(tmp_path, fmt):
    assert_format_error(tmp_path / "nothing.bin", fmt.read, "no such file")


@pytest.mark.parametrize("name, slot, value, pattern", [
    ("shard", 2, -1, "token count -1 is negative"),
    ("model_fp32", 7, 64, "padded_vocab_size 64 smaller than vocab_size 100"),
    ("model_fp32", 6, 9, "channels 9 not divisible by num_heads 2"),
    ("model_bf16", 4, -2, "every size must be positive"),
    ("state", 3, 4, "rank=4"),
    ("state", 2, 0, "num_processes=0"),
    ("state", 4, 2, "use_master_weights=2"),
    ("state", 10, -1, "step=-1"),
    ("debug", 3, 0, "T=0"),
    ("tokenizer", 3, 260, "EOT token 260 outside the vocab of 260"),
    ("tokenizer", 2, 261, "truncated in token 260"),
    ("hellaswag", 2, 4, "truncated in example 3"),
    ("hellaswag", 2, 2, "trailing bytes after the 2 examples"),
    ("hellaswag", 3, 10, "header says the longest example is 10 bytes"),
    ("hellaswag", 2, -1, "bad header"),
])
def test_nonsense_header_values_are_format_errors(tmp_path, name, slot, value, pattern):
    path = tmp_path / "f.bin"
    FORMATS[name].write(path)
    patch_slot(path, slot, value)
    assert_format_error(path, FORMATS[name].read, pattern)


@pytest.mark.parametrize("write", [
    pytest.param(lambda p: ff.write_shard(p, [1, -1]), id="shard-negative-token"),
    pytest.param(lambda p: ff.write_shard(p, [1, 65536]), id="shard-token-over-uint16"),
    pytest.param(lambda p: ff.write_shard(p, [[1, 2]]), id="shard-2d"),
    pytest.param(lambda p: ff.write_shard(p, [1.5]), id="shard-float"),
    pytest.param(lambda p: ff.write_model(p, TINY, model_params(), 4), id="model-version-4"),
    pytest.param(lambda p: ff.write_model(p, TINY, model_params()[:-1], 3), id="model-short-params"),
    pytest.param(lambda p: ff.write_model(p, GPT2Config(8, 100, 2, 3, 8, 128), np.zeros(1), 3), id="model-C%NH"),
    pytest.param(lambda p: ff.write_state(p, replace(optimizer_state(), use_master_weights=False)),
                 id="state-master-but-flag-off"),
    pytest.param(lambda p: ff.write_state(p, replace(optimizer_state(), m=np.zeros(SHARD_SIZE + 1))),
                 id="state-m-longer-than-v"),
    pytest.param(lambda p: ff.write_debug_state(p, replace(debug_state(), y=np.zeros((2, 4)))), id="debug-y-shape"),
    pytest.param(lambda p: ff.write_tokenizer(p, [b"a", b""], 0), id="tokenizer-empty-token"),
    pytest.param(lambda p: ff.write_tokenizer(p, [b"a", b"x" * 256], 0), id="tokenizer-256-byte-token"),
    pytest.param(lambda p: ff.write_tokenizer(p, [b"a", b"b"], 2), id="tokenizer-eot-outside"),
    pytest.param(lambda p: ff.write_hellaswag(p, [ff.HellaSwagExample(0, 1, [1], [[1], [2], [3]])]),
                 id="hellaswag-3-endings"),
    pytest.param(lambda p: ff.write_hellaswag(p, [ff.HellaSwagExample(0, 4, [1], [[1], [2], [3], [4]])]),
                 id="hellaswag-label-4"),
    pytest.param(lambda p: ff.write_hellaswag(p, [ff.HellaSwagExample(0, 1, [70000], [[1], [2], [3], [4]])]),
                 id="hellaswag-token-over-uint16"),
])
def test_writers_reject_bad_input_and_write_nothing(tmp_path, write):
    with pytest.raises(ValueError):
        write(tmp_path / "f.bin")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------
# atomic_write

def test_atomic_write_publishes_the_file_only_when_the_block_completes(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")
    with ff.atomic_write(path) as f:
        f.write(b"new")
        f.flush()
        assert path.read_bytes() == b"old"  # the bytes go to a temporary name until the end
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["x.bin"]


def test_atomic_write_failure_leaves_no_file_and_no_temp_file(tmp_path):
    with pytest.raises(RuntimeError, match="disk on fire"):
        with ff.atomic_write(tmp_path / "x.bin") as f:
            f.write(b"partial")
            raise RuntimeError("disk on fire")
    assert os.listdir(tmp_path) == []


def test_atomic_write_failure_leaves_an_existing_file_untouched(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with ff.atomic_write(path) as f:
            f.write(b"partial")
            raise KeyboardInterrupt
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.bin"]


def test_atomic_write_syncs_the_data_to_disk_before_renaming_it_into_place(tmp_path, monkeypatch):
    calls = []
    fsync, replace_ = os.fsync, os.replace

    def recording_fsync(fd):
        calls.append("fsync")
        fsync(fd)

    def recording_replace(src, dst):
        calls.append("replace")
        replace_(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    with ff.atomic_write(tmp_path / "x.bin") as f:
        f.write(b"data")
    assert calls == ["fsync", "replace"]


def test_format_error_is_one_line_naming_path_and_problem_and_survives_pickling():
    error = FormatError("data/x.bin", "bad magic 1 (expected 2)")
    assert str(error) == "data/x.bin: bad magic 1 (expected 2)"
    assert (error.path, error.problem) == ("data/x.bin", "bad magic 1 (expected 2)")
    assert str(pickle.loads(pickle.dumps(error))) == str(error)  # errors cross process boundaries in data loaders


# ----------------------------------------------------------------------------
# data shard

def test_shard_round_trips_and_has_llmc_header(tmp_path):
    path = tmp_path / "shard.bin"
    ff.write_shard(path, shard_tokens())
    header = header_of(path)
    assert header[:3].tolist() == [20240520, 1, 8] and not header[3:].any()
    assert path.stat().st_size == 1024 + 2 * 8
    assert np.array_equal(np.fromfile(path, dtype="<u2", offset=1024), shard_tokens())
    assert np.array_equal(ff.read_shard(path), shard_tokens())


def test_read_shard_returns_a_read_only_uint16_memmap(tmp_path):
    path = tmp_path / "shard.bin"
    ff.write_shard(path, shard_tokens())
    tokens = ff.read_shard(path)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    with pytest.raises(ValueError):
        tokens[0] = 1


def test_empty_shard_round_trips(tmp_path):
    path = tmp_path / "shard.bin"
    ff.write_shard(path, [])
    assert path.stat().st_size == 1024
    assert len(ff.read_shard(path)) == 0


# ----------------------------------------------------------------------------
# model checkpoint

def test_gpt2_124m_has_llmc_published_parameter_count():
    assert ff.num_parameters(GPT2_124M) == 124_475_904


def test_param_shapes_are_in_file_order_with_linear_layout():
    config = GPT2Config(max_seq_len=5, vocab_size=7, num_layers=3, num_heads=2, channels=4, padded_vocab_size=128)
    assert ff.param_shapes(config) == {
        "wte": (128, 4), "wpe": (5, 4), "ln1w": (3, 4), "ln1b": (3, 4), "qkvw": (3, 12, 4), "qkvb": (3, 12),
        "attprojw": (3, 4, 4), "attprojb": (3, 4), "ln2w": (3, 4), "ln2b": (3, 4), "fcw": (3, 16, 4),
        "fcb": (3, 16), "fcprojw": (3, 4, 16), "fcprojb": (3, 4), "lnfw": (4,), "lnfb": (4,)}
    assert tuple(ff.param_shapes(config)) == ff.PARAM_NAMES
    assert ff.num_parameters(config) == 512 + 20 + 4 * 12 + 3 * 48 + 36 + 3 * 16 + 12 + 3 * 64 + 48 + 3 * 64 + 12 + 8


@pytest.mark.parametrize("version, itemsize", [(3, 4), (5, 2)])
def test_model_header_holds_version_and_config(tmp_path, version, itemsize):
    path = tmp_path / "model.bin"
    ff.write_model(path, TINY, model_params(), version)
    header = header_of(path)
    assert header[:8].tolist() == [20240326, version, 8, 100, 2, 2, 8, 128] and not header[8:].any()
    assert path.stat().st_size == 1024 + itemsize * ff.num_parameters(TINY)


def test_fp32_model_round_trips_exactly(tmp_path):
    path = tmp_path / "model.bin"
    ff.write_model(path, TINY, model_params().astype(np.float64), 3)
    assert np.array_equal(np.fromfile(path, dtype="<f4", offset=1024), model_params())
    config, params = ff.read_model(path)
    assert config == TINY
    assert params.dtype == np.float32 and np.array_equal(params, model_params())


def test_bf16_model_reads_back_the_stored_bf16_values(tmp_path):
    path = tmp_path / "model.bin"
    ff.write_model(path, TINY, model_params(), 5)
    config, params = ff.read_model(path)
    assert config == TINY and params.dtype == ml_dtypes.bfloat16
    assert np.array_equal(params.view(np.uint16), np.fromfile(path, dtype="<u2", offset=1024))
    assert np.allclose(params.astype(np.float32), model_params(), rtol=2**-8, atol=0)


def test_bf16_model_stores_round_to_nearest_even_bits_like_torch(tmp_path):
    rng = np.random.default_rng(3)
    n = ff.num_parameters(TINY)
    # exact ties: low 16 bits 0x8000; an even upper half stays, an odd one rounds up (both signs, subnormals too)
    upper = rng.integers(0, 0x7F7F, 200, dtype=np.uint32) | (rng.integers(0, 2, 200, dtype=np.uint32) << 15)
    upper[0::2] &= ~np.uint32(1)
    upper[1::2] |= 1
    upper[:2] = [0x0000, 0x0001]
    ties = ((upper << 16) | 0x8000).view(np.float32)
    near_max = np.array([0x7F7F0000, 0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0x7F7E8000, 0x7F7E8001,
                         0xFF7F7FFF, 0xFF7F8000], dtype=np.uint32).view(np.float32)
    values = (rng.standard_normal(n) * 10.0 ** rng.integers(-35, 35, n)).astype(np.float32)
    values[:200], values[200:208] = ties, near_max
    path = tmp_path / "model.bin"
    ff.write_model(path, TINY, values, 5)
    stored = np.fromfile(path, dtype="<u2", offset=1024)
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(stored, expected)
    assert np.array_equal(stored[0:200:2], upper[0::2]) and np.array_equal(stored[1:200:2], upper[1::2] + 1)


# ----------------------------------------------------------------------------
# optimizer state

@pytest.mark.parametrize("use_master_weights", [True, False])
@pytest.mark.parametrize("shuffle, windows", [(False, (0, 0)), (True, (128, 128)), (True, (7, 0))])
def test_optimizer_state_round_trips(tmp_path, use_master_weights, shuffle, windows):
    path = tmp_path / "state.bin"
    state = optimizer_state(use_master_weights, shuffle, windows)
    ff.write_state(path, state)
    read = ff.read_state(path, SHARD_SIZE)
    for field in ("num_processes", "rank", "use_master_weights", "shuffle", "step", "rng_state",
                  "rng_state_last_update", "shard_index", "sample_index", *ff.TRAILER_FIELDS):
        assert getattr(read, field) == getattr(state, field), field
    assert np.array_equal(read.m, state.m) and np.array_equal(read.v, state.v)
    assert read.m.dtype == read.v.dtype == np.float32
    assert np.array_equal(read.loss_window, state.loss_window) and np.array_equal(read.norm_window, state.norm_window)
    assert read.loss_window.dtype == read.norm_window.dtype == np.float64
    if use_master_weights:
        assert read.master.dtype == np.float32 and np.array_equal(read.master, state.master)
    else:
        assert read.master is None


@pytest.mark.parametrize("use_master_weights", [True, False])
def test_optimizer_state_header_and_layout_match_llmc(tmp_path, use_master_weights):
    path = tmp_path / "state.bin"
    state = optimizer_state(use_master_weights, shuffle=True)
    ff.write_state(path, state)
    raw = path.read_bytes()
    header = header_of(path)
    assert header[:6].tolist() == [20240527, 1, 4, 3, int(use_master_weights), 1] and header[10] == 123456
    u64 = {slot: struct.unpack_from("<Q", raw, 4 * slot)[0] for slot in (20, 22, 30, 32)}
    assert u64 == {20: 2**64 - 3, 22: 2**40 + 17, 30: 2**33 + 5, 32: 2**32 + 1}
    used = [0, 1, 2, 3, 4, 5, 10, 20, 21, 22, 23, 30, 31, 32, 33]
    assert not np.delete(header, used).any()
    arrays = np.frombuffer(raw, dtype="<f4", offset=1024, count=SHARD_SIZE * (3 if use_master_weights else 2))
    expected = [state.m, state.v] + ([state.master] if use_master_weights else [])
    assert np.array_equal(arrays, np.concatenate(expected))
    # our trailer: 16 int64 (magic, the data position and what it means, the window lengths, zeros), then
    # the two windows as 128 float64 each, zero-padded
    trailer = raw[1024 + 4 * arrays.size:]
    assert len(trailer) == 16 * 8 + 2 * 128 * 8
    assert struct.unpack_from("<16q", trailer) == (20261202, 2**35 + 9, 2**33 + 7, 16, 1024, 2**20, 8, 32, 1000,
                                                   10**11, -2**63 + 5, 5, 3, 0, 0, 0)
    windows = np.frombuffer(trailer, "<f8", offset=128).reshape(2, 128)
    assert np.array_equal(windows[0, :5], state.loss_window) and np.array_equal(windows[1, :3], state.norm_window)
    assert not windows[0, 5:].any() and not windows[1, 3:].any()


def test_state_without_our_trailer_is_a_format_error(tmp_path):
    path = tmp_path / "state.bin"
    ff.write_state(path, optimizer_state())
    raw = path.read_bytes()
    path.write_bytes(raw[:1024 + 3 * 4 * SHARD_SIZE] + b"\x00" * (128 + 2048))  # arrays, then someone else's bytes
    assert_format_error(path, lambda p: ff.read_state(p, SHARD_SIZE), r"trailer magic 0, expected 20261202")


@pytest.mark.parametrize("slot, value", [(1, -1), (2, -1), (3, 0), (6, 0), (8, 0), (11, 129), (12, -2)])
def test_state_trailer_with_impossible_values_is_a_format_error(tmp_path, slot, value):
    path = tmp_path / "state.bin"
    ff.write_state(path, optimizer_state())
    data = bytearray(path.read_bytes())
    struct.pack_into("<q", data, 1024 + 3 * 4 * SHARD_SIZE + 8 * slot, value)
    path.write_bytes(data)
    assert_format_error(path, lambda p: ff.read_state(p, SHARD_SIZE), "bad trailer")


def test_state_windows_longer_than_the_trailer_holds_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at most 128"):
        ff.write_state(tmp_path / "state.bin", optimizer_state(windows=(129, 0)))


def test_state_read_with_the_wrong_shard_size_is_a_format_error(tmp_path):
    path = tmp_path / "state.bin"
    ff.write_state(path, optimizer_state())
    assert_format_error(path, lambda p: ff.read_state(p, SHARD_SIZE + 1), SIZE)


# ----------------------------------------------------------------------------
# debug state

def test_debug_state_round_trips(tmp_path):
    path = tmp_path / "debug.bin"
    state = debug_state()
    ff.write_debug_state(path, state)
    read = ff.read_debug_state(path, TINY.vocab_size, ff.num_parameters(TINY))
    assert read.x.shape == read.y.shape == (2, 3) and read.logits.shape == (2, 3, TINY.vocab_size)
    for field in ("x", "y", "logits", "grads"):
        assert np.array_equal(getattr(read, field), getattr(state, field)), field
    assert read.loss == state.loss


def test_debug_state_header_and_layout_match_the_pytorch_reference(tmp_path):
    path = tmp_path / "debug.bin"
    state = debug_state()
    ff.write_debug_state(path, state)
    header = header_of(path)
    assert header[:4].tolist() == [20240327, 2, 2, 3] and not header[4:].any()
    ints = np.fromfile(path, dtype="<i4", offset=1024, count=12)
    floats = np.fromfile(path, dtype="<f4", offset=1024 + 4 * 12)
    logits_size = 6 * TINY.vocab_size
    assert np.array_equal(ints, np.concatenate([state.x.ravel(), state.y.ravel()]))
    assert np.array_equal(floats[:logits_size], state.logits.ravel())
    assert floats[logits_size] == np.float32(state.loss)
    assert np.array_equal(floats[logits_size + 1:], state.grads)


# ----------------------------------------------------------------------------
# tokenizer

def test_tokenizer_round_trips_and_has_llmc_layout(tmp_path):
    path = tmp_path / "gpt2_tokenizer.bin"
    ff.write_tokenizer(path, tokenizer_tokens(), 259)
    header = header_of(path, dtype="<u4")
    assert header[:4].tolist() == [20240328, 2, 260, 259] and not header[4:].any()
    assert path.read_bytes()[1024:] == b"".join(bytes([len(t)]) + t for t in tokenizer_tokens())
    assert ff.read_tokenizer(path) == (tokenizer_tokens(), 259)


def test_tokenizer_with_a_zero_length_token_is_a_format_error(tmp_path):
    path = tmp_path / "gpt2_tokenizer.bin"
    ff.write_tokenizer(path, tokenizer_tokens(), 259)
    data = bytearray(path.read_bytes())
    data[1024 + 2 * 5] = 0  # the length byte of token 5 (tokens 0..255 are 2 bytes each)
    path.write_bytes(data)
    assert_format_error(path, ff.read_tokenizer, r"token 5 has length 0")


# ----------------------------------------------------------------------------
# HellaSwag

def test_hellaswag_round_trips_and_has_llmc_layout(tmp_path):
    path = tmp_path / "hellaswag_val.bin"
    ff.write_hellaswag(path, hellaswag_examples())
    # the first record spelled out from the spec: 6 fields, 3 context tokens, 4 x (length + tokens)
    first = [65535, 40, 0, 2, 4, 3, 50256, 11, 12, 1, 1, 2, 2, 3, 3, 4, 5, 6, 1, 7]
    stream = np.fromfile(path, dtype="<u2", offset=1024)
    assert stream[:20].tolist() == first
    record_bytes = [2 * (6 + len(e.context) + sum(1 + len(x) for x in e.endings)) for e in hellaswag_examples()]
    assert len(stream) * 2 == sum(record_bytes)
    header = header_of(path)
    assert header[:4].tolist() == [20240522, 1, 3, max(record_bytes)] and not header[4:].any()
    assert ff.read_hellaswag(path) == hellaswag_examples()


@pytest.mark.parametrize("field, value, pattern", [
    (0, 1234, "example 0 starts with 1234, expected the delimiter 65535"),
    (1, 42, "example 0: context and endings do not fill its 42-byte record"),
    (1, 41, "example 0: record length 41 is not an even number"),
    (3, 4, "example 0: label 4"),
    (4, 3, "example 0: .*3 endings"),
    (5, 4, "example 0: context and endings do not fill"),
])
def test_hellaswag_record_with_broken_structure_is_a_format_error(tmp_path, field, value, pattern):
    path = tmp_path / "hellaswag_val.bin"
    ff.write_hellaswag(path, hellaswag_examples())
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, 1024 + 2 * field, value)
    path.write_bytes(data)
    assert_format_error(path, ff.read_hellaswag, pattern)

"""Every file reader meets random and mutated bytes: whatever a file holds, a reader gives a result
or its one-line FormatError, never another exception, a hang (hypothesis's deadline), or an
allocation sized from a corrupt header rather than from the file (tracemalloc's peak, against the
file's size). The mutations start from a valid file of each kind: bytes overwritten, int32 fields
set to edge values (in the header, or anywhere), the file cut short or lengthened."""
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import fileformats as ff
from dataloader import DataLoader

CONFIG = ff.GPT2Config(max_seq_len=8, vocab_size=10, num_layers=1, num_heads=2, channels=8, padded_vocab_size=16)
NUM_PARAMS = ff.num_parameters(CONFIG)
STATE_SIZE = 50
EDGES = [0, 1, -1, 2, 3, 4, 5, 127, 128, 255, 256, 1023, 1024, 65535, 65536, 2**31 - 1, -2**31, 20240520,
         20240326, 20240327, 20240328, 20240522, 20240527, 20261202]


def optimizer_state(master):
    rng = np.random.default_rng(0)
    m, v, w = (rng.standard_normal(STATE_SIZE).astype(np.float32) for _ in range(3))
    return ff.OptimizerState(
        num_processes=2, rank=1, use_master_weights=master, shuffle=True, step=7, rng_state=5,
        rng_state_last_update=3, shard_index=1, sample_index=4, m=m, v=v, master=w if master else None,
        **dict.fromkeys(ff.TRAILER_FIELDS, 1), loss_window=rng.standard_normal(3), norm_window=rng.standard_normal(2))


def hellaswag_examples():
    return [ff.HellaSwagExample(index=i, label=i % 4, context=[50256, i, 7], endings=[[1], [2, 3], [4], [5, 6, i]])
            for i in range(3)]


WRITERS = {
    "shard": lambda p: ff.write_shard(p, np.arange(200) % 50257),
    "model v3": lambda p: ff.write_model(p, CONFIG, np.linspace(-1, 1, NUM_PARAMS, dtype=np.float32), 3),
    "model v5": lambda p: ff.write_model(p, CONFIG, np.linspace(-1, 1, NUM_PARAMS, dtype=np.float32), 5),
    "state": lambda p: ff.write_state(p, optimizer_state(master=False)),
    "state with master weights": lambda p: ff.write_state(p, optimizer_state(master=True)),
    "debug state": lambda p: ff.write_debug_state(p, ff.DebugState(
        x=np.zeros((1, 2), np.int32), y=np.ones((1, 2), np.int32), logits=np.zeros((1, 2, 10), np.float32),
        loss=2.5, grads=np.zeros(NUM_PARAMS, np.float32))),
    "tokenizer": lambda p: ff.write_tokenizer(p, [bytes([i]) for i in range(20)] + [b"<|endoftext|>"], 20),
    "hellaswag": lambda p: ff.write_hellaswag(p, hellaswag_examples()),
}


def train_loader(path):
    loader = DataLoader(path, 2, 4, 50257, shuffle=True)
    for _ in range(30):  # a few epochs of a small shard: every sample order drawn, every token checked
        inputs, targets = loader.next_batch()
        assert inputs.shape == targets.shape == (2, 4) and inputs.max() < 50257 and targets.max() < 50257


def shard(path):
    tokens = ff.read_shard(path)
    assert len(tokens) == int(np.fromfile(path, "<i4", 3)[2])


def model(path):
    config, params = ff.read_model(path)
    assert params.shape == (ff.num_parameters(config),)


def model_config(path):
    config = ff.read_model_config(path)
    assert min(vars(config).values()) > 0 and config.channels % config.num_heads == 0


def state(path, part=None):
    read = ff.read_state(path, STATE_SIZE, part)
    size = STATE_SIZE if part is None else part[1] - part[0]
    assert read.m.shape == read.v.shape == (size,) and (read.master is None) != read.use_master_weights
    assert 0 <= read.rank < read.num_processes and len(read.loss_window) <= 128 and len(read.norm_window) <= 128


def state_shard_size(path):
    shard_size, num_processes, rank = ff.state_shard_size(path)
    assert shard_size >= 0 and 0 <= rank < num_processes


def debug_state(path):
    read = ff.read_debug_state(path, CONFIG.vocab_size, NUM_PARAMS)
    B, T = read.x.shape
    assert read.y.shape == (B, T) and read.logits.shape == (B, T, CONFIG.vocab_size) and read.grads.shape == (NUM_PARAMS,)


def tokenizer(path):
    tokens, eot = ff.read_tokenizer(path)
    assert len(tokens) == int(np.fromfile(path, "<u4", 3)[2]) and 0 <= eot < len(tokens)
    assert all(1 <= len(token) <= 255 for token in tokens)


def hellaswag(path):
    for example in ff.read_hellaswag(path):
        assert len(example.endings) == 4 and 0 <= example.label <= 3


READERS = {  # each reader, the kinds of valid file its mutations start from, and what a result must be
    "read_shard": (["shard"], shard),
    "DataLoader": (["shard"], train_loader),
    "read_model": (["model v3", "model v5"], model),
    "read_model_config": (["model v3", "model v5"], model_config),
    "read_state": (["state", "state with master weights"], state),
    "read_state, a part": (["state", "state with master weights"], lambda p: state(p, (7, 30))),
    "state_shard_size": (["state", "state with master weights"], state_shard_size),
    "read_debug_state": (["debug state"], debug_state),
    "read_tokenizer": (["tokenizer"], tokenizer),
    "read_hellaswag": (["hellaswag"], hellaswag),
}


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """Each kind of file, valid, as bytes."""
    folder = tmp_path_factory.mktemp("valid")
    files = {}
    for kind, write in WRITERS.items():
        write(folder / "file.bin")
        files[kind] = (folder / "file.bin").read_bytes()
    return files


@st.composite
def mutated(draw, data):
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["byte", "uint16", "uint16", "int32", "int32", "truncate", "extend"]))
        if kind == "byte" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif kind == "uint16" and len(data) >= 2:  # the fields of a payload of uint16 records (HellaSwag's)
            near = st.sampled_from([0, 512]).flatmap(lambda first: st.integers(first, first + 18))  # header, first record
            at = draw((near | near | st.integers(0, len(data) // 2 - 1)).filter(lambda at: 2 * at + 2 <= len(data)))
            struct.pack_into("<H", data, 2 * at, draw(st.one_of(st.integers(0, 8), st.sampled_from([65535, 65534]),
                                                                st.integers(0, 65535))))
        elif kind == "int32" and len(data) >= 4:
            # mostly the header's fields, and the first ints of the payload (records, lengths)
            slot = draw(st.one_of(st.integers(0, min(len(data) // 4, 12) - 1), st.integers(256, 300),
                                  st.integers(0, len(data) // 4 - 1)).filter(lambda slot: 4 * slot + 4 <= len(data)))
            old = struct.unpack_from("<i", data, 4 * slot)[0]
            value = draw(st.one_of(st.sampled_from(EDGES), st.integers(-4, 4096), st.integers(-2**31, 2**31 - 1),
                                   st.sampled_from([old - 1, old + 1, 2 * old, old // 2, -old])))
            struct.pack_into("<i", data, 4 * slot, max(-2**31, min(2**31 - 1, value)))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))):]
        else:
            data += draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


def assert_valid_or_format_error(reader, path, size):
    """reader(path) gives a result that holds together (its asserts), or raises FormatError naming
    the file in one line; meanwhile no allocation grows beyond a few times the file (1 MiB of slack
    for NumPy and Python's own)."""
    tracemalloc.start()
    try:
        reader(path)
    except ff.FormatError as e:
        assert str(e.path) == str(path) and "\n" not in str(e), str(e)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak <= 8 * size + 2**20, f"{peak} bytes allocated reading a {size}-byte file"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", READERS)
@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_reader_given_random_or_mutated_bytes_gives_a_result_or_its_format_error(name, valid, tmp_path, data):
    kinds, reader = READERS[name]
    source = data.draw(st.sampled_from(["random"] + kinds))
    raw = data.draw(st.binary(max_size=4096) if source == "random" else mutated(valid[source]))
    path = tmp_path / "file.bin"
    path.write_bytes(raw)
    assert_valid_or_format_error(reader, path, len(raw))

"""Readers and writers for llm.c's binary files: token shards, model checkpoints,
optimizer state, debug state, the GPT-2 tokenizer and the HellaSwag eval file.

Every file is little-endian and byte-compatible with llm.c. Every header is 256
int32 (1024 bytes): magic in slot 0, version in slot 1, unused slots 0. Readers
check existence, magic, version and size (or record structure) and raise
FormatError, one line naming the file. Writers go through atomic_write, so a
crash never leaves a torn file under a real name.
"""
import contextlib
import dataclasses
import json
import math
import os

import ml_dtypes
import numpy as np

HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS

SHARD_MAGIC = 20240520
MODEL_MAGIC = 20240326
DEBUG_MAGIC = 20240327
TOKENIZER_MAGIC = 20240328
HELLASWAG_MAGIC = 20240522
STATE_MAGIC = 20240527

MODEL_VERSIONS = {3: "fp32", 5: "bf16"}


class FormatError(Exception):
    """A file that is not what it claims. str() is one line: '<path>: <problem>'."""

    def __init__(self, path, problem):
        super().__init__(path, problem)  # both in args, so the error survives pickling to another process
        self.path = path
        self.problem = problem

    def __str__(self):
        return f"{self.path}: {self.problem}"


@contextlib.contextmanager
def atomic_write(path):
    """Yield a binary file on a temporary name beside `path`; it replaces `path` only once complete."""
    tmp = f"{path}.tmp{os.getpid()}"  # same directory, so os.replace is an atomic rename
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the bytes reach the disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json(path, value):
    """value as indented JSON, through atomic_write."""
    with atomic_write(path) as f:
        f.write((json.dumps(value, indent=2) + "\n").encode())


# ----------------------------------------------------------------------------
# shared helpers

def _header(magic, version, *fields, dtype="<i4"):
    header = np.zeros(HEADER_INTS, dtype=dtype)
    header[:2 + len(fields)] = (magic, version, *fields)
    return header


def _write(f, array, dtype=None):
    """Write `array` flat as `dtype`; explicit little-endian dtypes make the bytes the same on any host."""
    f.write(np.ascontiguousarray(array, dtype=dtype).reshape(-1).view(np.uint8))


def _read_header(path, magic, what, versions, dtype="<i4"):
    """Check that `path` holds a whole header with `magic` and a version in `versions` (version -> meaning).
    Returns the header (256 values) and the file size in bytes."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise FormatError(path, f"no such file (expected {what})") from None
    if len(raw) < HEADER_BYTES:
        raise FormatError(path, f"file is {size} bytes, shorter than the {HEADER_BYTES}-byte header of {what}")
    header = np.frombuffer(raw, dtype=dtype)
    if header[0] != magic:
        raise FormatError(path, f"bad magic {header[0]} (expected {magic}, {what})")
    if int(header[1]) not in versions:
        expected = " or ".join(f"{v} {meaning}".strip() for v, meaning in versions.items())
        raise FormatError(path, f"unsupported version {header[1]} (expected {expected})")
    return header, size


def _check_size(path, size, parts, note, at_least=False):
    """Check that the file is the header plus `parts`, (dtype, count) pairs, and nothing more unless `at_least`."""
    parts = [(np.dtype(dtype).itemsize, count) for dtype, count in parts]
    expected = HEADER_BYTES + sum(itemsize * count for itemsize, count in parts)
    if size == expected or (at_least and size > expected):
        return
    formula = " + ".join([str(HEADER_BYTES)] + [f"{itemsize} * {count}" for itemsize, count in parts])
    bound = "at least " if at_least else ""
    raise FormatError(path, f"file is {size} bytes, expected {bound}{formula} = {expected} {note}")


def _read_payload(path, parts):
    """Read the (dtype, count) arrays that follow the header, in native byte order, then the bytes left over."""
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        arrays = [np.fromfile(f, dtype=dtype, count=count) for dtype, count in parts]
        return [a.astype(a.dtype.newbyteorder("="), copy=False) for a in arrays], f.read()


def _u64(header, slot):
    """llm.c stores a u64 across two int32 slots, low half first: little-endian u64 bytes."""
    return header[slot:slot + 2].view("<u8")


# ----------------------------------------------------------------------------
# data shard: uint16 tokens

def write_shard(path, tokens):
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or (tokens.size and tokens.dtype.kind not in "iu"):
        raise ValueError(f"tokens must be a 1-D integer array, got {tokens.dtype} of shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise ValueError(f"tokens must fit in uint16 (0..65535), got {tokens.min()}..{tokens.max()}")
    with atomic_write(path) as f:
        _write(f, _header(SHARD_MAGIC, 1, tokens.size))
        _write(f, tokens, "<u2")


def read_shard(path):
    header, size = _read_header(path, SHARD_MAGIC, "an llm.c token shard", {1: ""})
    n = int(header[2])
    if n < 0:
        raise FormatError(path, f"bad header: token count {n} is negative")
    _check_size(path, size, [("<u2", n)], f"for {n} tokens")
    # a memmap, not a read: shards run to hundreds of MB and the loader only touches windows of them
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))


# ----------------------------------------------------------------------------
# model checkpoint: config + all parameters back to back

@dataclasses.dataclass(frozen=True)
class GPT2Config:
    max_seq_len: int        # maxT
    vocab_size: int         # V, 50257 for GPT-2
    num_layers: int         # L
    num_heads: int          # NH
    channels: int           # C
    padded_vocab_size: int  # Vp, a multiple of 128 (50304) so the classifier matmul tiles well


PARAM_NAMES = ("wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
               "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb")


def param_shapes(config):
    """Shapes in file order; matrices are PyTorch Linear layout (out, in), per-layer tensors stacked over L."""
    Vp, maxT, L, C = config.padded_vocab_size, config.max_seq_len, config.num_layers, config.channels
    shapes = ((Vp, C), (maxT, C), (L, C), (L, C), (L, 3 * C, C), (L, 3 * C), (L, C, C), (L, C),
              (L, C), (L, C), (L, 4 * C, C), (L, 4 * C), (L, C, 4 * C), (L, C), (C,), (C,))
    return dict(zip(PARAM_NAMES, shapes))


def num_parameters(config):
    return sum(math.prod(shape) for shape in param_shapes(config).values())


def _config_problem(config):
    """Why `config` cannot describe a GPT-2, or None."""
    if min(dataclasses.astuple(config)) <= 0:
        return f"every size must be positive, got {config}"
    if config.channels % config.num_heads:
        return f"channels {config.channels} not divisible by num_heads {config.num_heads}"
    if config.padded_vocab_size < config.vocab_size:
        return f"padded_vocab_size {config.padded_vocab_size} smaller than vocab_size {config.vocab_size}"
    return None


def write_model(path, config, params, version):
    problem = _config_problem(config)
    if problem:
        raise ValueError(problem)
    n = num_parameters(config)
    params = np.asarray(params)
    if params.shape != (n,):
        raise ValueError(f"params has shape {params.shape}, expected ({n},) for {config}")
    if version == 3:
        payload, dtype = params, "<f4"
    elif version == 5:  # round to nearest even; stored as raw bits so the byte order is explicit
        payload, dtype = params.astype(ml_dtypes.bfloat16).view(np.uint16), "<u2"
    else:
        raise ValueError(f"unsupported model version {version} (expected 3 fp32 or 5 bf16)")
    with atomic_write(path) as f:
        _write(f, _header(MODEL_MAGIC, version, *dataclasses.astuple(config)))
        _write(f, payload, dtype)


def _model_layout(path):
    """A model file's config and version, checked against its header and size; all that is read is the header."""
    header, size = _read_header(path, MODEL_MAGIC, "an llm.c model checkpoint", MODEL_VERSIONS)
    version = int(header[1])
    config = GPT2Config(*header[2:8].tolist())
    problem = _config_problem(config)
    if problem:
        raise FormatError(path, f"bad header: {problem}")
    n = num_parameters(config)
    _check_size(path, size, [(_model_dtype(version), n)], f"for {n} {MODEL_VERSIONS[version]} parameters")
    return config, version


def _model_dtype(version):
    return "<f4" if version == 3 else "<u2"


def read_model_config(path):
    """The config of a model file that read_model would take, without reading its parameters."""
    return _model_layout(path)[0]


def read_model(path):
    config, version = _model_layout(path)
    (params,), _ = _read_payload(path, [(_model_dtype(version), num_parameters(config))])
    return config, (params if version == 3 else params.view(ml_dtypes.bfloat16))


# ----------------------------------------------------------------------------
# optimizer state: one file per rank

@dataclasses.dataclass
class OptimizerState:
    num_processes: int
    rank: int
    use_master_weights: bool
    shuffle: bool
    step: int
    rng_state: int
    rng_state_last_update: int
    shard_index: int              # where the first data order this rank reads stands (llm.c's fields)
    sample_index: int
    m: np.ndarray                 # (shard_size,) fp32 AdamW first moment
    v: np.ndarray                 # (shard_size,) fp32 second moment
    master: np.ndarray | None     # (shard_size,) fp32 master weights, if kept
    # our trailer. llm.c puts its loader's permutations here; ours replays its generators from the
    # seed, so the epoch and the samples read in it complete the data position. Then what that
    # position means: the run's batch and data, and the layout (processes, -b) of its first start,
    # whose ranks' orders the data follows on any number of processes. Last the outlier detectors'
    # windows, so that a resumed run z-scores and skips exactly as the straight run would.
    epoch: int
    epoch_samples: int            # samples each of the layout's orders has read in this epoch
    micro_batch: int              # -b, -t and -d of the run that wrote the file
    seq_len: int
    tokens_per_step: int
    layout_processes: int
    layout_micro_batch: int
    data_shards: int              # what -i matched: shards, tokens, and a hash of each shard's length
    data_tokens: int
    data_hash: int
    loss_window: np.ndarray       # float64, at most WINDOW_SLOTS values each
    norm_window: np.ndarray


STATE_U64_SLOTS = {"rng_state": 20, "rng_state_last_update": 22, "shard_index": 30, "sample_index": 32}
# our trailer, fixed size: TRAILER_INTS int64 (magic, TRAILER_FIELDS, the two windows' lengths, then
# zeros), then each window as WINDOW_SLOTS float64 (llm.c's outlier window is 128 values), zero-padded
STATE_TRAILER_MAGIC = 20261202
TRAILER_FIELDS = ("epoch", "epoch_samples", "micro_batch", "seq_len", "tokens_per_step", "layout_processes",
                  "layout_micro_batch", "data_shards", "data_tokens", "data_hash")
TRAILER_INTS = 16
WINDOW_SLOTS = 128
TRAILER_PARTS = [("<i8", TRAILER_INTS), ("<f8", 2 * WINDOW_SLOTS)]
TRAILER_BYTES = sum(np.dtype(dtype).itemsize * count for dtype, count in TRAILER_PARTS)


def write_state(path, state):
    if (state.master is not None) != bool(state.use_master_weights):
        raise ValueError("master must be given exactly when use_master_weights is set")
    arrays = [state.m, state.v] + ([state.master] if state.use_master_weights else [])
    if np.ndim(state.m) != 1 or any(np.shape(a) != np.shape(state.m) for a in arrays):
        raise ValueError(f"m, v and master must be 1-D of one length, got {[np.shape(a) for a in arrays]}")
    if max(len(state.loss_window), len(state.norm_window)) > WINDOW_SLOTS:
        raise ValueError(f"outlier windows hold at most {WINDOW_SLOTS} values")
    header = _header(STATE_MAGIC, 1, state.num_processes, state.rank, state.use_master_weights, state.shuffle)
    header[10] = state.step
    for name, slot in STATE_U64_SLOTS.items():
        _u64(header, slot)[0] = getattr(state, name)
    fields = [STATE_TRAILER_MAGIC, *(getattr(state, name) for name in TRAILER_FIELDS), len(state.loss_window),
              len(state.norm_window)]
    trailer = np.zeros(TRAILER_INTS, "<i8")
    trailer[:len(fields)] = fields
    windows = np.zeros((2, WINDOW_SLOTS))
    windows[0, :len(state.loss_window)] = state.loss_window
    windows[1, :len(state.norm_window)] = state.norm_window
    with atomic_write(path) as f:
        _write(f, header)
        for array in arrays:
            _write(f, array, "<f4")
        _write(f, trailer)
        _write(f, windows, "<f8")


def _state_header(path):
    """A state file's header, checked, and the file's size; all that is read is the header."""
    header, size = _read_header(path, STATE_MAGIC, "an llm.c optimizer state", {1: ""})
    num_processes, rank, master, shuffle = header[2:6].tolist()
    step = int(header[10])
    if num_processes < 1 or not 0 <= rank < num_processes or master not in (0, 1) or shuffle not in (0, 1) or step < 0:
        raise FormatError(path, f"bad header: num_processes={num_processes} rank={rank} use_master_weights={master} "
                                f"shuffle={shuffle} step={step}")
    return header, size


def state_shard_size(path):
    """How many values each of a state file's m, v (and master weights) holds, and the number of
    processes and the rank of the run that wrote it, judged from its header and size alone,
    without reading what may be gigabytes."""
    header, size = _state_header(path)
    num_processes, rank, master = header[2:5].tolist()
    arrays = 3 if master else 2
    payload = size - HEADER_BYTES - TRAILER_BYTES
    if payload < 0 or payload % (4 * arrays):
        raise FormatError(path, f"file is {size} bytes: not the {HEADER_BYTES}-byte header, {arrays} fp32 arrays of "
                                f"one length (m, v{', master' if master else ''}) and our {TRAILER_BYTES}-byte trailer")
    return payload // (4 * arrays), num_processes, rank


def read_state(path, shard_size, part=None):
    """The state of one rank, whose m, v (and master weights) hold shard_size values each; with
    part=(start, stop), only those values of each are read."""
    header, size = _state_header(path)
    num_processes, rank, master, shuffle = header[2:6].tolist()
    arrays = 3 if master else 2
    note = f"for m, v{', master' if master else ''} of {shard_size} values each, then our trailer"
    _check_size(path, size, [("<f4", shard_size)] * arrays + TRAILER_PARTS, note)
    start, stop = part or (0, shard_size)
    assert 0 <= start <= stop <= shard_size, (start, stop, shard_size)
    with open(path, "rb") as f:
        values = []
        for i in range(arrays):
            f.seek(HEADER_BYTES + 4 * (i * shard_size + start))
            values.append(np.fromfile(f, "<f4", stop - start).astype(np.float32))
        f.seek(HEADER_BYTES + 4 * arrays * shard_size)
        trailer, windows = (np.fromfile(f, dtype, count) for dtype, count in TRAILER_PARTS)
    magic, *fields = trailer.tolist()
    if magic != STATE_TRAILER_MAGIC:
        raise FormatError(path, f"trailer magic {magic}, expected {STATE_TRAILER_MAGIC} (a state file not written "
                                f"by this train_gpt2.py, e.g. llm.c's or an earlier version's, cannot be resumed here)")
    named = dict(zip(TRAILER_FIELDS, fields))
    n_loss, n_norm = fields[len(TRAILER_FIELDS):len(TRAILER_FIELDS) + 2]
    at_least_one = ("micro_batch", "seq_len", "tokens_per_step", "layout_processes", "layout_micro_batch",
                    "data_shards")
    if (min(named["epoch"], named["epoch_samples"], named["data_tokens"]) < 0
            or min(named[name] for name in at_least_one) < 1
            or not 0 <= n_loss <= WINDOW_SLOTS or not 0 <= n_norm <= WINDOW_SLOTS):
        raise FormatError(path, f"bad trailer: {', '.join(f'{k}={v}' for k, v in named.items())}, windows of "
                                f"{n_loss} and {n_norm} values")
    windows = windows.astype(np.float64)
    return OptimizerState(
        num_processes=num_processes, rank=rank, use_master_weights=bool(master), shuffle=bool(shuffle),
        step=int(header[10]), **{name: int(_u64(header, slot)[0]) for name, slot in STATE_U64_SLOTS.items()},
        m=values[0], v=values[1], master=values[2] if master else None, **named,
        loss_window=windows[:n_loss], norm_window=windows[WINDOW_SLOTS:WINDOW_SLOTS + n_norm])


# ----------------------------------------------------------------------------
# debug state: one batch through the PyTorch reference

@dataclasses.dataclass
class DebugState:
    x: np.ndarray       # (B, T) int32 inputs
    y: np.ndarray       # (B, T) int32 targets
    logits: np.ndarray  # (B, T, V) float32, unpadded vocab
    loss: float
    grads: np.ndarray   # (num_params,) float32, wte grad padded to Vp rows


def write_debug_state(path, state):
    shapes = [np.shape(a) for a in (state.x, state.y, state.logits, state.grads)]
    if len(shapes[0]) != 2 or shapes[1] != shapes[0] or shapes[2][:2] != shapes[0] or len(shapes[2]) != 3 \
            or len(shapes[3]) != 1:
        raise ValueError(f"expected x, y (B, T), logits (B, T, V), grads 1-D; got shapes {shapes}")
    B, T = np.shape(state.x)
    with atomic_write(path) as f:
        _write(f, _header(DEBUG_MAGIC, 2, B, T))
        _write(f, state.x, "<i4")
        _write(f, state.y, "<i4")
        _write(f, state.logits, "<f4")
        _write(f, state.loss, "<f4")
        _write(f, state.grads, "<f4")


def read_debug_state(path, vocab_size, num_params):
    header, size = _read_header(path, DEBUG_MAGIC, "a PyTorch reference debug state", {2: ""})
    B, T = header[2:4].tolist()
    if B <= 0 or T <= 0:
        raise FormatError(path, f"bad header: B={B} T={T}, both must be positive")
    parts = [("<i4", B * T), ("<i4", B * T), ("<f4", B * T * vocab_size), ("<f4", 1), ("<f4", num_params)]
    _check_size(path, size, parts, f"for x, y, logits, loss, grads with B={B} T={T} V={vocab_size} "
                                   f"and {num_params} parameters")
    (x, y, logits, loss, grads), _ = _read_payload(path, parts)
    return DebugState(x.reshape(B, T), y.reshape(B, T), logits.reshape(B, T, vocab_size), float(loss[0]), grads)


# ----------------------------------------------------------------------------
# tokenizer: uint32 header, then each token as a length byte and its raw bytes

def write_tokenizer(path, tokens, eot):
    for i, token in enumerate(tokens):
        if not 1 <= len(token) <= 255:
            raise ValueError(f"token {i} is {len(token)} bytes, a token must be 1..255 bytes")
    if not 0 <= eot < len(tokens):
        raise ValueError(f"EOT token {eot} outside the vocab of {len(tokens)}")
    with atomic_write(path) as f:
        _write(f, _header(TOKENIZER_MAGIC, 2, len(tokens), eot, dtype="<u4"))
        f.write(b"".join(bytes([len(token)]) + token for token in tokens))


def read_tokenizer(path):
    header, _ = _read_header(path, TOKENIZER_MAGIC, "an llm.c tokenizer", {2: ""}, dtype="<u4")
    vocab_size, eot = header[2:4].tolist()
    if eot >= vocab_size:
        raise FormatError(path, f"bad header: EOT token {eot} outside the vocab of {vocab_size}")
    _, data = _read_payload(path, [])
    tokens, pos = [], 0
    for i in range(vocab_size):
        length = data[pos] if pos < len(data) else None
        if length == 0:
            raise FormatError(path, f"token {i} has length 0 (expected 1..255)")
        if length is None or pos + 1 + length > len(data):
            raise FormatError(path, f"truncated in token {i} of {vocab_size}")
        tokens.append(data[pos + 1:pos + 1 + length])
        pos += 1 + length
    if pos != len(data):
        raise FormatError(path, f"{len(data) - pos} trailing bytes after the {vocab_size} tokens")
    return tokens, eot


# ----------------------------------------------------------------------------
# HellaSwag: per example a uint16 record, self-delimiting so a reader can skip through it

@dataclasses.dataclass
class HellaSwagExample:
    index: int
    label: int                  # which ending is right, 0..3
    context: list[int]
    endings: list[list[int]]    # exactly 4


def _hellaswag_record(example):
    if len(example.endings) != 4 or not 0 <= example.label <= 3:
        raise ValueError(f"example {example.index}: needs 4 endings and a label 0..3, "
                         f"got {len(example.endings)} and {example.label}")
    record = [65535, 0, example.index, example.label, 4, len(example.context), *example.context]
    for ending in example.endings:
        record += [len(ending), *ending]
    record[1] = 2 * len(record)
    if min(record) < 0 or max(record) > 65535:
        raise ValueError(f"example {example.index}: every field, token and the record length must fit in uint16")
    return record


def write_hellaswag(path, examples):
    records = [_hellaswag_record(example) for example in examples]
    longest = max((2 * len(record) for record in records), default=0)
    with atomic_write(path) as f:
        _write(f, _header(HELLASWAG_MAGIC, 1, len(records), longest))
        _write(f, [value for record in records for value in record], "<u2")


def _parse_hellaswag_record(path, stream, pos, i):
    """Example number i, starting at stream[pos]; returns it and where the next one starts."""
    if len(stream) - pos < 6:
        raise FormatError(path, f"truncated in example {i}")
    delimiter, nbytes, index, label, num_endings, context_len = stream[pos:pos + 6]
    if delimiter != 65535:
        raise FormatError(path, f"example {i} starts with {delimiter}, expected the delimiter 65535")
    if nbytes % 2 or nbytes < 12:
        raise FormatError(path, f"example {i}: record length {nbytes} is not an even number of bytes >= 12")
    if pos + nbytes // 2 > len(stream):
        raise FormatError(path, f"truncated in example {i}")
    if label > 3 or num_endings != 4:
        raise FormatError(path, f"example {i}: label {label} and {num_endings} endings (expected 0..3 and 4)")
    record = stream[pos:pos + nbytes // 2]
    context, p = record[6:6 + context_len], 6 + context_len
    endings = []
    while len(endings) < 4 and p < len(record):
        endings.append(record[p + 1:p + 1 + record[p]])
        p += 1 + record[p]
    if len(endings) != 4 or p != len(record):
        raise FormatError(path, f"example {i}: context and endings do not fill its {nbytes}-byte record exactly")
    return HellaSwagExample(index, label, context, endings), pos + len(record)


def read_hellaswag(path):
    header, size = _read_header(path, HELLASWAG_MAGIC, "an llm.c HellaSwag eval file", {1: ""})
    count, longest = header[2:4].tolist()
    if count < 0 or longest < 0:
        raise FormatError(path, f"bad header: {count} examples, longest {longest} bytes")
    if (size - HEADER_BYTES) % 2:
        raise FormatError(path, f"payload of {size - HEADER_BYTES} bytes is not a whole number of uint16")
    (stream,), _ = _read_payload(path, [("<u2", (size - HEADER_BYTES) // 2)])
    stream, examples, pos, actual_longest = stream.tolist(), [], 0, 0
    for i in range(count):
        example, end = _parse_hellaswag_record(path, stream, pos, i)
        examples.append(example)
        actual_longest, pos = max(actual_longest, 2 * (end - pos)), end
    if pos != len(stream):
        raise FormatError(path, f"{2 * (len(stream) - pos)} trailing bytes after the {count} examples")
    if longest != actual_longest:
        raise FormatError(path, f"header says the longest example is {longest} bytes, it is {actual_longest}")
    return examples

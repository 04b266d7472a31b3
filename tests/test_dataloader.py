"""dataloader, specified: the batches are llm.c's, checked against windows cut by plain slicing of the
written tokens; shuffling visits every sample once per epoch in llm.c's order (checked against a
transcription of its dataloader.h on an independent mt19937); restoring a position resumes the exact
sequence; and every bad input is a one-line error naming it."""
import re

import numpy as np
import pytest

import fileformats as ff
from dataloader import DataLoader
from fileformats import FormatError

B, T, VOCAB = 2, 3, 1000
# tokens per shard; strides below are P*B*T = 6, 12, 18. 36 is a multiple of all three: its last whole
# stride lacks the one token more that its targets need, so it is tail too
LENGTHS = (40, 25, 59, 36)


def write_shards(tmp_path, lengths=LENGTHS, seed=0):
    """Shards of seeded random tokens; returns the glob pattern and the token arrays in file order."""
    rng = np.random.default_rng(seed)
    shards = [rng.integers(0, VOCAB, n) for n in lengths]
    for i in reversed(range(len(shards))):  # created out of order, so only sorting puts them in file order
        ff.write_shard(tmp_path / f"shard_{i:02d}.bin", shards[i])
    return str(tmp_path / "shard_*.bin"), shards


def windows(shards, P=1, rank=0):
    """Per shard, this rank's B*T+1-token windows: one per sample whose P*B*T+1 tokens fit in the shard."""
    stride, own = P * B * T, rank * B * T
    return [[tokens[s + own:s + own + B * T + 1] for s in range(0, len(tokens) - stride, stride)]
            for tokens in shards]


def batch(window):
    return window[:-1].reshape(B, T), window[1:].reshape(B, T)


def take(loader, n):
    """The next n batches, copied, since the loader refills the same arrays."""
    return [tuple(a.copy() for a in loader.next_batch()) for _ in range(n)]


def assert_batches_equal(actual, expected):
    assert len(actual) == len(expected)
    for i, ((x, y), (ex, ey)) in enumerate(zip(actual, expected)):
        assert np.array_equal(x, ex) and np.array_equal(y, ey), f"batch {i}"


def visits(loader, n, shards, P=1, rank=0):
    """The (shard, sample) of each of the next n batches, identified by its tokens."""
    where = {tuple(w.tolist()): (k, s) for k, ws in enumerate(windows(shards, P, rank)) for s, w in enumerate(ws)}
    assert len(where) == sum(len(ws) for ws in windows(shards, P, rank))  # every window tells its place apart
    return [where[tuple(x.ravel().tolist() + y.ravel()[-1:].tolist())] for x, y in take(loader, n)]


def assert_one_line(info, *names):
    message = str(info.value)
    assert "\n" not in message, message
    for name in names:
        assert str(name) in message, message
    return message


# ----------------------------------------------------------------------------
# the batches

def test_unshuffled_batches_walk_the_shards_in_order_and_wrap_into_the_next_epoch(tmp_path):
    pattern, shards = write_shards(tmp_path)
    loader = DataLoader(pattern, B, T, VOCAB)
    epoch = [batch(w) for ws in windows(shards) for w in ws]
    assert loader.files == sorted(str(tmp_path / f"shard_{i:02d}.bin") for i in range(4))
    assert (loader.num_tokens, loader.num_batches, len(epoch)) == (160, 24, 24)  # 39//6 + 24//6 + 58//6 + 35//6

    got, epochs = [], []
    for _ in range(2 * 24 + 5):
        x, y = loader.next_batch()
        assert x is loader.inputs and y is loader.targets
        assert x.dtype == y.dtype == np.int32 and x.shape == y.shape == (B, T)
        assert np.array_equal(y.ravel()[:-1], x.ravel()[1:])  # targets are the inputs shifted by one
        got.append((x.copy(), y.copy()))
        epochs.append(loader.epoch)
    assert_batches_equal(got, epoch * 2 + epoch[:5])
    assert epochs == [0] * 24 + [1] * 24 + [2] * 5


def test_each_rank_reads_its_own_slice_of_every_sample(tmp_path):
    P = 3
    pattern, shards = write_shards(tmp_path)
    loaders = [DataLoader(pattern, B, T, VOCAB, rank=r, num_processes=P) for r in range(P)]
    assert [loader.num_batches for loader in loaders] == [2 + 1 + 3 + 1] * P
    per_rank = [take(loader, 7 + 2) for loader in loaders]
    for r in range(P):
        epoch = [batch(w) for ws in windows(shards, P, r) for w in ws]
        assert_batches_equal(per_rank[r], epoch + epoch[:2])

    # together the ranks cover each sample's P*B*T tokens contiguously, each token once
    starts = [(k, s) for k, tokens in enumerate(shards) for s in range(0, len(tokens) - P * B * T, P * B * T)]
    for i, (k, s) in enumerate(starts):
        inputs = np.concatenate([per_rank[r][i][0].ravel() for r in range(P)])
        targets = np.concatenate([per_rank[r][i][1].ravel() for r in range(P)])
        assert np.array_equal(inputs, shards[k][s:s + P * B * T])
        assert np.array_equal(targets, shards[k][s + 1:s + P * B * T + 1])


def test_a_shuffled_epoch_visits_every_sample_once_shard_by_shard_in_a_new_order(tmp_path):
    pattern, shards = write_shards(tmp_path)
    in_order = [(k, s) for k, ws in enumerate(windows(shards)) for s in range(len(ws))]
    loader = DataLoader(pattern, B, T, VOCAB, shuffle=True)
    first, second = visits(loader, 24, shards), visits(loader, 24, shards)
    for epoch in (first, second):
        assert sorted(epoch) == in_order
        shard_runs = [k for i, (k, _) in enumerate(epoch) if i == 0 or epoch[i - 1][0] != k]
        assert sorted(shard_runs) == [0, 1, 2, 3]  # a shard's samples are all taken before the next shard's
    assert first != in_order
    assert second != first

    twin = DataLoader(pattern, B, T, VOCAB, shuffle=True)
    assert visits(twin, 2 * 24, shards) == first + second
    other_rank = DataLoader(pattern, B, T, VOCAB, rank=1, num_processes=2, shuffle=True)
    rank_zero = DataLoader(pattern, B, T, VOCAB, rank=0, num_processes=2, shuffle=True)
    assert visits(other_rank, 11, shards, 2, 1) != visits(rank_zero, 11, shards, 2, 0)


class Mt19937:
    """The reference mt19937 (Matsumoto and Nishimura's init_genrand seeding) as llm.c's rand.h seeds it,
    on NumPy's MT19937 bit generator: raw 32-bit draws, llm.c's randint32."""

    def __init__(self, seed):
        key = [seed]
        for i in range(1, 624):
            key.append((1812433253 * (key[-1] ^ (key[-1] >> 30)) + i) % 2**32)
        self.bitgen = np.random.MT19937()
        self.bitgen.state = {"bit_generator": "MT19937", "state": {"key": np.array(key, np.uint32), "pos": 624}}

    def randint32(self):
        return int(self.bitgen.random_raw())


def test_the_reference_generator_is_llm_c_s():
    # rand.h's own example: manual_seed(137), then five randint32
    rng = Mt19937(137)
    assert [rng.randint32() for _ in range(5)] == [4053805790, 2173880614, 380293709, 1237255315, 2986595568]


def llm_c_visits(num_samples, rank, num_batches):
    """(shard, sample) of each batch as llm.c's dataloader.h serves them with shuffling on, transcribed
    step by step: dataloader_init seeds 42 + rank and starts from the identity shard order;
    dataloader_reset permutes that order in place (it is never reset to the identity) and shuffles the
    first shard's samples; dataloader_advance_ shuffles each next shard's samples from the identity, and at
    the last shard resets. random_permutation is Fisher-Yates from the top, j = randint32() % (i + 1)."""
    rng = Mt19937(42 + rank)

    def random_permutation(data):
        for i in range(len(data) - 1, 0, -1):
            j = rng.randint32() % (i + 1)
            data[i], data[j] = data[j], data[i]

    shard_indices = list(range(len(num_samples)))
    out = []

    def reset():
        random_permutation(shard_indices)
        load(0)

    def load(current_shard):
        nonlocal shard, intra
        shard = shard_indices[current_shard]
        intra = list(range(num_samples[shard]))
        random_permutation(intra)

    shard = intra = None
    reset()
    current_shard, current_sample = 0, -1
    while len(out) < num_batches:
        current_sample += 1
        if current_sample >= num_samples[shard]:
            if current_shard == len(num_samples) - 1:
                reset()
                current_shard = 0
            else:
                current_shard += 1
                load(current_shard)
            current_sample = 0
        out.append((shard, intra[current_sample]))
    return out


@pytest.mark.parametrize("lengths, P, rank", [
    ((40,), 1, 0),                      # one shard: llm.c's shard shuffle draws nothing
    (LENGTHS, 1, 0),
    (LENGTHS, 3, 2),
    ((200, 77, 130, 61, 95, 300), 2, 1),
    ((7, 13), 1, 0),                    # samples of one and two: shuffles that draw nothing and one value
])
def test_the_shuffled_order_is_llm_c_s_batch_for_batch(tmp_path, lengths, P, rank):
    pattern, shards = write_shards(tmp_path, lengths)
    ws = windows(shards, P, rank)
    num_samples = [len(w) for w in ws]
    loader = DataLoader(pattern, B, T, VOCAB, rank=rank, num_processes=P, shuffle=True)
    n = 3 * sum(num_samples) + 2  # three epochs and into the fourth
    assert visits(loader, n, shards, P, rank) == llm_c_visits(num_samples, rank, n)


def test_llm_c_s_measured_first_samples_on_a_tiny_shakespeare_shard(tmp_path):
    # llm.c (train_gpt2.cu, -b 4 -t 64) on the 1,529,241-token Tiny Shakespeare train shard that
    # `python -m prepro.tinyshakespeare` builds offline served samples 2715, 5446, 4143, 1825 first. The
    # order depends on the sample count only, (1529241 - 1) // 256 = 5973: here with B = T = 1, and each
    # token its own position, so a batch's input names its sample
    ff.write_shard(tmp_path / "train.bin", np.arange(5973 + 1))
    loader = DataLoader(str(tmp_path / "train.bin"), 1, 1, 6000, shuffle=True)
    assert loader.num_batches == 5973
    assert [int(loader.next_batch()[0][0, 0]) for _ in range(4)] == [2715, 5446, 4143, 1825]


@pytest.mark.parametrize("shuffle", [False, True])
def test_reset_goes_back_to_the_first_batch(tmp_path, shuffle):
    pattern, _ = write_shards(tmp_path)
    loader = DataLoader(pattern, B, T, VOCAB, shuffle=shuffle)
    start = take(loader, 25)
    loader.reset()
    assert (loader.epoch, loader.epoch_samples, loader.shard_index, loader.sample_index) == (0, 0, 0, 0)
    assert_batches_equal(take(loader, 25), start)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("P, rank", [(1, 0), (3, 2)])
def test_restore_resumes_exactly_from_every_position(tmp_path, shuffle, P, rank):
    pattern, _ = write_shards(tmp_path)
    original, resumed = (DataLoader(pattern, B, T, VOCAB, rank=rank, num_processes=P, shuffle=shuffle)
                         for _ in range(2))
    positions = set()
    # every stop in two epochs and a bit: inside shards, at each shard's end, at and across epoch ends
    for stop in range(2 * original.num_batches + 2):
        original.reset()
        take(original, stop)
        position = (original.epoch, original.epoch_samples)
        positions.add(position)
        take(resumed, stop % 5 + 1)  # the resumed loader is mid-run, its cached orders belonging elsewhere
        resumed.restore(*position)
        assert (resumed.epoch, resumed.epoch_samples) == position
        assert (resumed.shard_index, resumed.sample_index) == (original.shard_index, original.sample_index)
        assert_batches_equal(take(resumed, 40), take(original, 40))
    assert len(positions) == 2 * original.num_batches + 2


# ----------------------------------------------------------------------------
# errors

def test_a_pattern_matching_nothing_is_a_format_error(tmp_path):
    write_shards(tmp_path)
    pattern = str(tmp_path / "val_*.bin")
    with pytest.raises(FormatError) as info:
        DataLoader(pattern, B, T, VOCAB)
    assert assert_one_line(info) == f"{pattern}: no file matches this pattern"


@pytest.mark.parametrize("damage, problem", [
    (lambda data: b"\x00" * 4 + data[4:], r"bad magic 0 \(expected 20240520"),
    (lambda data: data[:-1], r"file is 1073 bytes, expected 1024 \+ 2 \* 25 = 1074"),
])
def test_a_damaged_shard_is_a_format_error_naming_it(tmp_path, damage, problem):
    pattern, _ = write_shards(tmp_path)
    path = tmp_path / "shard_01.bin"  # not the first: every shard is checked up front
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(FormatError) as info:
        DataLoader(pattern, B, T, VOCAB)
    assert re.fullmatch(rf"{re.escape(str(path))}: {problem}.*", assert_one_line(info))


@pytest.mark.parametrize("P", [1, 3])
def test_a_shard_shorter_than_one_batch_is_a_format_error(tmp_path, P):
    needed = P * B * T + 1
    pattern, _ = write_shards(tmp_path, lengths=(40, needed))
    assert DataLoader(pattern, B, T, VOCAB, num_processes=P).num_batches == 39 // (P * B * T) + 1

    pattern, _ = write_shards(tmp_path, lengths=(40, needed - 1))
    with pytest.raises(FormatError) as info:
        DataLoader(pattern, B, T, VOCAB, num_processes=P)
    assert assert_one_line(info) == (f"{tmp_path / 'shard_01.bin'}: holds {needed - 1} tokens, fewer than one batch "
                                     f"needs (B*T*processes + 1 = {needed})")


@pytest.mark.parametrize("bad", [0, 2])
def test_a_token_outside_the_vocab_is_a_format_error(tmp_path, bad):
    """In the first file, when the loader is made; in any other, on the first batch from that shard
    (shards 0 and 1 hold 6 and 4 batches, unshuffled), so that a start never reads every shard."""
    pattern, shards = write_shards(tmp_path)
    path = tmp_path / f"shard_{bad:02d}.bin"
    tokens = shards[bad].copy()
    tokens[17], tokens[30] = VOCAB - 1, VOCAB  # the largest legal token, then the smallest illegal one
    for later in ([], [33, 35]):  # larger offenders later on: the message still points at the first
        tokens[later] = VOCAB + 5
        ff.write_shard(path, tokens)
        with pytest.raises(FormatError) as info:
            loader = DataLoader(pattern, B, T, VOCAB, shuffle=False)
            assert bad > 0, "the first file is checked when the loader is made"
            take(loader, 10)  # shards 0 and 1, which are good
            loader.next_batch()
        assert assert_one_line(info) == f"{path}: token {VOCAB} at position 30 is not below the vocab size {VOCAB}"

    tokens[[30, 33, 35]] = VOCAB - 1
    ff.write_shard(path, tokens)
    loader = DataLoader(pattern, B, T, VOCAB)
    take(loader, loader.num_batches + 1)
    assert loader.epoch == 1


@pytest.mark.parametrize("position, names", [
    ((-1, 0), ["epoch -1"]),
    ((0, 25), ["sample 25", "0..24", "shard_*.bin", "4 shards", "24 samples"]),
    ((0, -1), ["sample -1", "0..24"]),
])
def test_restoring_a_position_out_of_range_is_a_value_error(tmp_path, position, names):
    pattern, _ = write_shards(tmp_path)
    loader = DataLoader(pattern, B, T, VOCAB)
    loader.restore(0, 10)  # the end of a shard (6 + 4 samples) is a position: the next batch starts the next shard
    assert (loader.shard_index, loader.sample_index) == (1, 4)
    assert_batches_equal(take(loader, 1), take(DataLoader(pattern, B, T, VOCAB), 11)[10:])
    with pytest.raises(ValueError) as info:
        loader.restore(*position)
    assert assert_one_line(info, *names).startswith("loader position ")
    assert (loader.epoch, loader.epoch_samples, loader.shard_index, loader.sample_index) == (0, 11, 2, 1)  # unmoved


@pytest.mark.parametrize("kwargs", [dict(rank=2, num_processes=2), dict(rank=-1), dict(num_processes=0)])
def test_an_impossible_rank_is_a_value_error(tmp_path, kwargs):
    pattern, _ = write_shards(tmp_path)
    with pytest.raises(ValueError) as info:
        DataLoader(pattern, B, T, VOCAB, **kwargs)
    assert_one_line(info, *(f"{key}={value}" for key, value in kwargs.items()))


# ----------------------------------------------------------------------------
# a run's data layout, kept on another number of processes or micro-batch

def step_rows(loaders, grad_accum_steps):
    """Each loader's next step, as the multiset (sorted list) of its rows' first tokens; the shards'
    tokens are their positions, so a row's first token says which row it is."""
    return sorted(int(x) for loader in loaders for _ in range(grad_accum_steps) for x in loader.next_batch()[0][:, 0])


@pytest.mark.parametrize("processes, micro_batch", [(2, 3), (4, 3), (3, 4), (1, 12), (6, 1), (4, 1), (1, 1)])
def test_another_number_of_processes_reads_the_layout_s_rows_step_for_step(tmp_path, processes, micro_batch):
    """The layout: 2 processes of B=3, grad accumulation 2, 12 rows a step. Any processes x B that
    split 12 rows read exactly the layout's rows of every step, over three epochs, and from a
    restored position (samples into an epoch, as a state file records it) on as well."""
    lengths = (100, 66, 85)  # stride 2*3*T = 12 tokens: 8, 5 and 7 samples
    shards = np.split(np.arange(sum(lengths)), np.cumsum(lengths)[:-1])
    for i, tokens in enumerate(shards):
        ff.write_shard(tmp_path / f"shard_{i}.bin", tokens)
    pattern = str(tmp_path / "shard_*.bin")
    layout = [DataLoader(pattern, 3, 2, 1000, rank=r, num_processes=2, shuffle=True, grad_accum_steps=2)
              for r in range(2)]
    grad_accum = 12 // (processes * micro_batch)
    ours = [DataLoader(pattern, micro_batch, 2, 1000, rank=r, num_processes=processes, shuffle=True, layout=(2, 3),
                       grad_accum_steps=grad_accum) for r in range(processes)]
    assert layout[0].num_batches == 20
    for step in range(3 * 10):
        expected = step_rows(layout, 2)
        assert step_rows(ours, grad_accum) == expected, step
        assert len(set(expected)) == 12
    for loader in ours + layout:
        loader.restore(1, 13)
    for step in range(5):
        assert step_rows(ours, grad_accum) == step_rows(layout, 2), step
    assert {(loader.epoch, loader.epoch_samples) for loader in ours + layout} == {(2, 3)}  # 13 + 5 * 2 = 20 + 3


def test_a_step_that_does_not_share_out_as_the_layout_s_micro_batches_is_a_value_error(tmp_path):
    pattern, _ = write_shards(tmp_path)
    with pytest.raises(ValueError) as info:
        DataLoader(pattern, 1, T, VOCAB, rank=0, num_processes=3, layout=(2, 2))
    assert_one_line(info, "3 rows", "2 process(es) of B=2")

"""llm.c's distributed data loader over uint16 token shards.

Each step, every one of num_processes ranks reads its own B*T+1-token slice of one sample, a window of
num_processes*B*T+1 tokens, so the ranks together consume whole samples and never overlap. Shards are
visited in order, and the samples in each. With shuffle on, both orders are llm.c's, drawn as its
dataloader.h draws them from one mt19937 per rank seeded 42 + rank, so a run here and an llm.c run on the
same shards see the same batches step for step:
- each epoch starts by shuffling the shard order in place: the previous epoch's order, not the identity,
  is permuted (with one shard that draws nothing);
- each shard, when its turn comes, gets a fresh sample order: the identity, shuffled;
- a shuffle is Fisher-Yates from the last element down, swapping element i with element
  randint32() % (i + 1).
Each rank draws its own orders, as in llm.c: at one step the ranks read their slices of different
samples, and over an epoch each rank reads its slice of every sample once.
An epoch draws the same number of values whatever its orders (shards - 1, plus samples - 1 per shard),
so the generator's place at any (epoch, shard_index) is known, and the position (epoch, samples read in
it) is all that restoring the exact batch sequence needs: the orders are replayed from the seed.

The orders belong to the run, not to the processes that happen to read them: a run resumed on another
number of processes (or -b) keeps the layout it started with, (processes, B), whose ranks' orders are
replayed as they were. Each step, layout rank r's order gives its next grad_accum micro-batches of B
rows of T+1 tokens, as it would have, and the step's rows, layout rank by rank, are shared out in
order among the processes now running, grad_accum micro-batches each. So a resumed run reads, step
for step, the rows the run would have read had it never stopped: nothing in the epoch is repeated or
skipped.
"""
import dataclasses
import glob
import hashlib
import os

import numpy as np

from fileformats import FormatError, read_shard

SHUFFLE_SEED = 42  # llm.c seeds each rank's shuffle with 42 + rank


class DataLoader:
    """Rank `rank` of num_processes, reading grad_accum_steps micro-batches (B, T) a step, in the
    orders of `layout`: (processes, B) of the run's first start, by default this run's own."""

    def __init__(self, pattern, B, T, vocab_size, rank=0, num_processes=1, shuffle=False, layout=None,
                 grad_accum_steps=1):
        if min(B, T, num_processes, grad_accum_steps) < 1 or not 0 <= rank < num_processes:
            raise ValueError(f"need B, T, num_processes, grad_accum_steps >= 1 and 0 <= rank < num_processes, got "
                             f"B={B} T={T} rank={rank} num_processes={num_processes} "
                             f"grad_accum_steps={grad_accum_steps}")
        self.pattern = pattern
        self.files = sorted(glob.glob(os.fspath(pattern)))
        if not self.files:
            raise FormatError(pattern, "no file matches this pattern")
        self.B, self.T, self.rank, self.shuffle = B, T, rank, shuffle
        self.layout = layout or (num_processes, B)
        layout_processes, layout_B = self.layout
        step_rows = num_processes * B * grad_accum_steps
        if min(self.layout) < 1 or step_rows % (layout_processes * layout_B):
            raise ValueError(f"a step's {step_rows} rows do not share out as micro-batches of the data layout's "
                             f"{layout_processes} process(es) of B={layout_B}")
        self._layout_steps = step_rows // (layout_processes * layout_B)  # micro-batches of each order a step
        self._rows = (rank * B * grad_accum_steps, (rank + 1) * B * grad_accum_steps)  # this rank's of the step
        order_rows = self._layout_steps * layout_B
        self._order_ranks = range(self._rows[0] // order_rows, (self._rows[1] - 1) // order_rows + 1)
        self._stride = layout_processes * layout_B * T  # tokens between one sample's start and the next's

        # every header and length is checked now; token values, a whole read of the shard, only in the
        # first file now (a wrong tokenizer shows in every shard) and in each other on its first use, so a
        # 100B-token run does not read 200 GB before its first step
        self._tokens = [self._open_shard(path) for path in self.files]
        self._vocab_size, self._unchecked = vocab_size, set(range(len(self.files)))
        self._check_tokens(0)
        self._num_samples = [(len(tokens) - 1) // self._stride for tokens in self._tokens]
        self.num_tokens = sum(len(tokens) for tokens in self._tokens)
        self.num_batches = sum(self._num_samples)  # samples in an epoch, of each order

        self.inputs = np.empty((B, T), dtype=np.int32)
        self.targets = np.empty((B, T), dtype=np.int32)
        self.reset()

    def _open_shard(self, path):
        tokens = read_shard(path)
        needed = self._stride + 1
        if len(tokens) < needed:
            raise FormatError(path, f"holds {len(tokens)} tokens, fewer than one batch needs "
                                    f"(B*T*processes + 1 = {needed})")
        return tokens

    def _check_tokens(self, shard):
        if shard in self._unchecked:
            tokens, vocab_size = self._tokens[shard], self._vocab_size
            if int(tokens.max()) >= vocab_size:
                i = int(np.argmax(tokens >= vocab_size))  # the first offender, the one to look for in the data
                raise FormatError(self.files[shard], f"token {tokens[i]} at position {i} is not below the "
                                                     f"vocab size {vocab_size}")
            self._unchecked.remove(shard)

    @property
    def data_fingerprint(self):
        """What a data position means here: (shards, tokens, a hash of each shard's length in order)."""
        lengths = np.array([len(tokens) for tokens in self._tokens], dtype="<i8")
        digest = hashlib.sha256(lengths.tobytes()).digest()
        return len(self.files), self.num_tokens, int.from_bytes(digest[:8], "little", signed=True)

    # where the data stands: all of the layout's orders read the same number of samples, so one tells
    @property
    def epoch(self):
        return self._order().epoch

    @property
    def epoch_samples(self):
        """Samples each order has read in the current epoch."""
        order = self._order()
        return sum(self._num_samples[k] for k in order.shard_order[:order.shard_index]) + order.sample_index

    @property
    def shard_index(self):
        return self._order().shard_index

    @property
    def sample_index(self):
        return self._order().sample_index

    def _order(self):
        return self._orders[self._order_ranks[0]]

    def reset(self):
        self.restore(0, 0)

    def restore(self, epoch, samples):
        """Go to `samples` samples into `epoch`, in every order, each replayed from its seed."""
        if epoch < 0:
            raise ValueError(f"loader position epoch {epoch} is out of range: epochs count up from 0")
        if not 0 <= samples <= self.num_batches:
            raise ValueError(f"loader position sample {samples} is out of range 0..{self.num_batches}: an epoch of "
                             f"{self.pattern} ({len(self.files)} shards) holds {self.num_batches} samples")
        self._orders = {r: self._replay(r, epoch, samples) for r in self._order_ranks}
        self._step_rows, self._next_row = [], 0

    def next_batch(self):
        """Fill and return (inputs, targets), each (B, T) int32; the same arrays every call, overwritten."""
        if self._next_row == len(self._step_rows):
            self._read_step()
        rows = self._step_rows[self._next_row:self._next_row + self.B]
        self._next_row += self.B
        for i, (shard, start) in enumerate(rows):
            window = self._tokens[shard][start:start + self.T + 1]  # (T + 1,) view of the memmap
            np.copyto(self.inputs[i], window[:-1])
            np.copyto(self.targets[i], window[1:])
        return self.inputs, self.targets

    def _read_step(self):
        """The (shard, first token) of each row this rank reads in the next step: of the step's rows,
        layout rank by rank (each its order's next micro-batches), the span self._rows."""
        layout_B, T = self.layout[1], self.T
        first, last = self._rows
        self._step_rows, self._next_row = [], 0
        for r in self._order_ranks:
            for j in range(self._layout_steps):
                shard, sample = self._next_sample(self._orders[r])
                start = sample * self._stride + r * layout_B * T  # layout rank r's slice of the sample
                row = (r * self._layout_steps + j) * layout_B
                self._step_rows += [(shard, start + i * T) for i in range(max(first - row, 0), min(last - row, layout_B))]

    def _next_sample(self, order):
        if order.sample_index == len(order.sample_order):
            order.shard_index, order.sample_index = order.shard_index + 1, 0
            if order.shard_index == len(self.files):
                order.epoch, order.shard_index = order.epoch + 1, 0
                self._shuffle(order.shard_order, order.rng)
            order.sample_order = self._new_sample_order(order.shard_order[order.shard_index], order.rng)
        shard = order.shard_order[order.shard_index]
        self._check_tokens(shard)
        order.sample_index += 1
        return shard, order.sample_order[order.sample_index - 1]

    def _replay(self, rank, epoch, samples):
        """Layout rank `rank`'s order as it stands `samples` samples into `epoch`, replayed from its
        seed: every earlier epoch's shard shuffle is redone (each permutes the last), the sample
        shuffles in between are skipped over by their known draw counts. At a shard's last sample
        it stays there, as the loader does until its next batch."""
        rng = mt19937(SHUFFLE_SEED + rank) if self.shuffle else None
        shard_order = np.arange(len(self.files))
        for e in range(epoch + 1):
            if e:
                skip(rng, sum(n - 1 for n in self._num_samples))
            self._shuffle(shard_order, rng)
        ends = np.cumsum([self._num_samples[k] for k in shard_order])
        shard_index = int(np.searchsorted(ends, samples))  # the shard whose samples include the samples-th
        skip(rng, sum(self._num_samples[k] - 1 for k in shard_order[:shard_index]))
        return _Order(rng, shard_order, self._new_sample_order(shard_order[shard_index], rng), epoch, shard_index,
                      samples - (int(ends[shard_index - 1]) if shard_index else 0))

    def _new_sample_order(self, shard, rng):
        order = np.arange(self._num_samples[shard])
        self._shuffle(order, rng)
        return order

    @staticmethod
    def _shuffle(order, rng):
        if rng is not None:
            random_permutation(order, rng)


@dataclasses.dataclass
class _Order:
    """One layout rank's walk through the shards: its generator, the epoch's shard order, the
    current shard's sample order, and where it stands."""
    rng: object
    shard_order: np.ndarray
    sample_order: np.ndarray
    epoch: int
    shard_index: int
    sample_index: int


def mt19937(seed):
    """NumPy's MT19937 seeded as llm.c's manual_seed (the reference init_genrand) seeds it; its random_raw
    then gives llm.c's randint32 stream. (NumPy's own seeding hashes the seed, a different stream.)"""
    key = [seed & 0xFFFFFFFF]
    for i in range(1, 624):
        key.append((1812433253 * (key[-1] ^ (key[-1] >> 30)) + i) & 0xFFFFFFFF)
    rng = np.random.MT19937()
    rng.state = {"bit_generator": "MT19937", "state": {"key": np.array(key, dtype=np.uint32), "pos": 624}}
    return rng


def random_permutation(order, rng):
    """llm.c's random_permutation, in place: for i from n-1 down to 1, swap order[i] with order[j],
    j = randint32() % (i + 1). Draws n - 1 values."""
    n = len(order)
    if n < 2:
        return
    js = (rng.random_raw(n - 1) % np.arange(n, 1, -1, dtype=np.uint64)).tolist()
    values = order.tolist()
    for i, j in zip(range(n - 1, 0, -1), js):
        values[i], values[j] = values[j], values[i]
    order[:] = values


def skip(rng, count, chunk=1 << 20):
    """Draw and drop `count` values (in chunks, so a long skip needs no memory)."""
    if rng is None:
        return
    while count > 0:
        rng.random_raw(min(count, chunk))
        count -= chunk

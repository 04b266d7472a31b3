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
so the generator's place at any (epoch, shard_index) is known, and the position (epoch, shard_index,
sample_index) is all that restoring the exact batch sequence needs: the orders are replayed from the seed.
"""
import glob
import os

import numpy as np

from fileformats import FormatError, read_shard

SHUFFLE_SEED = 42  # llm.c seeds each rank's shuffle with 42 + rank


class DataLoader:
    def __init__(self, pattern, B, T, vocab_size, rank=0, num_processes=1, shuffle=False):
        if min(B, T, num_processes) < 1 or not 0 <= rank < num_processes:
            raise ValueError(f"need B, T, num_processes >= 1 and 0 <= rank < num_processes, "
                             f"got B={B} T={T} rank={rank} num_processes={num_processes}")
        self.pattern = pattern
        self.files = sorted(glob.glob(os.fspath(pattern)))
        if not self.files:
            raise FormatError(pattern, "no file matches this pattern")
        self.B, self.T, self.rank, self.num_processes, self.shuffle = B, T, rank, num_processes, shuffle
        self._stride = num_processes * B * T  # tokens between one sample's start and the next's

        # every header and length is checked now; token values, a whole read of the shard, only in the
        # first file now (a wrong tokenizer shows in every shard) and in each other on its first use, so a
        # 100B-token run does not read 200 GB before its first step
        self._tokens = [self._open_shard(path) for path in self.files]
        self._vocab_size, self._unchecked = vocab_size, set(range(len(self.files)))
        self._check_tokens(0)
        self._num_samples = [(len(tokens) - 1) // self._stride for tokens in self._tokens]
        self.num_tokens = sum(len(tokens) for tokens in self._tokens)
        self.num_batches = sum(self._num_samples)

        self.inputs = np.empty((B, T), dtype=np.int32)
        self.targets = np.empty((B, T), dtype=np.int32)
        self._seed = SHUFFLE_SEED + rank
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

    def reset(self):
        self.epoch, self.shard_index, self.sample_index = 0, 0, 0
        self._rng, self._shard_order, self._sample_order = self._replay(0, 0)

    def restore(self, epoch, shard_index, sample_index):
        num_shards = len(self.files)
        if epoch < 0:
            raise ValueError(f"loader position epoch {epoch} is out of range: epochs count up from 0")
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"loader position shard {shard_index} is out of range 0..{num_shards - 1}: "
                             f"{self.pattern} matches {num_shards} shards")
        rng, shard_order, sample_order = self._replay(epoch, shard_index)
        count = len(sample_order)
        if not 0 <= sample_index <= count:
            raise ValueError(f"loader position sample {sample_index} is out of range 0..{count}: "
                             f"shard position {shard_index} of epoch {epoch} holds {count} samples")
        self.epoch, self.shard_index, self.sample_index = epoch, shard_index, sample_index
        self._rng, self._shard_order, self._sample_order = rng, shard_order, sample_order

    def next_batch(self):
        """Fill and return (inputs, targets), each (B, T) int32; the same arrays every call, overwritten."""
        if self.sample_index == len(self._sample_order):
            self.shard_index, self.sample_index = self.shard_index + 1, 0
            if self.shard_index == len(self.files):
                self.epoch, self.shard_index = self.epoch + 1, 0
                self._shuffle(self._shard_order, self._rng)
            self._sample_order = self._new_sample_order(self._shard_order[self.shard_index], self._rng)
        shard = self._shard_order[self.shard_index]
        self._check_tokens(shard)
        sample = self._sample_order[self.sample_index]
        self.sample_index += 1

        start = sample * self._stride + self.rank * self.B * self.T
        window = self._tokens[shard][start:start + self.B * self.T + 1]  # (B*T + 1,) view of the memmap
        np.copyto(self.inputs, window[:-1].reshape(self.B, self.T))
        np.copyto(self.targets, window[1:].reshape(self.B, self.T))
        return self.inputs, self.targets

    def _replay(self, epoch, shard_index):
        """The generator, shard order and sample order as they stand once shard position `shard_index` of
        `epoch` has been entered, replayed from the seed: every earlier epoch's shard shuffle is redone (each
        permutes the last), the sample shuffles in between are skipped over by their known draw counts."""
        rng = mt19937(self._seed) if self.shuffle else None
        shard_order = np.arange(len(self.files))
        for e in range(epoch + 1):
            if e:
                skip(rng, sum(n - 1 for n in self._num_samples))
            self._shuffle(shard_order, rng)
        skip(rng, sum(self._num_samples[k] - 1 for k in shard_order[:shard_index]))
        return rng, shard_order, self._new_sample_order(shard_order[shard_index], rng)

    def _new_sample_order(self, shard, rng):
        order = np.arange(self._num_samples[shard])
        self._shuffle(order, rng)
        return order

    @staticmethod
    def _shuffle(order, rng):
        if rng is not None:
            random_permutation(order, rng)


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

"""llm.c's distributed data loader over uint16 token shards.

Each step, every one of num_processes ranks reads its own B*T+1-token slice of one sample, a window of
num_processes*B*T+1 tokens, so the ranks together consume whole samples and never overlap. Shards are
visited in order, and the samples in each; with shuffle on, both orders are permutations drawn from
counter-based generators keyed by (seed, epoch, shard position), so the position (epoch, shard_index,
sample_index) is the loader's whole state and restoring it resumes the exact batch sequence.
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

        # every shard is checked now, so a bad one fails before training rather than hours into it
        self._tokens = [self._open_shard(path, vocab_size) for path in self.files]
        self._num_samples = [(len(tokens) - 1) // self._stride for tokens in self._tokens]
        self.num_tokens = sum(len(tokens) for tokens in self._tokens)
        self.num_batches = sum(self._num_samples)

        self.inputs = np.empty((B, T), dtype=np.int32)
        self.targets = np.empty((B, T), dtype=np.int32)
        self._seed = SHUFFLE_SEED + rank
        self._shard_order_key = self._sample_order_key = None
        self.reset()

    def _open_shard(self, path, vocab_size):
        tokens = read_shard(path)
        needed = self._stride + 1
        if len(tokens) < needed:
            raise FormatError(path, f"holds {len(tokens)} tokens, fewer than one batch needs "
                                    f"(B*T*processes + 1 = {needed})")
        if int(tokens.max()) >= vocab_size:
            i = int(np.argmax(tokens >= vocab_size))  # the first offender, the one to look for in the data
            raise FormatError(path, f"token {tokens[i]} at position {i} is not below the vocab size {vocab_size}")
        return tokens

    def reset(self):
        self.epoch, self.shard_index, self.sample_index = 0, 0, 0

    def restore(self, epoch, shard_index, sample_index):
        num_shards = len(self.files)
        if epoch < 0:
            raise ValueError(f"loader position epoch {epoch} is out of range: epochs count up from 0")
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"loader position shard {shard_index} is out of range 0..{num_shards - 1}: "
                             f"{self.pattern} matches {num_shards} shards")
        count = self._num_samples[self._shard_order(epoch)[shard_index]]
        if not 0 <= sample_index <= count:
            raise ValueError(f"loader position sample {sample_index} is out of range 0..{count}: "
                             f"shard position {shard_index} of epoch {epoch} holds {count} samples")
        self.epoch, self.shard_index, self.sample_index = epoch, shard_index, sample_index

    def next_batch(self):
        """Fill and return (inputs, targets), each (B, T) int32; the same arrays every call, overwritten."""
        if self.sample_index == self._num_samples[self._current_shard()]:
            self.shard_index, self.sample_index = self.shard_index + 1, 0
            if self.shard_index == len(self.files):
                self.epoch, self.shard_index = self.epoch + 1, 0
        shard = self._current_shard()
        sample = self._sample_order(shard)[self.sample_index]
        self.sample_index += 1

        start = sample * self._stride + self.rank * self.B * self.T
        window = self._tokens[shard][start:start + self.B * self.T + 1]  # (B*T + 1,) view of the memmap
        np.copyto(self.inputs, window[:-1].reshape(self.B, self.T))
        np.copyto(self.targets, window[1:].reshape(self.B, self.T))
        return self.inputs, self.targets

    def _current_shard(self):
        return self._shard_order(self.epoch)[self.shard_index]

    def _shard_order(self, epoch):
        if self._shard_order_key != epoch:
            self._shard_order_key = epoch
            self._shard_order_cache = self._permutation(len(self.files), epoch)
        return self._shard_order_cache

    def _sample_order(self, shard):
        key = (self.epoch, self.shard_index)
        if self._sample_order_key != key:
            self._sample_order_key = key
            self._sample_order_cache = self._permutation(self._num_samples[shard], *key)
        return self._sample_order_cache

    def _permutation(self, n, *counter):
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self._seed, *counter]).permutation(n)

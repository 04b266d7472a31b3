"""Fixtures shared by the test files that run a trainer end to end."""
import numpy as np
import pytest

from fileformats import write_shard


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """Two train shards (so shuffling reorders shards and samples) and a val shard of seeded random
    tokens, skewed so a model can learn them: the -i and -j flags that read them."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    vocab = rng.choice(50257, size=300, replace=False)
    weights = 1.0 / np.arange(1, 301)
    draw = lambda n: vocab[rng.choice(300, size=n, p=weights / weights.sum())]  # noqa: E731
    write_shard(d / "train_000001.bin", draw(3001))
    write_shard(d / "train_000002.bin", draw(2500))
    write_shard(d / "val_000000.bin", draw(1200))
    return ["-i", str(d / "train_*.bin"), "-j", str(d / "val_000000.bin")]

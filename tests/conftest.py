"""Fixtures shared by the test files: the data a trainer runs on end to end, and kernel folders of
the tests' own."""
import shutil

import numpy as np
import pytest

from fileformats import write_shard
from kernels import KERNEL_DIR


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


@pytest.fixture(scope="session")
def kernel_folder():
    """make(root, **sources): a kernels folder at root holding the repository's headers and emulator
    and the sources given (stem=CUDA text), for kernels.build and kernels.build_emulated once
    kernels.KERNEL_DIR points there."""
    def make(root, **sources):
        for header in KERNEL_DIR.glob("*.cuh"):
            shutil.copy(header, root)
        shutil.copytree(KERNEL_DIR / "emulator", root / "emulator", ignore=shutil.ignore_patterns("__pycache__"))
        for stem, text in sources.items():
            (root / f"{stem}.cu").write_text(text)
        return root
    return make

"""The NCCL communicator on a GPU, at world size 1 (the lent machine has one GPU; NCCL refuses two
ranks on one device): training steps through it, -z 0 and -z 1, must give the bits of the plain
path, whose collectives are the identity."""
import socket

import numpy as np
import pytest

import distributed
import train_gpt2 as gpt
from cuda_testing import requires_gpu

pytestmark = requires_gpu

B, T, ACCUM, STEPS = 4, 64, 2, 3


class Batches:
    """The loader's interface over fixed random tokens."""

    def __init__(self, seed):
        rng = np.random.default_rng(seed)
        self.tokens = rng.integers(0, 50257, size=(ACCUM, B, T + 1)).astype(np.int32)
        self.i = 0

    def next_batch(self):
        batch = self.tokens[self.i % ACCUM]
        self.i += 1
        return np.ascontiguousarray(batch[:, :-1]), np.ascontiguousarray(batch[:, 1:])


def train(comm, zero_stage):
    from kernels import cuda as K
    config = gpt.config_from_descriptor("d4")
    model = gpt.GPT2(config, gpt.init_params(config), B, T, K, world_size=1, rank=0, zero_stage=zero_stage)
    loader, history = Batches(0), []
    for step in range(STEPS):
        loss, norm = gpt.gradients(model, comm, loader, ACCUM)
        gpt.update(model, 1e-3, 0.1, step, K.clip_scale(norm, gpt.GRAD_CLIP), seed=step + 1)
        if zero_stage == 1:
            comm.all_gather(model.params)
        history.append((loss, norm))
    return history, model.params.get()


def nccl_at_world_size_1():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return distributed.Nccl(distributed.Process(0, 1, 0, "test"), ("tcp", "127.0.0.1", port), timeout=30)


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_training_through_nccl_changes_no_bit(zero_stage):
    solo = distributed.Solo(distributed.Process(0, 1, 0, "test"))
    plain_history, plain_params = train(solo, zero_stage)
    nccl_history, nccl_params = train(nccl_at_world_size_1(), zero_stage)
    assert nccl_history == plain_history
    np.testing.assert_array_equal(nccl_params, plain_params)


def test_nccl_sum_and_barrier():
    comm = nccl_at_world_size_1()
    np.testing.assert_array_equal(comm.sum([1.5, -2.25, 1e300]), [1.5, -2.25, 1e300])
    comm.barrier()

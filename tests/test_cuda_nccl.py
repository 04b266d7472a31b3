"""The NCCL communicator (distributed.Nccl).

On the CPU: CuPy's NCCL binding checks the type of every argument before NCCL runs, so the
communicator's start-up is checked against the real binding without a GPU.

On a GPU, at world size 1 (the lent machine has one GPU; NCCL refuses two ranks on one device):
training steps through NCCL, -z 0 and -z 1, must give the bits of the plain path, whose collectives
are the identity; and the shard each rank of a larger world would hand NCCL (its offset, count and
type) must be the layout the CPU tests prove on gloo (tests/test_distributed.py)."""
import socket

import numpy as np
import pytest

import distributed
import train_gpt2 as gpt
from cuda_testing import backend, on_gpu

B, T, ACCUM, STEPS = 4, 64, 2, 3


def nccl_at_world_size_1():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return distributed.Nccl(distributed.Process(0, 1, 0, "test"), ("tcp", "127.0.0.1", port), timeout=30)


def test_the_nccl_binding_takes_the_unique_id_as_the_communicator_hands_it():
    """CuPy 14 gives the id as bytes and takes bytes; a tuple of ints (CuPy 9-13's form) is a
    TypeError from the binding. Without a GPU, NCCL itself then fails to find a device: that error
    means the binding accepted every argument."""
    nccl = pytest.importorskip("cupy.cuda.nccl", reason="CuPy's NCCL binding needs cupy-cuda13x and nvidia-nccl-cu13")
    try:
        nccl_at_world_size_1()
    except nccl.NcclError as e:  # no usable GPU here: past the binding, in NCCL
        assert "CUDA" in str(e) or "cuda" in str(e), e


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
    K = backend("gpu")
    config = gpt.config_from_descriptor("d4")
    model = gpt.GPT2(config, gpt.init_params(config), B, T, K, world_size=1, rank=0, zero_stage=zero_stage)
    loader, history = Batches(0), []
    for step in range(STEPS):
        loss, norm = gpt.gradients(model, comm, loader, ACCUM)
        gpt.update(model, 1e-3, 0.1, step, K.clip_scale(norm, gpt.GRAD_CLIP), seed=step + 1)
        if zero_stage == 1:
            comm.all_gather(model.params_memory)
        history.append((loss, norm))
    return history, K.device.download(model.params_memory)


@on_gpu
@pytest.mark.parametrize("zero_stage", [0, 1])
def test_training_through_nccl_changes_no_bit(zero_stage):
    solo = distributed.Solo(distributed.Process(0, 1, 0, "test"))
    plain_history, plain_params = train(solo, zero_stage)
    nccl_history, nccl_params = train(nccl_at_world_size_1(), zero_stage)
    assert nccl_history == plain_history
    np.testing.assert_array_equal(nccl_params, plain_params)


@on_gpu
def test_nccl_sum_and_barrier():
    comm = nccl_at_world_size_1()
    np.testing.assert_array_equal(comm.sum([1.5, -2.25, 1e300]), [1.5, -2.25, 1e300])
    comm.barrier()


class Recorder:
    """NCCL's communicator in name: records each call's arguments instead of running it."""

    def __init__(self):
        self.calls = []

    def reduceScatter(self, send, recv, count, dtype, op, stream):  # noqa: N802 (NCCL's names)
        self.calls.append(("reduce_scatter", send, recv, count, dtype))

    def allGather(self, send, recv, count, dtype, stream):  # noqa: N802
        self.calls.append(("all_gather", send, recv, count, dtype))


@on_gpu
@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_every_rank_hands_nccl_its_own_padded_shard_of_the_flat_buffers(world_size):
    """For each rank of a world of world_size: the model's padded bf16 gradient and parameter buffers
    (d4, whose parameter count no world size here divides), and what reduce-scatter and all-gather are
    given: the whole buffer, and the rank's shard at its offset (optimizer_range's, which
    tests/test_distributed.py proves over gloo), count shard_size, type ncclBfloat16."""
    K = backend("gpu")
    config = gpt.config_from_descriptor("d4")
    n = gpt.num_parameters(config)
    comm = nccl_at_world_size_1()
    for rank in range(world_size):
        model = gpt.GPT2(config, gpt.init_params(config), 1, 8, K, world_size=world_size, rank=rank, zero_stage=1)
        assert model.params_memory.size % world_size == 0 and model.params_memory.size >= n
        comm.rank, comm.world_size, comm.comm = rank, world_size, Recorder()
        comm.reduce_scatter(model.grads_memory)
        comm.all_gather(model.params_memory)
        lo, hi = gpt.optimizer_range(n, world_size, rank, zero_stage=1)
        size = distributed.shard_size(n, world_size)
        assert lo == rank * size and hi - lo <= size
        grads, params = K.device.pointer(model.grads_memory), K.device.pointer(model.params_memory)
        assert comm.comm.calls == [("reduce_scatter", grads, grads + 2 * lo, size, 9),
                                   ("all_gather", params + 2 * lo, params, size, 9)]

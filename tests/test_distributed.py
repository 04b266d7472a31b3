"""Several processes, for real, on the CPU: the NumPy backend over gloo, started by our launcher, by
torchrun, and by hand as srun and mpirun start them. The reference for every multi-process run is
the one-process run with the same total batch; ZeRO-1 is checked against ZeRO-0 bit for bit."""
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import train_gpt2 as gpt
import distributed
import rundir
from dataloader import DataLoader
from fileformats import GPT2Config, num_parameters, param_shapes, read_model, read_state, write_shard, write_state

REPO = Path(__file__).resolve().parents[1]
# 1 layer, C=64; -a 1 trains every step on the first 256 tokens, so every world size sees the same
# tokens; warmup, weight decay, and a learning rate high enough that the clip engages (norm > 1)
SAME_TOKENS = ["-e", "d1", "-b", "2", "-t", "32", "-s", "0", "-a", "1", "-x", "6", "-d", "256", "-l", "1e-2",
               "-u", "2", "-c", "0.1", "-v", "0", "-n", "6", "--device", "cpu"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra):
    """This environment without any launcher's rank variables, plus extra."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "SLURM_", "OMPI_", "PMI_", "TORCHELASTIC"))}
    env["OMP_NUM_THREADS"] = "1"
    return {**env, **extra}


def train(*args, cwd, env=None, prefix=(), check=True, timeout=300):
    result = subprocess.run([*prefix, *([sys.executable, str(REPO / "train_gpt2.py")] if not prefix else []), *args],
                            cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def step_lines(stdout):
    """The step lines without their timings."""
    return [line.split(" ms |")[0].rsplit("|", 1)[0] for line in stdout.splitlines() if line.startswith("step")]


def losses(stdout):
    return np.array([float(line.split("| loss ")[1].split()[0]) for line in step_lines(stdout)])


def error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr[-2000:]
    return lines[-1]


# ----------------------------------------------------------------------------- shards

def tiny_config():
    return GPT2Config(max_seq_len=8, vocab_size=10, num_layers=2, num_heads=2, channels=8, padded_vocab_size=16)


@pytest.mark.parametrize("n", [1, 7, 64, 1001, 124_475_904])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7, 8])
def test_shards_cover_every_element_once(n, world_size):
    spans = [gpt.optimizer_range(n, world_size, rank, zero_stage=1) for rank in range(world_size)]
    covered = np.zeros(min(n, 2000), dtype=int) if n <= 2000 else None
    total = 0
    for rank, (lo, hi) in enumerate(spans):
        assert 0 <= lo <= hi <= n
        assert hi - lo <= math.ceil(n / world_size)
        total += hi - lo
        if covered is not None:
            covered[lo:hi] += 1
    assert total == n
    assert all(spans[r][1] <= spans[r + 1][0] or spans[r + 1][0] == spans[r + 1][1] for r in range(world_size - 1))
    if covered is not None:
        assert (covered == 1).all()
    assert gpt.optimizer_range(n, world_size, 0, zero_stage=0) == (0, n)


class RecordingAdamW:
    """A backend whose adamw records which element of which tensor each call updates."""
    FLOAT = np.float32
    zeros = staticmethod(np.zeros)

    def __init__(self):
        self.calls = []

    def upload(self, dst, src):
        dst[...] = src

    def adamw(self, params, grads, m, v, master, t, lr, beta1, beta2, eps, weight_decay, grad_scale, seed, offset):
        self.calls.append((seed >> 32, offset, params, grads, m, weight_decay))


@pytest.mark.parametrize("world_size", [3, 5, 7])
def test_zero1_updates_every_parameter_exactly_once_with_its_tensors_decay_and_index(world_size):
    config = tiny_config()
    n = num_parameters(config)
    assert n % world_size  # shards that do not divide the model
    shapes = param_shapes(config)
    sizes = [math.prod(shape) for shape in shapes.values()]
    starts = np.cumsum([0] + sizes)
    updated = [np.zeros(size, dtype=int) for size in sizes]
    for rank in range(world_size):
        K = RecordingAdamW()
        model = gpt.GPT2(config, np.arange(n, dtype=np.float32), 1, 2, K, world_size=world_size, rank=rank,
                         zero_stage=1)
        gpt.update(model, 1e-3, 0.1, 0, 1.0, seed=5)
        for i, offset, params, grads, m, decay in K.calls:
            name = list(shapes)[i]
            # the values are the flat indices: the slice is where the tensor index and offset say
            np.testing.assert_array_equal(params, np.arange(starts[i] + offset, starts[i] + offset + params.size))
            assert np.shares_memory(grads, model.grads_memory) and m.size == params.size
            assert np.shares_memory(m, model.m_memory)
            assert decay == (0.1 if name in gpt.DECAYED else 0.0)
            updated[i][offset:offset + params.size] += 1
    for name, counts in zip(shapes, updated):
        assert (counts == 1).all(), name


@pytest.mark.parametrize("descriptor, published", [("d12", 124_475_904), ("d48", 1_557_686_400)])
def test_zero1_keeps_an_eighth_of_the_optimizer_state_per_rank_at_8_ranks(descriptor, published):
    """llm.c's parameter counts (with the padded vocab) for GPT-2 124M and 1558M; m, v and the
    master weights are fp32, 12 bytes per parameter on one rank."""
    n = num_parameters(gpt.config_from_descriptor(descriptor))
    assert n == published
    one_rank_bytes = 12 * n
    per_rank = [12 * (hi - lo) for hi, lo in
                (reversed(gpt.optimizer_range(n, 8, rank, zero_stage=1)) for rank in range(8))]
    assert sum(per_rank) == one_rank_bytes
    assert max(per_rank) <= one_rank_bytes / 8 + 12 * 7  # an eighth, up to the padding of one shard


# ----------------------------------------------------------------------------- training on several processes

@pytest.fixture(scope="module")
def same_tokens(data, tmp_path_factory):
    """The SAME_TOKENS run on 1 process (grad accumulation 4), and on 2 and 4 (built-in launcher)
    with -z 0 and -z 1: {(processes, zero): (stdout, run dir)}; and under "split", one process
    with -b 1 (grad accumulation 8), the control for test_several_processes_train_as_one."""
    cwd = tmp_path_factory.mktemp("same_tokens")
    runs = {}
    for nproc, zero in [(1, 0), (2, 0), (2, 1), (4, 0), (4, 1)]:
        out = f"log_{nproc}_{zero}"
        result = train(*SAME_TOKENS, *data, "-pn", str(nproc), "-z", str(zero), "-o", out, cwd=cwd)
        runs[nproc, zero] = (result.stdout, cwd / out)
    result = train(*SAME_TOKENS, *data, "-b", "1", "-o", "log_split", cwd=cwd)
    runs["split"] = (result.stdout, cwd / "log_split")
    return runs


def parameter_gaps(run_dir, reference_dir):
    """|parameters - reference's| after the SAME_TOKENS run, without the key bias: its gradient is
    zero but for rounding (softmax ignores a constant added to a row's scores), so there AdamW's
    m / sqrt(v) is noise and two runs agree only to the largest movement, lr * steps (checked
    apart). Returns (the gaps elsewhere, the key bias's gaps)."""
    config, ours = read_model(run_dir / "model_00000006.bin")
    _, reference = read_model(reference_dir / "model_00000006.bin")
    key_bias = np.zeros(ours.size, dtype=bool)
    gpt.carve(key_bias, param_shapes(config))["qkvb"][:, config.channels:2 * config.channels] = True
    diff = np.abs(ours - reference)
    return diff[~key_bias], diff[key_bias]


@pytest.mark.parametrize("nproc, zero", [(2, 0), (2, 1), (4, 0), (4, 1)])
def test_several_processes_train_as_one_with_the_same_total_batch(same_tokens, nproc, zero):
    one_stdout, one_dir = same_tokens[1, 0]
    stdout, run_dir = same_tokens[nproc, zero]
    assert f"processes: {nproc}" in stdout and f"ZeRO-{zero}" in stdout
    assert len(losses(stdout)) == 6
    np.testing.assert_allclose(losses(stdout), losses(one_stdout), rtol=2e-6)
    norms = [float(line.split("| norm ")[1].split()[0]) for line in step_lines(one_stdout)]
    assert max(norms) > gpt.GRAD_CLIP  # the clip took part
    # The sums over ranks round differently from one rank's, and AdamW magnifies a gradient's
    # rounding where the gradient is small: how far that goes depends on the BLAS kernels' order of
    # summation, so on the machine. The yardstick is measured here, on the same machine: one
    # process splitting the same batch into -b 1 micro-steps instead of -b 2, which changes nothing
    # but the order of the sums. Several processes must stay as close to one as that (a wrong
    # shard, offset or average moves every parameter by up to lr per step, about 1e-2).
    gaps, key_gaps = parameter_gaps(run_dir, one_dir)
    split_gaps, _ = parameter_gaps(same_tokens["split"][1], one_dir)
    assert split_gaps.max() > 0  # the yardstick measured some rounding at all
    for q in (0.99, 0.9999, 1.0):
        assert np.quantile(gaps, q) <= 2 * np.quantile(split_gaps, q), (q, np.quantile(gaps, q),
                                                                        np.quantile(split_gaps, q))
    assert np.mean(gaps <= 1e-6) > 0.99
    assert key_gaps.max() <= 1e-2 * 6


@pytest.mark.parametrize("nproc", [2, 4])
def test_zero1_gives_the_parameters_of_zero0_bit_for_bit(same_tokens, nproc):
    (z0_stdout, z0_dir), (z1_stdout, z1_dir) = same_tokens[nproc, 0], same_tokens[nproc, 1]
    assert step_lines(z0_stdout) == step_lines(z1_stdout)
    assert (z0_dir / "model_00000006.bin").read_bytes() == (z1_dir / "model_00000006.bin").read_bytes()


def test_each_rank_writes_its_shard_of_the_state(same_tokens):
    _, run_dir = same_tokens[4, 1]
    n = num_parameters(gpt.config_from_descriptor("d1"))
    names = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("state_"))
    assert names == [f"state_00000006_{rank:05d}.bin" for rank in range(4)]
    for rank in range(4):
        lo, hi = gpt.optimizer_range(n, 4, rank, zero_stage=1)
        state = read_state(run_dir / names[rank], hi - lo)
        assert (state.num_processes, state.rank) == (4, rank)
    assert {p.name for p in run_dir.iterdir()} >= {"main.log", "model_00000006.bin", "DONE_00000006"}


def test_the_banner_shows_zero1_memory_per_rank(same_tokens):
    def adamw_mib(stdout):
        return float(stdout.split("AdamW m+v ")[1].split()[0])
    assert adamw_mib(same_tokens[4, 1][0]) == pytest.approx(adamw_mib(same_tokens[1, 0][0]) / 4, abs=0.1)
    assert adamw_mib(same_tokens[4, 0][0]) == adamw_mib(same_tokens[1, 0][0])


def test_three_ranks_pad_the_last_shard_and_train_as_one(data, tmp_path):
    """d1's 3,335,104 parameters do not split in 3: the buffers are padded, the model file is not."""
    assert num_parameters(gpt.config_from_descriptor("d1")) % 3
    cmd = [*SAME_TOKENS, *data, "-x", "3", "-d", "192", "-n", "3"]
    one = train(*cmd, "-o", "one", cwd=tmp_path)
    three = train(*cmd, "-pn", "3", "-z", "1", "-o", "three", cwd=tmp_path)
    np.testing.assert_allclose(losses(three.stdout), losses(one.stdout), rtol=2e-6)
    _, ours = read_model(tmp_path / "three/model_00000003.bin")
    _, reference = read_model(tmp_path / "one/model_00000003.bin")
    assert ours.size == reference.size
    assert np.mean(np.abs(ours - reference) <= 1e-6) > 0.9999


def test_resume_with_two_ranks_and_zero1_is_bit_exact(data, tmp_path):
    """Shuffled data, checkpoints every 4 steps: stopped after step 4 and resumed with -y 1, the run
    ends with the same files as one that never stopped."""
    cmd = ["-e", "d1", "-b", "2", "-t", "32", "-s", "0", "-x", "8", "-d", "128", "-l", "1e-3", "-u", "2", "-c",
           "0.1", "-v", "4", "-m", "2", "-n", "4", "--device", "cpu", "-pn", "2", "-z", "1", *data]
    straight = train(*cmd, "-o", "a", cwd=tmp_path)
    train(*cmd, "-x", "4", "-o", "b", cwd=tmp_path)  # a run told to stop at 4 writes the same step-4 files
    assert not (tmp_path / "b/DONE_00000008").exists()
    resumed = train(*cmd, "-o", "b", "-y", "1", cwd=tmp_path)
    assert step_lines(resumed.stdout) == step_lines(straight.stdout)[4:]
    for name in ["model_00000008.bin", "state_00000008_00000.bin", "state_00000008_00001.bin", "main.log"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


# ----------------------------------------------------------------------------- elastic: resume on another count

# A child that runs the trainer and records, per rank, the first token of every row each train
# micro-batch holds (the shards' tokens are their positions, so a row says where it was), and the
# AdamW m and v the rank holds when its first step begins
RECORDER = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {repo!r})
    import numpy as np
    import cli, train_gpt2 as gpt
    from dataloader import DataLoader
    out, argv, rank = sys.argv[1], sys.argv[2:], os.environ.get("RANK", "0")
    rows, next_batch, gradients = [], DataLoader.next_batch, gpt.gradients

    def recording(loader):
        inputs, targets = next_batch(loader)
        if loader.shuffle:  # the train loader's
            rows.append(inputs[:, 0].tolist())
        return inputs, targets

    def first_held(model, *args):
        if not os.path.exists(f"{{out}}_held_{{rank}}.npz"):
            np.savez(f"{{out}}_held_{{rank}}.npz", m=model.K.download(model.m_memory),
                     v=model.K.download(model.v_memory))
        return gradients(model, *args)

    DataLoader.next_batch, gpt.gradients = recording, first_held
    np.seterr(over="ignore", invalid="ignore")
    try:
        cli.run(lambda: gpt.main(argv))
    finally:
        with open(f"{{out}}_rows_{{rank}}.json", "w") as f:
            json.dump(rows, f)
""")
# -d 384 splits into 4, 3, 2 and 1 processes of B*T = 32; with 4, an epoch of the shards below is 14
# steps, so the runs to step 16 cross into the next one
ELASTIC = ["-e", "d1", "-b", "2", "-t", "16", "-d", "384", "-s", "0", "-v", "0", "-l", "1e-3", "-u", "2", "-c", "0.1",
           "-n", "4", "-x", "16", "--device", "cpu"]


@pytest.fixture(scope="module")
def positions(tmp_path_factory):
    """Train shards of 3001 and 2500 tokens whose tokens are their positions."""
    d = tmp_path_factory.mktemp("positions")
    write_shard(d / "train_000001.bin", np.arange(3001))
    write_shard(d / "train_000002.bin", np.arange(3001, 5501))
    write_shard(d / "val_000000.bin", np.arange(1200))
    return ["-i", str(d / "train_*.bin"), "-j", str(d / "val_000000.bin")]


def recorded(cwd, name, nproc, args):
    """ELASTIC and args on nproc processes started side by side through RECORDER: rank 0's stdout,
    the rows of each step (their first tokens, over every rank, sorted), and m and v as each rank
    held them at its first step."""
    script = cwd / "record.py"
    script.write_text(RECORDER.format(repo=str(REPO)))
    port = str(free_port())
    variables = (lambda rank: dict(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)) if nproc > 1 else lambda rank: {}
    procs = [subprocess.Popen([sys.executable, str(script), str(cwd / name), *ELASTIC, *args], cwd=cwd,
                              env=clean_env(**variables(rank)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in range(nproc)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * nproc, "".join(err[-2000:] for _, err in outputs)
    grad_accum = 384 // (32 * nproc)
    rows = [json.loads((cwd / f"{name}_rows_{rank}.json").read_text()) for rank in range(nproc)]
    steps = [sorted(x for rank_rows in rows for batch in rank_rows[s * grad_accum:(s + 1) * grad_accum] for x in batch)
             for s in range(len(rows[0]) // grad_accum)]
    held = [np.load(cwd / f"{name}_held_{rank}.npz") for rank in range(nproc)]
    return outputs[0][0], steps, [(h["m"], h["v"]) for h in held]


def state_of(run_dir, step, rank, nproc, zero):
    """A d1 rank's state file, of a checkpoint of nproc ranks with -z zero."""
    lo, hi = gpt.optimizer_range(num_parameters(gpt.config_from_descriptor("d1")), nproc, rank, zero)
    return read_state(run_dir / f"state_{step:08d}_{rank:05d}.bin", hi - lo)


def gathered_state(run_dir, step, nproc, zero):
    """m and v of the whole model, from the state files of a checkpoint of nproc ranks with -z zero."""
    states = [state_of(run_dir, step, rank, nproc, zero) for rank in range(nproc if zero else 1)]
    return np.concatenate([s.m for s in states]), np.concatenate([s.v for s in states])


@pytest.fixture(scope="module")
def elastic(positions, tmp_path_factory):
    """The ELASTIC run on 4 processes with -z 1, recorded, checkpoints at steps 4, 8, 12 and 16."""
    cwd = tmp_path_factory.mktemp("elastic")
    return cwd, recorded(cwd, "straight", 4, [*positions, "-z", "1", "-o", "straight"])


@pytest.mark.parametrize("nproc, zero", [(2, 1), (3, 0), (1, 0)])
def test_a_run_resumed_on_another_count_holds_the_same_state_and_reads_the_same_rows(elastic, positions, nproc, zero):
    """The 4-rank -z 1 run stopped at its step-4 checkpoint and resumed on 2, 3 and 1 processes, with
    either -z: what the new ranks hold at their first step, gathered, is the old ranks' AdamW state
    bit for bit; the step and the random state go on (the step-8 checkpoint's are the straight
    run's); and each step reads exactly the rows the straight run read in it (the data rule: the
    run's first layout goes on, nothing in the epoch repeated or skipped), into the next epoch."""
    cwd, (_, straight_steps, _) = elastic
    run_dir = shutil.copytree(cwd / "straight", cwd / f"on_{nproc}")
    for path in run_dir.iterdir():
        if path.name.split("_")[0] in ("model", "state", "DONE") and "_00000004" not in path.name:
            path.unlink()
    stdout, steps, held = recorded(cwd, f"on_{nproc}", nproc, [*positions, "-z", str(zero), "-o", str(run_dir), "-y",
                                                               "1"])
    assert f"resuming on {nproc} process(es) with -b 2 -z {zero} from a checkpoint written by 4 with -b 2 -z 1: " \
           f"the total batch stays 384 tokens (gradient accumulation 3 -> {12 // nproc})" in stdout
    m, v = gathered_state(cwd / "straight", 4, 4, 1)
    held_m, held_v = (np.concatenate([h[i] for h in held]) for i in (0, 1)) if zero else held[0]
    assert held_m.tobytes() == m.tobytes() and held_v.tobytes() == v.tobytes()
    if not zero:  # every rank holds the whole of it
        assert all(h[0].tobytes() == m.tobytes() and h[1].tobytes() == v.tobytes() for h in held)
    assert len(steps) == 12 and steps == straight_steps[4:]
    ours, theirs = state_of(run_dir, 8, 0, nproc, zero), state_of(cwd / "straight", 8, 0, 4, 1)
    assert (ours.step, ours.rng_state, ours.rng_state_last_update) == (8, theirs.rng_state,
                                                                       theirs.rng_state_last_update)
    assert (ours.epoch, ours.epoch_samples) == (theirs.epoch, theirs.epoch_samples) == (0, 24)


def test_a_round_trip_through_other_counts_with_no_step_between_rewrites_the_same_state_files(elastic, positions,
                                                                                              tmp_path):
    """The step-4 checkpoint of 4 ranks (-z 1) re-sharded, as the trainer's resume does and as its
    next checkpoint writes, for 3 ranks (-z 0), then 1, then 2 (-z 1), then 4 (-z 1) again: every
    count holds the whole state, and the last writes the 4 original state files byte for byte."""
    cwd, _ = elastic
    source = tmp_path / "original"
    source.mkdir()
    for name in ("model_00000004.bin", "state_00000004_00000.bin", "state_00000004_00001.bin",
                 "state_00000004_00002.bin", "state_00000004_00003.bin", "DONE_00000004"):
        shutil.copy(cwd / "straight" / name, source / name)
    original = gathered_state(source, 4, 4, 1)
    config, params = gpt.load_params(source / "model_00000004.bin")
    for nproc, zero in [(3, 0), (1, 0), (2, 1), (4, 1)]:
        checkpoint = rundir.RunDir(str(source), rank=1).checkpoint(resume=True)
        target = tmp_path / f"on_{nproc}"
        target.mkdir()
        shutil.copy(source / "model_00000004.bin", target)
        shutil.copy(source / "DONE_00000004", target)
        tokens_per_step = checkpoint.batch(2, 16, -1, nproc)
        for rank in range(nproc):
            state = checkpoint.optimizer_state(nproc, rank, zero)
            model = gpt.GPT2(config, params, 2, 16, world_size=nproc, rank=rank, zero_stage=zero)
            gpt.load_optimizer_state(model, state, checkpoint.model_path)
            loader = DataLoader(positions[1], 2, 16, config.vocab_size, rank, nproc, shuffle=True,
                                layout=checkpoint.layout, grad_accum_steps=tokens_per_step // (32 * nproc))
            loader.restore(state.epoch, state.epoch_samples)
            write_state(target / f"state_00000004_{rank:05d}.bin",
                        gpt.checkpoint_state(model, loader, tokens_per_step, gpt.Progress.restored(state)))
        assert all(a.tobytes() == b.tobytes() for a, b in zip(gathered_state(target, 4, nproc, zero), original))
        source = target
    for rank in range(4):
        name = f"state_00000004_{rank:05d}.bin"
        assert (source / name).read_bytes() == (cwd / "straight" / name).read_bytes(), name


# ----------------------------------------------------------------------------- launchers

@pytest.fixture(scope="module")
def launcher_run(same_tokens):
    return step_lines(same_tokens[2, 0][0])


def by_hand(tmp_path, data, variables, flags=lambda rank: []):
    """Two processes started side by side, each with variables(rank) in its environment and
    flags(rank) on its command line."""
    procs = [subprocess.Popen([sys.executable, str(REPO / "train_gpt2.py"), *SAME_TOKENS, *data, "-n", "0",
                               *flags(rank)], cwd=tmp_path, env=clean_env(**variables(rank)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert outputs[1][0] == ""  # only rank 0 prints
    return outputs[0][0]


def test_torchrun_starts_it(data, tmp_path, launcher_run):
    result = train(*SAME_TOKENS, *data, "-n", "0", cwd=tmp_path,
                   prefix=[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(REPO / "train_gpt2.py")])
    assert step_lines(result.stdout) == launcher_run


def test_slurm_variables_start_it(data, tmp_path, launcher_run):
    port = str(free_port())
    stdout = by_hand(tmp_path, data, lambda rank: dict(
        SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_JOB_NODELIST="localhost",
        MASTER_PORT=port))
    assert "ranks from Slurm" in stdout
    assert step_lines(stdout) == launcher_run


def test_open_mpi_variables_start_it(data, tmp_path, launcher_run):
    port = str(free_port())
    stdout = by_hand(tmp_path, data, lambda rank: dict(
        OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_LOCAL_RANK=str(rank),
        OMPI_COMM_WORLD_LOCAL_SIZE="2", MASTER_PORT=port))
    assert "ranks from Open MPI" in stdout
    assert step_lines(stdout) == launcher_run


def test_llmc_flags_and_a_shared_directory_start_it(data, tmp_path, launcher_run):
    shared = tmp_path / "shared"
    shared.mkdir()
    stdout = by_hand(tmp_path, data, lambda rank: {},
                     lambda rank: ["-pn", "2", "-pr", str(rank), "-pi", "fs", "-pf", str(shared)])
    assert "ranks from flags -pn/-pr" in stdout
    assert step_lines(stdout) == launcher_run


# ----------------------------------------------------------------------------- rendezvous

RENDEZVOUS = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    import distributed
    rank, world, kind, where, timeout = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])
    meeting = ("fs", where) if kind == "fs" else ("tcp", "127.0.0.1", int(where))
    blob = b"fresh id from rank 0" if rank == 0 else b""
    print(distributed.exchange(distributed.Process(rank, world, rank, "test"), meeting, blob, timeout).decode())
""")


def rendezvous(ranks, world, kind, where, timeout=60.0, delay=0.0):
    script = RENDEZVOUS.format(repo=str(REPO))
    procs = []
    for rank in ranks:
        procs.append(subprocess.Popen([sys.executable, "-c", script, str(rank), str(world), kind, str(where),
                                       str(timeout)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(delay)
    return [(proc.wait(timeout=120), *proc.communicate()) for proc in procs]


@pytest.mark.parametrize("kind", ["tcp", "fs"])
def test_rendezvous_hands_rank_0s_id_to_four_processes(kind, tmp_path):
    where = tmp_path if kind == "fs" else free_port()
    results = rendezvous([3, 1, 0, 2], 4, kind, where, delay=0.1)  # rank 0 neither first nor last
    assert [(code, out.strip()) for code, out, _ in results] == [(0, "fresh id from rank 0")] * 4
    if kind == "fs":
        assert not any(tmp_path.glob("*_join_*")) and not any(tmp_path.glob("*_reply_*"))


@pytest.mark.parametrize("kind", ["tcp", "fs"])
def test_rendezvous_names_the_rank_that_never_came(kind, tmp_path):
    where = tmp_path if kind == "fs" else free_port()
    start = time.monotonic()
    results = rendezvous([0, 1, 2], 4, kind, where, timeout=2.0)
    assert time.monotonic() - start < 30
    code, out, err = results[0]
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "rank(s) 3 of 4 never arrived within 2 s" in err
    for code, out, err in results[1:]:
        assert code == 1 and err.startswith("error: rendezvous") and err.count("\n") == 1


def test_a_stale_file_in_the_shared_directory_is_never_used(tmp_path):
    """What a crashed run left: rank 1's join and a reply to it. Rank 1 starts first and sees the
    reply before rank 0 has started; it must wait for this run's."""
    (tmp_path / "gpt2_rendezvous_join_1").write_bytes(b"0123456789abcdef")
    (tmp_path / "gpt2_rendezvous_reply_1").write_bytes(b"0123456789abcdef" + b"stale id from an old run")
    results = rendezvous([1, 0], 2, "fs", tmp_path, delay=1.0)
    assert [(code, out.strip()) for code, out, _ in results] == [(0, "fresh id from rank 0")] * 2


# ----------------------------------------------------------------------------- faults and bad input

def test_a_rank_killed_mid_run_ends_the_job_and_the_last_checkpoint_resumes(data, tmp_path):
    cmd = ["-e", "d1", "-b", "2", "-t", "32", "-s", "0", "-v", "0", "-n", "2", "-l", "1e-3", "--device", "cpu",
           "-pn", "2", *data, "-o", "run"]
    launcher = subprocess.Popen([sys.executable, str(REPO / "train_gpt2.py"), *cmd, "-x", "10000"], cwd=tmp_path,
                                env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300  # two ranks' start-up (torch, gloo) beside a busy make test's other workers
    while not list((tmp_path / "run").glob("DONE_*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not list((tmp_path / "run").glob("DONE_*")):
        launcher.kill()
        pytest.fail("no checkpoint within 300 s: the signal would land before one")
    children = [int(pid) for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()]
    assert len(children) == 2
    rank1 = next(pid for pid in children if "RANK=1\0" in Path(f"/proc/{pid}/environ").read_text())
    os.kill(rank1, signal.SIGKILL)
    killed = time.monotonic()
    code = launcher.wait(timeout=30)
    assert time.monotonic() - killed < 15
    assert code != 0
    assert "error: rank 1 of 2 was killed by SIGKILL" in launcher.stderr.read()
    for pid in children:  # no orphan: both ranks are gone (reaped, or at most a zombie)
        status = Path(f"/proc/{pid}/status")
        assert not status.exists() or "zombie" in status.read_text()
    done = max(int(p.name[5:]) for p in (tmp_path / "run").glob("DONE_*"))
    resumed = train(*cmd, "-x", str(done + 2), "-y", "1", cwd=tmp_path)
    assert f"resuming from run/model_{done:08d}.bin" in resumed.stdout
    assert (tmp_path / f"run/DONE_{done + 2:08d}").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_launcher_passes_ctrl_c_and_sigterm_on_and_leaves_no_process(data, tmp_path, signum):
    cmd = ["-e", "d1", "-b", "2", "-t", "32", "-s", "0", "-v", "0", "-n", "2", "--device", "cpu", "-pn", "2",
           *data, "-o", "run"]
    launcher = subprocess.Popen([sys.executable, str(REPO / "train_gpt2.py"), *cmd, "-x", "10000"], cwd=tmp_path,
                                env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300  # two ranks' start-up (torch, gloo) beside a busy make test's other workers
    while not list((tmp_path / "run").glob("DONE_*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not list((tmp_path / "run").glob("DONE_*")):
        launcher.kill()
        pytest.fail("no checkpoint within 300 s: the signal would land before one")
    children = [int(pid) for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()]
    launcher.send_signal(signum)
    assert launcher.wait(timeout=30) == 128 + signum
    for pid in children:
        status = Path(f"/proc/{pid}/status")
        assert not status.exists() or "zombie" in status.read_text()
    done = max(int(p.name[5:]) for p in (tmp_path / "run").glob("DONE_*"))
    train(*cmd, "-x", str(done + 1), "-y", "1", cwd=tmp_path)


def test_bad_multiprocess_input_is_one_line_and_writes_nothing(data, tmp_path):
    base = ["-e", "d1", "-b", "2", "-t", "32", "-s", "0", "-x", "2", "--device", "cpu", *data]
    port = free_port()
    cases = [
        (["-pn", "2", "-pr", "2"], "need 0 <= rank < processes"),
        (["-pn", "2", "-d", "96"], "-d 96: the total batch must be a multiple of B*T*processes = 128"),
        (["-pn", "2", "-pr", "1", "-pi", "tcp", "-ps", f"127.0.0.1:{port}", "--rendezvous-timeout", "1"],
         f"no answer from rank 0 at 127.0.0.1:{port} within 1 s"),
        (["-pn", "2", "-pr", "1", "-pi", "tcp", "-ps", "no-such-host.invalid", "--rendezvous-timeout", "1"],
         "cannot resolve rank 0's host 'no-such-host.invalid'"),
        (["-pn", "2", "-pr", "0", "-pi", "fs", "-pf", str(tmp_path / "missing")],
         "not a writable directory"),
        (["-pn", "2", "-pr", "0", "-pi", "tcp"], "-pi tcp: give rank 0's address as -ps HOST[:PORT]"),
        (["-pn", "0"], "-pn 0: the number of processes must be at least 1"),
    ]
    for args, message in cases:
        result = train(*base, *args, "-o", "out", cwd=tmp_path, check=False)
        assert result.returncode == 1, (args, result.stderr[-2000:])
        assert message in error_line(result), (args, result.stderr)
        assert result.stderr.count("\n") == 1, (args, result.stderr)
        assert not (tmp_path / "out").exists()


def test_zero1_on_one_process_is_accepted_and_said_to_do_nothing(data, tmp_path):
    result = train("-e", "d1", "-b", "2", "-t", "32", "-s", "0", "-x", "1", "-v", "0", "--device", "cpu", "-z", "1",
                   *data, cwd=tmp_path)
    assert "-z 1 with one process: there is nothing to shard, so ZeRO-1 changes nothing" in result.stdout


@pytest.mark.parametrize("pn, pr, pg, message", [
    (0, None, 8, "-pn 0: the number of processes must be at least 1"),
    (-1, None, 8, "-pn -1: the number of processes must be at least 1"),
    (None, 1, 8, "-pr 1 needs -pn: give the number of processes as well (-pn N -pr 1, with N > 1)"),
    (None, -1, 8, "-pr -1: need 0 <= rank < processes"),
    (2, 2, 8, "-pr 2 -pn 2: need 0 <= rank < processes"),
    (2, 1, 0, "-pg 0: GPUs per node must be at least 1"),
])
def test_process_flags_no_run_can_have_are_one_line_naming_what_is_wrong(pn, pr, pg, message, capsys):
    with pytest.raises(SystemExit) as exit:
        distributed.identify(pn, pr, pg)
    assert exit.value.code == 1
    assert capsys.readouterr().err == f"error: {message}\n"


# ----------------------------------------------------------------------------- restarting by itself

RESTART = ["-e", "d1", "-b", "2", "-t", "32", "-s", "0", "-v", "10", "-m", "1", "-n", "2", "-x", "30", "-l", "1e-3",
           "--device", "cpu"]


@pytest.fixture(scope="module")
def never_killed(data, tmp_path_factory):
    """The RESTART run on 2 ranks, from start to end."""
    cwd = tmp_path_factory.mktemp("never_killed")
    train(*RESTART, *data, "-pn", "2", "-o", "run", cwd=cwd)
    return cwd / "run"


def rank_pid(marker, rank, other_than=()):
    """The trainer process of `rank` whose environment carries marker (inherited from the test's
    launcher, through whatever launches the ranks), waiting for it to start."""
    def find():
        for entry in Path("/proc").iterdir():
            try:
                environ = b"\0" + (entry / "environ").read_bytes()
                cmdline = (entry / "cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if (marker.encode() in environ and f"\0RANK={rank}\0".encode() in environ and b"train_gpt2.py" in cmdline
                    and int(entry.name) not in other_than):
                return int(entry.name)
        return None
    deadline = time.monotonic() + 120
    while (pid := find()) is None:
        assert time.monotonic() < deadline, f"no rank {rank} started"
        time.sleep(0.05)
    return pid


def kill_rank_1_after_the_first_checkpoint(cmd, cwd, env):
    """Start cmd, and SIGKILL rank 1 once the step-2 checkpoint is whole: (the process, rank 1's pid)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (cwd / "run" / "DONE_00000002").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint at step 2"
        time.sleep(0.02)
    pid = rank_pid(env["RESTART_TEST"], 1)
    os.kill(pid, signal.SIGKILL)
    return proc, pid


@pytest.mark.parametrize("launcher", ["built-in", "torchrun"])
def test_a_killed_rank_is_restarted_and_the_run_ends_as_if_never_killed(never_killed, data, tmp_path, launcher):
    """2 ranks, --max-restarts 1, rank 1 SIGKILLed after the first checkpoint: the ranks are started
    again, go on from the newest checkpoint by themselves, and the run ends with the final model
    and main.log of a run never killed, byte for byte."""
    env = clean_env(RESTART_TEST=f"restart-{launcher}")
    prefix = ([sys.executable, str(REPO / "train_gpt2.py"), "-pn", "2", "--max-restarts", "1"] if launcher == "built-in"
              else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
                    "--monitor-interval", "0.1", "--master-port", str(free_port()), str(REPO / "train_gpt2.py")])
    proc, _ = kill_rank_1_after_the_first_checkpoint([*prefix, *RESTART, *data, "-o", "run"], tmp_path, env)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    lines = stdout.splitlines()
    if launcher == "built-in":
        assert "launcher: rank 1 of 2 was killed by SIGKILL: restarting the 2 ranks (restart 1 of at most 1), which " \
               "go on from the newest checkpoint" in lines
    assert "restart 1 of this job (TORCHELASTIC_RESTART_COUNT): going on from the newest checkpoint in run, as -y 1 " \
           "would" in lines
    assert any(line.startswith("resuming from run/model_") for line in lines)
    for name in ("model_00000030.bin", "main.log"):
        assert (tmp_path / "run" / name).read_bytes() == (never_killed / name).read_bytes(), name


def test_with_its_restarts_spent_the_launcher_ends_in_one_line_as_without(data, tmp_path):
    env = clean_env(RESTART_TEST="restarts-spent")
    cmd = [sys.executable, str(REPO / "train_gpt2.py"), "-pn", "2", "--max-restarts", "1", *RESTART, *data, "-o", "run"]
    proc, first = kill_rank_1_after_the_first_checkpoint(cmd, tmp_path, env)
    os.kill(rank_pid(env["RESTART_TEST"], 1, other_than=[first]), signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert stderr.splitlines() == ["error: rank 1 of 2 was killed by SIGKILL"], stderr
    assert stdout.count("launcher: rank 1 of 2 was killed by SIGKILL: restarting") == 1


# ----------------------------------------------------------------------------- the built-in launcher's faults

def launch(tmp_path, rank_code, world_size, device="auto", env=None, cores=None):
    """launcher.launch starting world_size ranks of rank_code (Python; its rank is in RANK, its
    directory is tmp_path) from a launcher process of its own, pinned to `cores` CPU cores if given.
    Returns the launcher's result and how long it ran."""
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(rank_code))
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import launcher; "
            f"sys.exit(launcher.launch({str(script)!r}, [], {world_size}, device={device!r}))")
    pin = (lambda: os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])) if cores else None
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env or clean_env(), capture_output=True,
                            text=True, timeout=180, preexec_fn=pin)
    return result, time.monotonic() - start


def test_every_rank_failing_on_the_same_input_is_one_line_when_rank_0_is_not_first(tmp_path):
    """Rank 0 says its error first but is slow to exit, and ranks 1 and 2 exit first with the same
    line: the launcher used to add "error: rank 1 of 3 exited with status 1: <the same line>"."""
    result, _ = launch(tmp_path, """
        import os, sys, time
        rank = int(os.environ["RANK"])
        time.sleep(0.5 if rank == 0 else 1.5)
        print("error: -j val.bin: too few tokens", file=sys.stderr, flush=True)
        if rank == 0:
            time.sleep(2)
        sys.exit(1)
    """, 3)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["error: -j val.bin: too few tokens"]


def test_a_val_shard_too_small_for_every_rank_is_one_line(data, tmp_path):
    """The race above, as a user meets it: every rank rejects the val shard, in whatever order (the
    old launcher printed two lines in about a third of the runs)."""
    write_shard(tmp_path / "val300.bin", np.arange(300) % 1000)
    for attempt in range(5):
        result = train("-e", "d1", "-b", "2", "-t", "64", "--device", "cpu", "-x", "3", "-pn", "3", "-i", data[1],
                       "-j", str(tmp_path / "val300.bin"), cwd=tmp_path, check=False, timeout=120)
        assert result.returncode == 1
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "val300.bin" in lines[0], result.stderr


def test_a_rank_that_dies_is_reported_and_not_rank_0s_error_that_follows(tmp_path):
    """Rank 1 is killed; rank 0 then fails in a collective whose peer went away. The one line is
    the cause, rank 1's death, not rank 0's consequence."""
    result, seconds = launch(tmp_path, """
        import os, signal, sys, time
        from pathlib import Path
        if os.environ["RANK"] == "1":
            Path("rank_1_dies").touch()
            os.kill(os.getpid(), signal.SIGKILL)
        while not Path("rank_1_dies").exists():
            time.sleep(0.01)
        time.sleep(0.5)
        sys.exit("error: rank 0: all_reduce failed, so another rank has stopped (Connection closed by peer)")
    """, 2)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["error: rank 1 of 2 was killed by SIGKILL"]
    assert seconds < 30


def test_a_rank_failing_while_the_others_start_stops_the_launcher_starting_them(tmp_path):
    """-pn 1000 with a bad input used to start all 1000 ranks before looking at any of them."""
    result, seconds = launch(tmp_path, """
        import os, sys, time
        from pathlib import Path
        rank = int(os.environ["RANK"])
        if rank == 0:
            sys.exit("error: bad input")
        Path(f"started_{rank}").write_text(str(os.getpid()))
        time.sleep(300)
    """, 200)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["error: bad input"]
    started = list(tmp_path.glob("started_*"))
    assert len(started) < 100  # the old launcher started all 200
    assert seconds < 60
    for path in started:  # no orphan
        status = Path(f"/proc/{path.read_text()}/status")
        assert not status.exists() or "zombie" in status.read_text()


def test_the_launcher_says_when_it_starts_more_ranks_than_cores_and_starts_them(tmp_path):
    over, _ = launch(tmp_path, "", 2, cores=1)
    assert over.returncode == 0 and over.stderr == ""
    assert "launcher: 2 ranks on 1 CPU core(s): they share them, so expect it to be slow" in over.stdout
    fits, _ = launch(tmp_path, "", 1, cores=1)
    assert fits.returncode == 0 and "launcher:" not in fits.stdout


@pytest.mark.parametrize("visible, shown", [("0", 1), ("", 0), ("-1", 0), ("0,-1,1", 1)])
def test_the_launcher_refuses_more_cuda_ranks_than_the_node_shows_gpus(tmp_path, visible, shown):
    """CUDA_VISIBLE_DEVICES says how many GPUs the ranks would see (CUDA stops at an entry like -1);
    the launcher refuses before it starts a rank, without touching CUDA itself."""
    rank = "from pathlib import Path; Path('started').touch()"
    refused, _ = launch(tmp_path, rank, shown + 1, device="cuda", env=clean_env(CUDA_VISIBLE_DEVICES=visible))
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        f"error: -pn {shown + 1}: this node shows {shown} GPU(s) and each rank needs one of its own: give at most "
        f"-pn {shown} here, or start the ranks on several nodes (torchrun, srun, mpirun)"]
    assert not (tmp_path / "started").exists()
    if shown:
        accepted, _ = launch(tmp_path, rank, shown, device="cuda", env=clean_env(CUDA_VISIBLE_DEVICES=visible))
        assert accepted.returncode == 0 and (tmp_path / "started").exists()

"""train_gpt2.py end to end on the CPU: the command line, data loading, the loop's output and log,
checkpoints, exact resume, and learning on Tiny Shakespeare."""
import dataclasses
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt2 as gpt
from kernels import cuda_unavailable
from fileformats import HellaSwagExample, read_model, read_shard, read_state, write_hellaswag, write_model, write_shard

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "dev"))
import torch_gpt2 as ref  # noqa: E402

TINY = ["-e", "d1", "-b", "2", "-t", "32", "-s", "0"]  # 1 layer, C=64: ~50 ms a step


def run(*args, cwd, check=True):
    result = subprocess.run([sys.executable, str(REPO / "train_gpt2.py"), *args], cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def losses_and_vals(stdout):
    """The step and val lines without their timings: what must repeat exactly."""
    lines = []
    for line in stdout.splitlines():
        if line.startswith("step"):
            lines.append(line.split(" ms |")[0].rsplit("|", 1)[0])
        elif line.startswith(("val loss", "skipping update")):
            lines.append(line)
    return lines


# ----------------------------------------------------------------------------- determinism and resume

@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """The same 20-step command (shuffled data, grad accumulation 2, cosine decay with warmup,
    weight decay, checkpoints every 10) run twice straight, and once stopped at its step-10
    checkpoint and resumed with -y 1."""
    cmd = [*TINY, *data, "-d", "128", "-x", "20", "-v", "5", "-m", "3", "-n", "10", "-l", "1e-3", "-u", "3",
           "-q", "0.1", "-c", "0.1"]
    cwd = tmp_path_factory.mktemp("runs")
    straight = run(*cmd, "-o", "a", cwd=cwd)
    again = run(*cmd, "-o", "b", cwd=cwd)
    for name in ("model_00000020.bin", "state_00000020_00000.bin", "DONE_00000020"):  # as if stopped after 10
        os.remove(cwd / "b" / name)
    resumed = run(*cmd, "-o", "b", "-y", "1", cwd=cwd)
    return dict(cwd=cwd, straight=straight.stdout, again=again.stdout, resumed=resumed.stdout)


def test_two_runs_of_one_command_print_identical_losses(runs):
    lines = losses_and_vals(runs["straight"])
    assert len([line for line in lines if line.startswith("step")]) == 20
    assert lines == losses_and_vals(runs["again"])


def test_resume_is_bit_exact(runs):
    straight, resumed = losses_and_vals(runs["straight"]), losses_and_vals(runs["resumed"])
    assert "resuming from b/model_00000010.bin at step 10" in runs["resumed"]
    first = straight.index(next(line for line in straight if line.startswith("step   11/20")))
    assert resumed == straight[first - 1:]  # from the val loss at step 10 on
    a, b = runs["cwd"] / "a", runs["cwd"] / "b"
    assert (a / "model_00000020.bin").read_bytes() == (b / "model_00000020.bin").read_bytes()
    assert (a / "state_00000020_00000.bin").read_bytes() == (b / "state_00000020_00000.bin").read_bytes()
    assert (a / "main.log").read_text() == (b / "main.log").read_text()  # the redone steps are not logged twice


def test_the_state_records_the_rng_state_before_and_after_the_last_update(runs):
    num_params = gpt.num_parameters(gpt.config_from_descriptor("d1"))
    state = read_state(runs["cwd"] / "a" / "state_00000010_00000.bin", num_params)
    assert gpt.xorshift_u32(state.rng_state_last_update)[0] == state.rng_state  # one draw per update, in between
    chain = 13371337  # llm.c's start for rank 0, then one draw for each of the 10 updates
    for _ in range(10):
        chain = gpt.xorshift_u32(chain)[0]
    assert state.rng_state == chain


def test_training_moved_the_weights_and_the_loss(runs):
    losses = [float(m.group(1)) for m in re.finditer(r"\| loss (\S+)", runs["straight"])]
    assert losses[-1] < losses[0] - 1.0
    _, first = read_model(runs["cwd"] / "a" / "model_00000010.bin")
    _, last = read_model(runs["cwd"] / "a" / "model_00000020.bin")
    assert not np.array_equal(first, last)


@pytest.fixture(scope="module")
def checkpointed(data, tmp_path_factory):
    """A run stopped at step 2 (checkpoints at 1 and 2) of grad accumulation 16."""
    cwd = tmp_path_factory.mktemp("checkpointed")
    run(*TINY, *data, "-v", "0", "-x", "2", "-n", "1", "-d", "1024", "-o", "run", cwd=cwd)
    return cwd / "run"


def resume(run_dir, data, tmp_path, *args, check=True):
    """-y 1 on a copy of run_dir, with TINY's flags, the data and args: (result, the copy)."""
    copy = shutil.copytree(run_dir, tmp_path / "run")
    return run(*TINY, *data, "-v", "0", "-n", "1", "-d", "1024", *args, "-o", str(copy), "-y", "1", cwd=tmp_path,
               check=check), copy


@pytest.mark.parametrize("args, expected", [
    (["-x", "1"], "error: -x 1: nothing to train: the newest checkpoint in {run} is at step 2, beyond step 1; raise -x "
                  "to go on from it"),
    # the data position would mean another thing: refused (another -b with the same -d is not: test_rundir)
    (["-x", "3", "-t", "16"], "error: -t 16: the checkpoint at step 2 was trained with -t 32, and its data position "
                              "means another thing at another sequence length: resume with -t 32"),
    (["-x", "3", "-i", "{shard}"], "error: -i {shard}: 1 shard(s) of 3,001 tokens, and the checkpoint at step 2 was "
                                   "trained on 2 of 5,501: its data position means nothing in these; resume with the "
                                   "run's -i"),
    (["-x", "3", "-d", "512"], "error: -d 512: the checkpoint at step 2 was trained with -d 1024 (tokens a step), "
                               "which a resumed run keeps: resume with -d 1024, or leave -d out"),
], ids=["-x", "-t", "-i", "-d"])
def test_resume_that_the_flags_do_not_fit_is_one_line_naming_them(checkpointed, data, tmp_path, args, expected):
    shard = str(Path(data[1]).parent / "train_000001.bin")
    result, copy = resume(checkpointed, data, tmp_path, *[arg.format(shard=shard) for arg in args], check=False)
    lines = result.stderr.splitlines()
    assert result.returncode == 1 and lines == [expected.format(run=copy, shard=shard)], result.stderr
    assert result.stdout == ""
    assert sorted(os.listdir(copy)) == sorted(os.listdir(checkpointed))


def test_e_on_resume_is_said_to_be_unused(checkpointed, data, tmp_path):
    result, _ = resume(checkpointed, data, tmp_path, "-x", "3", "-e", "d2")
    assert "-e d2: not used, as -y 1 goes on with the checkpoint's model" in result.stdout.splitlines()
    assert "model: L=1 NH=1 C=64 " in result.stdout  # d1's, not d2's


def test_a_fresh_run_says_it_replaces_the_log_an_earlier_run_left_without_checkpoints(data, tmp_path):
    first = run(*TINY, *data, "-v", "0", "-x", "2", "-o", "out", cwd=tmp_path)
    second = run(*TINY, *data, "-v", "0", "-x", "1", "-o", "out", cwd=tmp_path)
    note = "out/main.log: an earlier run's log, with no checkpoint to resume from, is replaced by this run's"
    assert note not in first.stdout.splitlines() and note in second.stdout.splitlines()
    assert [line.split()[0] for line in (tmp_path / "out" / "main.log").read_text().splitlines()] == ["s:0"]


# ----------------------------------------------------------------------------- a run that diverges

def test_a_diverging_run_stops_before_its_update_and_its_last_checkpoint_resumes(data, tmp_path):
    """From the step-2 checkpoint of a sound run, -l 1e30: step 3's update throws the weights to
    ~1e30, and step 4's loss is nan. The run stops there in one line, before step 4's update and
    the step-4 checkpoint, so the step-2 checkpoint is still the newest, and resumes."""
    cmd = [*TINY, *data, "-v", "0", "-x", "4", "-n", "2", "-o", "out"]
    run(*cmd, "-x", "2", cwd=tmp_path)
    diverged = run(*cmd, "-y", "1", "-l", "1e30", cwd=tmp_path, check=False)
    assert diverged.returncode == 1
    assert diverged.stderr.splitlines() == [
        "error: step 4/4: the loss is nan and the grad norm nan: training diverged, and this update is not made; "
        "lower -l, and resume from the checkpoint at step 2 with -y 1"], diverged.stderr
    assert re.search(r"^step    3/4 \| loss \d", diverged.stdout, re.M) and "step    4/4" not in diverged.stdout
    assert sorted(os.listdir(tmp_path / "out")) == ["DONE_00000002", "lock", "main.log", "model_00000002.bin",
                                                    "state_00000002_00000.bin"]
    resumed = run(*cmd, "-y", "1", cwd=tmp_path)
    losses = [float(m.group(1)) for m in re.finditer(r"\| loss (\S+)", resumed.stdout)]
    assert "at step 2" in resumed.stdout and len(losses) == 2 and all(map(math.isfinite, losses))


@pytest.mark.parametrize("args, expected", [
    (["-v", "1", "-m", "1"], "error: step 1: the val loss is nan: the model diverged; lower -l"),
    (["-v", "0", "-s", "1", "-g", "5"],
     "error: step 1: sampling: the model's logits are not finite (nan): it diverged; lower -l"),
], ids=["val loss", "sample"])
def test_evaluating_a_diverged_model_is_one_line(data, tmp_path, args, expected):
    """-x 1: the one update (-l 1e30) has no later step's loss to show it diverged; the final val
    loss or sample does."""
    result = run(*TINY, *data, "-x", "1", "-l", "1e30", *args, cwd=tmp_path, check=False)
    assert result.returncode == 1 and result.stderr.splitlines() == [expected], result.stderr


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("temperature, top_k", [(0, 0), (1.0, 0), (1.0, 2)])
def test_next_token_refuses_logits_that_are_not_finite(bad, temperature, top_k):
    logits = np.array([0.5, 2.0, bad, -1.0])
    kind = "nan" if math.isnan(bad) else "inf"
    with pytest.raises(ValueError, match=rf"^the model's logits are not finite \({kind}\): it diverged$"):
        gpt.next_token(logits, np.random.default_rng(0), temperature, top_k)


def test_a_sampler_on_nan_weights_raises_the_value_error_greedy_or_not():
    config = gpt.config_from_descriptor("d1")
    model = gpt.GPT2(config, np.full(gpt.num_parameters(config), np.nan, np.float32), 1, 8)
    for temperature in (0, 1.0):
        with pytest.raises(ValueError, match="not finite"):
            list(gpt.Sampler(model, 8).generate([gpt.GPT2_EOT], 4, seed=0, temperature=temperature))


# ----------------------------------------------------------------------------- the files and lines flags produce

def test_flags_produce_exactly_their_files_and_lines(data, tmp_path):
    result = run(*TINY, *data, "-x", "10", "-v", "3", "-m", "2", "-n", "2", "-nk", "2", "-nm", "4", "-o", "out",
                 cwd=tmp_path)
    out = result.stdout.splitlines()
    assert [line.split(" |")[0] for line in out if line.startswith("step")] == [f"step {s:4d}/10" for s in range(1, 11)]
    assert len([line for line in out if line.startswith("val loss")]) == 5  # steps 0, 3, 6, 9 and the last
    # checkpoints at 2, 4, 6, 8, 10: the newest two (8, 10) stay, and 4 as a multiple of -nm 4
    expected = {"main.log", "lock"} | {f"{kind}_{s:08d}{ext}" for s in (4, 8, 10)
                               for kind, ext in (("model", ".bin"), ("state", "_00000.bin"), ("DONE", ""))}
    assert set(os.listdir(tmp_path / "out")) == expected
    log = (tmp_path / "out" / "main.log").read_text().splitlines()
    assert [line.split()[0] for line in log if " tel:" in line] == [f"s:{s}" for s in (0, 3, 6, 9, 10)]
    assert all(re.fullmatch(r"s:\d+ tel:\d+\.\d{4}", line) for line in log if "tel" in line)
    assert [line.split()[0] for line in log if " trl:" in line] == [f"s:{s}" for s in range(10)]
    assert all(re.fullmatch(r"s:\d+ trl:\d+\.\d{4} lr:\d+\.\d{6} norm:\d+\.\d{2}", line)
               for line in log if "trl" in line)
    assert set(os.listdir(tmp_path)) == {"out"}


def test_without_o_nothing_is_written(data, tmp_path):
    run(*TINY, *data, "-x", "2", "-v", "0", cwd=tmp_path)
    assert os.listdir(tmp_path) == []


def test_one_epoch_by_default(data, tmp_path):
    # 5501 train tokens; a shard of n tokens gives (n - 1) // 64 samples of B*T = 64: 46 + 39 batches;
    # llm.c's one epoch is the token count over the step's tokens: 5501 // 64 = 85 steps
    result = run(*TINY, *data, "-v", "0", cwd=tmp_path)
    assert "step   85/85" in result.stdout and "step   86" not in result.stdout


def test_the_default_sample_is_64_tokens_or_what_b_times_t_and_the_model_allow_and_says_so(data, tmp_path):
    def sample(result):
        return result.stdout.split("generating:\n---\n")[1].split("\n---")[0].split()

    full = run("-e", "d1", "-b", "2", "-t", "32", *data, "-x", "1", "-v", "0", "-s", "1", cwd=tmp_path)
    assert len(sample(full)) == 63 and "-g:" not in full.stdout  # 64 with the EOT that starts it
    short = run("-e", "d1", "-b", "1", "-t", "16", *data, "-x", "1", "-v", "0", "-s", "1", cwd=tmp_path)
    assert len(sample(short)) == 15
    assert "-g: samples are 16 tokens, not 64: all that B*T = 16 and the model's maximum sequence length 1024 " \
           "allow (give -g to choose)" in short.stdout.splitlines()
    config = dataclasses.replace(gpt.config_from_descriptor("d1"), max_seq_len=24)
    write_model(tmp_path / "maxt24.bin", config, gpt.init_params(config), 3)
    model = run("-e", "maxt24.bin", "-b", "2", "-t", "16", *data, "-x", "1", "-v", "0", "-s", "1", cwd=tmp_path)
    assert len(sample(model)) == 23
    assert "-g: samples are 24 tokens, not 64: all that B*T = 32 and the model's maximum sequence length 24 " \
           "allow (give -g to choose)" in model.stdout.splitlines()


def test_sampling_prints_the_requested_number_of_tokens(data, tmp_path):
    result = run("-e", "d1", "-b", "2", "-t", "32", *data, "-x", "2", "-v", "0", "-s", "2", "-g", "9", cwd=tmp_path)
    assert "no tokenizer at data/gpt2_tokenizer.bin" in result.stdout
    sample = result.stdout.split("generating:\n---\n")[1].split("\n---")[0]
    assert len(sample.split()) == 8 and all(0 <= int(t) < 50257 for t in sample.split())


def test_overfitting_one_batch_drives_its_loss_below_what_the_data_allows(data, tmp_path):
    """The train tokens are drawn independently (entropy 4.4 nats): only memorising one batch
    gets below that."""
    result = run(*TINY, *data, "-x", "40", "-v", "0", "-a", "1", "-l", "3e-3", cwd=tmp_path)
    losses = [float(m.group(1)) for m in re.finditer(r"\| loss (\S+)", result.stdout)]
    assert losses[0] > 10 and losses[-1] < 2.0, losses
    assert "shuffled" not in result.stdout.splitlines()[1]


# ----------------------------------------------------------------------------- crashes while checkpointing

def assert_no_checkpoint_file_without_done(run_dir):
    done = {name[5:] for name in os.listdir(run_dir) if name.startswith("DONE_")}
    for name in os.listdir(run_dir):
        m = re.match(r"(model|state)_(\d{8})", name)
        if m and ".partial" not in name:
            assert m.group(2) in done, f"{name} without its DONE"


@pytest.mark.serial  # its signals must land after the run's first checkpoint: a busy core delays that
def test_sigterm_at_any_moment_never_leaves_a_checkpoint_without_done(data, tmp_path):
    """A checkpoint every step, so most of the run is spent writing them; SIGTERM lands at varied
    moments. Each time, every model_/state_ under its final name has its DONE, and -y 1 goes on
    from the newest DONE."""
    cmd = [sys.executable, str(REPO / "train_gpt2.py"), *TINY, *data, "-v", "0", "-x", "400", "-n", "1"]
    for i, delay in enumerate((0.2, 0.6, 1.0, 1.5, 2.1)):  # seconds after the run directory's log appears
        run_dir = tmp_path / f"r{i}"
        proc = subprocess.Popen([*cmd, "-o", str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started = time.monotonic()  # start-up takes 1-3 s, by the load: the signals are timed from its end
        while not (run_dir / "main.log").exists() and time.monotonic() - started < 60:
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGTERM
        assert_no_checkpoint_file_without_done(run_dir)
    done = sorted(name for name in os.listdir(run_dir) if name.startswith("DONE_"))
    assert done, "the run was killed before its first checkpoint: raise the delays"
    resumed = run(*TINY, *data, "-v", "0", "-x", str(int(done[-1][5:]) + 1), "-n", "1", "-o", str(run_dir), "-y", "1",
                  cwd=tmp_path)
    assert f"at step {int(done[-1][5:])}" in resumed.stdout
    assert [name for name in os.listdir(run_dir) if ".partial" in name] == []


class Crash(BaseException):
    """A process dying at this point (BaseException, so no except clause in the code catches it)."""


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
    """Checkpoints at steps 2 and 4, uninterrupted."""
    cwd = tmp_path_factory.mktemp("ref")
    gpt.main([*TINY, *data, "-v", "0", "-x", "4", "-n", "2", "-o", str(cwd / "run")])
    return cwd / "run"


# the step-4 checkpoint renames: model.partial's own temp file, state.partial's, model into place,
# state into place, DONE's temp file into place
RENAMES = 5


@pytest.mark.parametrize("crash_at", range(RENAMES))
def test_a_crash_inside_a_checkpoint_leaves_the_previous_one_usable(data, tmp_path, monkeypatch, crash_at,
                                                                     reference_run, capsys):
    run_dir = tmp_path / "run"
    calls, real_replace = [], os.replace

    def replace(src, dst):
        if "00000004" in str(dst):
            if len(calls) == crash_at:
                raise Crash()
            calls.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Crash):
        gpt.main([*TINY, *data, "-v", "0", "-x", "4", "-n", "2", "-o", str(run_dir)])
    monkeypatch.setattr(os, "replace", real_replace)
    names = set(os.listdir(run_dir))
    assert "DONE_00000002" in names and "DONE_00000004" not in names
    # only a death among the final renames (SIGKILL or power loss: SIGINT and SIGTERM are held
    # back there) can leave files under their names without DONE; the next run removes them
    orphans = {n for n in names if re.match(r"(model|state)_00000004\.bin$|state_00000004_00000\.bin$", n)}
    assert orphans == {3: {"model_00000004.bin"}, 4: {"model_00000004.bin", "state_00000004_00000.bin"}}.get(
        crash_at, set())
    capsys.readouterr()
    gpt.main([*TINY, *data, "-v", "0", "-x", "4", "-n", "2", "-o", str(run_dir), "-y", "1"])
    assert "at step 2" in capsys.readouterr().out
    assert sorted(os.listdir(run_dir)) == sorted(os.listdir(reference_run))
    for name in ("model_00000004.bin", "state_00000004_00000.bin", "main.log"):
        assert (run_dir / name).read_bytes() == (reference_run / name).read_bytes(), name


# ----------------------------------------------------------------------------- bad input

BAD_INPUTS = [
    (["-b", "four"], "-b"),
    (["-b"], "-b"),
    (["--no-such-flag"], "--no-such-flag"),
    (["-b", "0"], "-b 0"),
    (["-t", "-3"], "-t -3"),
    (["-t", "2048"], "-t 2048"),
    (["-d", "100"], "-d 100"),
    (["-x", "0"], "-x 0"),
    (["-k", "sqrt"], "-k"),
    (["-q", "2"], "-q 2"),
    (["-pn", "2", "-pr", "2"], "-pn 2"),
    (["-pn", "1", "-pr", "1"], "-pr 1"),
    (["-y", "1"], "-o DIR"),
    (["-n", "5"], "-o DIR"),
    (["-g", "500", "-s", "5"], "-g 500"),
    (["-g", "64", "-b", "1", "-s", "5"], "-g 64: tokens to sample must be in 2..32"),  # given, so not lowered
    (["-b", "1", "-t", "1", "-s", "5"], "-s 5: a sample needs 2 tokens, and B*T is 1"),
    (["-l", "nan"], "-l nan: must be a finite number"),
    (["-l", "inf"], "-l inf: must be a finite number"),
    (["-sg", "nan"], "-sg nan: must be a finite number"),
    (["-c", "inf"], "-c inf: must be a finite number"),
    (["--rendezvous-timeout", "nan"], "--rendezvous-timeout nan: must be a finite number"),
    (["-e", "q12"], "q12"),
    (["-e", "README.md"], "-e README.md: neither a .bin checkpoint nor dN / gpt2:dN"),
    (["-e", "d100000"], "-e d100000: "),  # numpy's 'Maximum allowed dimension exceeded' named no flag
    (["-d", "0"], "-d 0: the total batch must be positive"),  # 0 is a multiple of B*T: that was the message
    (["-h"], "-h is llm.c's HellaSwag flag, 0 or 1; for help, give --help"),
    (["-h", "-x", "3"], "-h is llm.c's HellaSwag flag, 0 or 1; for help, give --help"),
    (["-e", "missing.bin"], "missing.bin"),
    (["-e", "bad.bin"], "bad.bin"),
    (["-i", "nothing_*.bin"], "-i nothing_*.bin: no file matches"),
    (["-j", "nothing.bin"], "-j nothing.bin: no file matches"),
    (["-i", "badshard.bin"], "badshard.bin"),
    (["-h", "1"], "no data/hellaswag/hellaswag_val.bin: python -m prepro.hellaswag writes it"),
    (["-o", "full"], "-y 1"),
    (["-o", ""], "-o '': give a run directory's path"),
    (["-o", "bad.bin"], "-o bad.bin: is a file, not a directory"),
]


@pytest.mark.parametrize("args, expected", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_a_nonzero_exit_and_no_files(data, tmp_path, args, expected):
    (tmp_path / "bad.bin").write_bytes(b"\0" * 2000)
    (tmp_path / "badshard.bin").write_bytes(b"\1" * 2000)
    (tmp_path / "README.md").write_text("# not a model\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "DONE_00000003").touch()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = run(*TINY, *data, "-x", "2", *args, cwd=tmp_path, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert result.stdout == ""
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_cuda_asked_for_where_it_cannot_run_is_one_line(data, tmp_path):
    if cuda_unavailable() is None:
        pytest.skip("this machine can run the CUDA backend")
    result = run(*TINY, *data, "-x", "2", "--device", "cuda", "-o", "out", cwd=tmp_path, check=False)
    assert result.returncode == 1 and result.stdout == "" and not (tmp_path / "out").exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"error: --device cuda: {cuda_unavailable()}; use --device cpu for the " \
                                            f"NumPy backend", result.stderr


def test_the_backend_chosen_is_said_in_one_line(data, tmp_path):
    auto = run(*TINY, *data, "-x", "1", cwd=tmp_path).stdout.splitlines()
    cpu = run(*TINY, *data, "-x", "1", "--device", "cpu", cwd=tmp_path).stdout.splitlines()
    if cuda_unavailable() is None:
        assert auto[0].startswith("backend: CUDA on ")
    else:  # auto falls back, and says why
        assert auto[0] == f"--device auto: {cuda_unavailable()}, so the NumPy backend runs on the CPU"
        assert auto[1:3] == cpu[:2] and losses_and_vals("\n".join(auto)) == losses_and_vals("\n".join(cpu))
    # what -ge -1 became, which --help says for the CPU (its help once said 0 below sm90, and the CPU said 2)
    assert cpu[0] == "backend: NumPy on CPU (fp32) | recompute -r 1 | GELU fusion -ge 2 (-1: this backend's choice)"
    ge_help = " ".join(help_blocks("train_gpt2.py")["-ge"])
    assert "-1: the backend's choice, 2 on sm90 and newer and on the CPU" in ge_help


# ----------------------------------------------------------------------------- schedules and the outlier detector

@pytest.mark.parametrize("schedule, step, expected", [
    # max lr 1, warmup 10, 110 steps, final fraction 0.1; llm.c's formulas evaluated by hand
    ("cosine", 0, 0.1), ("cosine", 9, 1.0), ("cosine", 10, 1.0), ("cosine", 60, 0.55), ("cosine", 110, 0.1),
    ("cosine", 35, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))),
    ("linear", 4, 0.5), ("linear", 10, 1.0), ("linear", 60, 0.55), ("linear", 85, 0.325),
    ("constant", 4, 0.5), ("constant", 10, 1.0), ("constant", 109, 1.0),
    ("wsd", 4, 0.5), ("wsd", 87, 1.0), ("wsd", 88, 1.0), ("wsd", 99, 0.1 + 0.9 * (1 - math.sqrt(0.5))),
    ("wsd", 110, 0.1),
])
def test_learning_rate_schedules(schedule, step, expected):
    assert gpt.learning_rate(schedule, step, 110, 1.0, 10, 0.1) == pytest.approx(expected, abs=1e-12)


def test_outlier_detector_scores_against_the_last_128_values_and_resumes_from_its_window():
    values = np.random.default_rng(3).standard_normal(300) + np.arange(300) * 0.01
    detector = gpt.OutlierDetector()
    z = [detector.update(v) for v in values]
    assert all(math.isnan(x) for x in z[:128])
    for i in (128, 200, 299):
        window = values[i - 127:i + 1]
        assert z[i] == pytest.approx((values[i] - window.mean()) / window.std(), rel=1e-12)
    stopped = gpt.OutlierDetector()
    for v in values[:150]:
        stopped.update(v)
    resumed = gpt.OutlierDetector(stopped.window)  # what the state file carries
    assert [resumed.update(v) for v in values[150:]] == z[150:]


def test_updates_are_skipped_exactly_where_the_z_score_is_over_the_threshold(data, capsys, monkeypatch):
    monkeypatch.setattr(gpt, "OUTLIER_WINDOW", 4)
    gpt.main([*TINY, *data, "-v", "0", "-x", "14", "-sg", "0.5"])
    lines = capsys.readouterr().out.splitlines()
    skipped = 0
    for before, line in zip(lines, lines[1:]):
        if line.startswith("step"):
            znorm = float(re.search(r"norm \S+ \((\S+)z\)", line).group(1))
            assert before.startswith("skipping update due to grad z-score") == (znorm > 0.5), (before, line)
            skipped += znorm > 0.5
    assert skipped > 0


# ----------------------------------------------------------------------------- HellaSwag

def test_hellaswag_answers_match_pytorch_scoring():
    """Our count of right answers on small random examples equals the PyTorch reference model's, with the same
    weights, scoring each ending by the mean loss of its own tokens."""
    torch_model = ref.init_llmc(ref.GPT2(ref.Config(num_layers=2, num_heads=2, channels=128, max_seq_len=1024,
                                                    vocab_size=50257, padded_vocab_size=50304)), seed=7)
    model = gpt.GPT2(gpt.config_from_descriptor("d2"), ref.llmc_flat(torch_model), 4, 32)
    rng = np.random.default_rng(5)
    examples = [HellaSwagExample(index=i, label=int(rng.integers(4)), context=rng.integers(0, 50257, 5 + i).tolist(),
                                 endings=[rng.integers(0, 50257, int(rng.integers(1, 6))).tolist() for _ in range(4)])
                for i in range(16)]
    correct = 0
    with torch.no_grad():
        for ex in examples:
            scores = []
            for ending in ex.endings:
                row = torch.tensor([ex.context + ending])
                logits, _ = torch_model(row[:, :-1])
                token_losses = torch.nn.functional.cross_entropy(logits[0], row[0, 1:], reduction="none")
                scores.append(float(token_losses[len(ex.context) - 1:].mean()))
            correct += int(np.argmin(scores) == ex.label)
    assert 0 < correct < len(examples)  # random weights: some right, some wrong, so the comparison means something
    assert gpt.hellaswag_correct(model, examples) == correct


def test_hellaswag_flag_evaluates_the_file_and_logs_it(data, tmp_path):
    rng = np.random.default_rng(6)
    examples = [HellaSwagExample(index=i, label=i % 4, context=rng.integers(0, 50257, 6).tolist(),
                                 endings=[rng.integers(0, 50257, 3).tolist() for _ in range(4)]) for i in range(5)]
    (tmp_path / "data" / "hellaswag").mkdir(parents=True)
    write_hellaswag(tmp_path / "data" / "hellaswag" / "hellaswag_val.bin", examples)
    result = run(*TINY, *data, "-x", "4", "-v", "2", "-m", "1", "-h", "1", "-o", "out", cwd=tmp_path)
    assert len(re.findall(r"^HellaSwag: \d\.\d{4} of 5$", result.stdout, re.M)) == 2  # steps 2 and 4
    log = (tmp_path / "out" / "main.log").read_text()
    assert re.findall(r"^s:(\d+) eval:", log, re.M) == ["2", "4"]


# ----------------------------------------------------------------------------- learning on Tiny Shakespeare

def test_a_small_model_learns_tiny_shakespeare_beyond_token_frequencies():
    """d2 (2 layers, C=128) from scratch, 150 steps of 512 tokens: its val loss (10.84 at the start)
    falls below 6.5, and below the val cross-entropy of the train split's token frequencies (6.54
    on the offline corpus), the best a model that ignores context can do. Measured: 6.39."""
    subprocess.run([sys.executable, "-m", "prepro.tinyshakespeare"], cwd=REPO, check=True, capture_output=True)
    result = run("-e", "d2", "-b", "8", "-t", "64", "-x", "150", "-l", "2e-3", "-u", "10", "-v", "150", "-m", "16",
                 "-s", "0", cwd=REPO)
    val = [float(v) for v in re.findall(r"^val loss (\S+)", result.stdout, re.M)]
    assert len(val) == 2 and val[0] > 10.5
    train = np.asarray(read_shard(REPO / gpt.TRAIN_DATA))
    val_tokens = np.asarray(read_shard(REPO / gpt.VAL_DATA))[:16 * 8 * 64 + 1]
    frequencies = (np.bincount(train, minlength=50257) + 0.01) / (train.size + 0.01 * 50257)
    unigram_loss = float(-np.log(frequencies[val_tokens[1:]]).mean())  # the targets of the 16 val batches
    assert val[-1] < 6.5 and val[-1] < unigram_loss, (val, unigram_loss)


def test_a_bad_token_in_a_later_shard_ends_the_run_in_one_line(data, tmp_path):
    """Only the first train file's tokens are read at start; another's are checked when its turn
    comes, mid-run, and a bad one there is the same one line and exit 1, not a traceback. Three
    shards, which llm.c's seed-42 shuffle visits last file first: train_000003, then the bad one."""
    first, second = sorted(Path(data[1]).parent.glob("train_*.bin"))
    tokens = np.array(read_shard(second))
    tokens[5] = 50257
    write_shard(tmp_path / second.name, tokens)
    os.symlink(first, tmp_path / first.name)
    os.symlink(first, tmp_path / "train_000003.bin")
    result = run(*TINY, "-i", str(tmp_path / "train_*.bin"), "-j", data[3], "-x", "100", "-v", "0", "-s", "0",
                 cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {tmp_path / second.name}: token 50257 at position 5 is not below the " \
                                    f"vocab size 50257", result.stderr
    assert re.search(r"^step +46/100 ", result.stdout, re.M)  # all of train_000003 had been trained on


# ----------------------------------------------------------------------------- what a new user sees

def help_blocks(script):
    """--help of a script, as flag -> the words of its help."""
    out = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True, check=True)
    blocks, flag = {}, None
    for line in out.stdout.split("options:")[1].splitlines():
        if line.startswith("  -"):
            flag, line = line.split()[0], " ".join(line.split()[1:])
        if flag:
            blocks.setdefault(flag, []).extend(line.split())
    return blocks


@pytest.mark.parametrize("script", ["train_gpt2.py", "dev/torch_train.py", "dev/loss_parity.py"])
def test_help_shows_every_flags_default(script):
    blocks = help_blocks(script)
    assert len(blocks) > 10 and "-l" in blocks
    for flag, words in blocks.items():
        if flag != "--help":
            assert "(default:" in " ".join(words), (flag, " ".join(words))


def test_the_three_scripts_declare_llm_c_flags_alike_and_read_them_by_name(tmp_path):
    import loss_parity
    import torch_train
    parity = lambda argv: loss_parity.parse_args([*argv, "-o", str(tmp_path)])  # noqa: E731
    for parse in (gpt.parse_args, torch_train.parse_args, parity):
        with pytest.raises(SystemExit) as e:  # loss_parity's copy of -k once took any schedule
            parse(["-k", "sqrt"])
        assert e.value.code == 1
        args = parse(["-l", "1e-3", "-k", "wsd", "-b", "3", "-d", "-1"])
        assert (args.learning_rate, args.lr_schedule, args.micro_batch_size, args.total_batch_size) == \
            (1e-3, "wsd", 3, -1)
    blocks = [help_blocks(s) for s in ("train_gpt2.py", "dev/torch_train.py", "dev/loss_parity.py")]
    for flag in ("-i", "-j", "-b", "-t", "-k", "-l", "-u", "-q", "-c", "-v", "-m"):  # the same words, defaults aside
        first, *others = [" ".join(b[flag]).split("(default:")[0] for b in blocks]
        assert all(other == first for other in others), flag


def test_a_slow_cpu_step_is_estimated_before_the_first_step(data, capsys, monkeypatch):
    """python train_gpt2.py with no flags trains GPT-2 124M on the CPU: about a minute a step here, and
    once nothing said so before the first step came minutes later. The estimate is llm.c's flops per
    token (6 per parameter plus 6 L C T) over the matmul rate measured; here a slow one is given."""
    monkeypatch.setattr(gpt, "SLOW_CPU_STEP", 1e-3)  # seconds: d1's step is slow beside it
    monkeypatch.setattr(gpt, "matmul_rate", lambda: 1e6)
    gpt.main([*TINY, *data, "-v", "1", "-m", "1", "-x", "3", "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    estimate = next(i for i, line in enumerate(lines) if line.startswith("on the CPU: about "))
    assert estimate < min(i for i, line in enumerate(lines) if line.startswith(("val loss", "step")))
    config = gpt.config_from_descriptor("d1")
    flops = (6 * gpt.num_parameters(config) + 6 * 1 * 64 * 32) * 2 * 32  # d1: L=1 C=64; B=2 T=32
    minutes, seconds = map(int, re.search(r"about (\d+)m(\d+)s a step", lines[estimate]).groups())
    assert abs(60 * minutes + seconds - flops / 1e6) <= 1
    assert "for 3 steps; -e d2 takes about" in lines[estimate]
    monkeypatch.setattr(gpt, "matmul_rate", lambda: 1e15)
    gpt.main([*TINY, *data, "-v", "0", "-x", "1", "--device", "cpu"])
    assert "on the CPU: about" not in capsys.readouterr().out  # a fast step is not worth a line


def test_a_long_evaluation_shows_progress_on_stderr(data, capsys, monkeypatch):
    gpt.main([*TINY, *data, "-v", "1", "-m", "3", "-x", "1"])
    assert capsys.readouterr().err == ""  # quick evaluations show nothing
    monkeypatch.setattr(gpt, "EVAL_PROGRESS_DELAY", 0)  # as if each took longer than the delay
    gpt.main([*TINY, *data, "-v", "1", "-m", "3", "-x", "1"])
    err = capsys.readouterr().err
    assert "val loss" in err and "/3 [" in err, err


def test_the_step_line_ends_with_the_time_left(data, capsys):
    gpt.main([*TINY, *data, "-v", "0", "-x", "4"])
    steps = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert len(steps) == 4 and all(re.search(r"\| [\d.]+ s left$", line) for line in steps), steps
    assert steps[-1].endswith("| 0.0 s left")


@pytest.mark.parametrize("seconds, expected", [(0.42, "0.4 s"), (42.4, "42 s"), (425, "7m05s"), (11520, "3h12m")])
def test_durations_read_as_a_person_says_them(seconds, expected):
    assert gpt.duration(seconds) == expected


def test_missing_default_data_names_the_command_that_writes_it(tmp_path):
    result = run(*TINY, "-x", "1", cwd=tmp_path, check=False)
    assert result.returncode == 1 and result.stderr == (
        "error: -i data/tinyshakespeare/tiny_shakespeare_train.bin: no file matches this pattern (the default data: "
        "python -m prepro.tinyshakespeare writes it)\n")

"""dev/recipes/gpt2_*.sh: each prepares its data with our prepro scripts and trains with llm.c's published
hyperparameters for its size (llm.c's scripts/run_gpt2_*.sh), every flag one train_gpt2.py accepts.
Checked on the commands a dry run prints, and train_until_done's retries with a stub trainer; nothing is
trained."""
import os
import shlex
import subprocess
from pathlib import Path

import pytest

import train_gpt2
from cli import LLMC_FLAGS

REPO = Path(__file__).resolve().parents[1]

# llm.c's published runs: model, data, B, total batch, lr, final lr fraction, steps, and the rest
LLMC = {
    "gpt2_124M": dict(e="d12", data="fineweb10B/fineweb", b=64, d=524288, l=0.0006, q=0.0, x=18865, n=5000,
                      s=20000, g=144, ge=-1, k="cosine"),
    "gpt2_350M": dict(e="d24", data="fineweb100B/fineweb", b=64, d=524288, l=0.0003, q=0.0, x=60000, n=2000,
                      s=100000, g=144, ge=-1, k="cosine"),
    "gpt2_774M": dict(e="d36", data="fineweb100B/fineweb", b=32, d=524288, l=0.00025, q=0.0, x=286102, n=4000,
                      s=300000, g=144, ge=-1, k="cosine"),
    "gpt2_1558M": dict(e="d48", data="edu_fineweb100B/edu_fineweb", b=16, d=1048576, l=0.0006, q=0.1, x=32000,
                       n=2000, s=300000, g=384, ge=1, k="cosine"),
}


def dry_run(recipe):
    result = subprocess.run(["bash", f"dev/recipes/{recipe}.sh"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "DRY_RUN": "1", "PYTHON": "python", "GPUS": "8"}, timeout=60)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize("recipe", sorted(LLMC))
def test_a_recipe_prepares_its_data_then_trains_with_llm_c_s_hyperparameters(recipe):
    expected = LLMC[recipe]
    *prepro, train = dry_run(recipe)
    kind, version = ("edu" if expected["data"].startswith("edu") else "classic"), \
        ("100B" if "100B" in expected["data"] else "10B")
    assert prepro == [["python", "prepro/gpt2_tokenizer.py"], ["python", "prepro/hellaswag.py"],
                      ["python", "prepro/fineweb.py", "-t", kind, "-v", version]]
    assert train[:4] == ["python", "train_gpt2.py", "-pn", "8"]
    args = train_gpt2.parse_args(train[2:])
    given = lambda *flags: tuple(getattr(args, LLMC_FLAGS[flag][0]) for flag in flags)  # noqa: E731
    folder, prefix = expected["data"].split("/")
    assert given("-i", "-j") == (f"data/{folder}/{prefix}_train_*.bin", f"data/{folder}/{prefix}_val_*.bin")
    assert given("-e", "-b", "-t", "-d", "-l", "-q", "-x", "-n", "-s", "-g", "-ge", "-k") == \
        (expected["e"], expected["b"], 1024, expected["d"], expected["l"], expected["q"], expected["x"],
         expected["n"], expected["s"], expected["g"], expected["ge"], expected["k"])
    # the same in every llm.c run: no recompute, ZeRO-1, weight decay 0.1, 700 warmup steps, val and
    # HellaSwag every 250 steps, resume from the newest checkpoint
    assert given("-r", "-z", "-c", "-u", "-v", "-h", "-y") == (0, 1, 0.1, 700, 250, 1, 1)
    assert given("-o") == (f"log_{recipe}",)
    assert args.max_restarts > 0  # a rank that dies is restarted by the launcher, which tells it from bad input
    # the total batch divides over 8 processes of B x 1024
    assert expected["d"] % (8 * expected["b"] * 1024) == 0


@pytest.mark.parametrize("recipe", sorted(LLMC))
def test_the_printed_train_command_pasted_into_bash_passes_each_shard_pattern_whole(recipe, tmp_path):
    """With the shards there, an unquoted pattern would reach the trainer as one argument per shard."""
    folder, prefix = LLMC[recipe]["data"].split("/")
    (tmp_path / "data" / folder).mkdir(parents=True)
    for name in ("train_000001", "train_000002", "val_000000"):
        (tmp_path / "data" / folder / f"{prefix}_{name}.bin").touch()
    command = subprocess.run(["bash", f"dev/recipes/{recipe}.sh"], cwd=REPO, capture_output=True, text=True,
                             env={**os.environ, "DRY_RUN": "1", "PYTHON": "python", "GPUS": "8"},
                             timeout=60).stdout.splitlines()[-1]
    pasted = subprocess.run(["bash", "-c", 'python() { printf "%s\\n" "$@"; }\n' + command], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert pasted.returncode == 0, pasted.stderr
    argv = pasted.stdout.splitlines()
    assert argv[0] == "train_gpt2.py"
    assert argv[argv.index("-i") + 1] == f"data/{folder}/{prefix}_train_*.bin"
    assert argv[argv.index("-j") + 1] == f"data/{folder}/{prefix}_val_*.bin"


def train_until_done(tmp_path, attempt_script):
    """common.sh's train_until_done OUT 5 with a stub trainer: each attempt logs its arguments and then runs
    attempt_script, with $attempt its number from 1 and $out the run directory."""
    out = tmp_path / "out"
    stub = tmp_path / "trainer"
    stub.write_text(f'#!/usr/bin/env bash\necho "$*" >> {tmp_path}/attempts\nattempt=$(wc -l < {tmp_path}/attempts)\n'
                    f'out={out}\n{attempt_script}\n')
    stub.chmod(0o755)
    result = subprocess.run(["bash", "-c", 'source dev/recipes/common.sh && train_until_done "$1" 5 -e d2', "bash",
                             str(out)], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHON": str(stub), "GPUS": "2"})
    attempts = (tmp_path / "attempts").read_text().splitlines() if (tmp_path / "attempts").exists() else []
    return result, attempts


FINISH = 'mkdir -p "$out" && touch "$out/DONE_00000005"'


@pytest.mark.parametrize("death", ["kill -KILL $$", "kill -TERM $$", "exit 137"])
def test_a_trainer_killed_by_a_signal_is_run_again_until_the_run_is_done(death, tmp_path):
    result, attempts = train_until_done(tmp_path, f'if [ "$attempt" -lt 3 ]; then {death}; fi\n{FINISH}')
    assert result.returncode == 0, result.stderr
    assert len(attempts) == 3
    assert attempts[0] == f"train_gpt2.py -pn 2 --max-restarts 20 -o {tmp_path / 'out'} -x 5 -y 1 -e d2"
    assert result.stdout.strip() == f"{tmp_path / 'out'}/DONE_00000005 exists: the run is complete"


@pytest.mark.parametrize("status, expected", [
    (1, "error: train_gpt2.py exited with status 1 (its error is above): not retried"),
    (130, "train_gpt2.py was interrupted (status 130): not retried"),  # a Ctrl-C
    (0, "error: train_gpt2.py ended without writing"),
])
def test_a_trainer_that_refuses_its_input_or_is_interrupted_is_not_run_again(status, expected, tmp_path):
    """The trainer exits 1 with one error line on bad input (cli.fail), e.g. a missing shard: every
    retry would meet it again."""
    result, attempts = train_until_done(tmp_path, f'echo "error: -i data/x_*.bin: no such file" >&2; exit {status}')
    assert result.returncode == (status or 1)
    assert len(attempts) == 1
    assert result.stderr.splitlines()[-1].startswith(expected), result.stderr

"""dev/recipes/gpt2_*.sh: each prepares its data with our prepro scripts and trains with llm.c's published
hyperparameters for its size (llm.c's scripts/run_gpt2_*.sh), every flag one train_gpt2.py accepts.
Checked on the commands a dry run prints; nothing is trained."""
import os
import shlex
import subprocess
from pathlib import Path

import pytest

import train_gpt2

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
    folder, prefix = expected["data"].split("/")
    assert (args.i, args.j) == (f"data/{folder}/{prefix}_train_*.bin", f"data/{folder}/{prefix}_val_*.bin")
    assert (args.e, args.b, args.t, args.d, args.l, args.q, args.x, args.n, args.s, args.g, args.ge, args.k) == \
        (expected["e"], expected["b"], 1024, expected["d"], expected["l"], expected["q"], expected["x"],
         expected["n"], expected["s"], expected["g"], expected["ge"], expected["k"])
    # the same in every llm.c run: no recompute, ZeRO-1, weight decay 0.1, 700 warmup steps, val and
    # HellaSwag every 250 steps, resume from the newest checkpoint
    assert (args.r, args.z, args.c, args.u, args.v, args.h, args.y) == (0, 1, 0.1, 700, 250, 1, 1)
    assert args.o == f"log_{recipe}"
    # the total batch divides over 8 processes of B x 1024
    assert expected["d"] % (8 * expected["b"] * 1024) == 0

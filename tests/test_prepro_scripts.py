"""Every prepro script runs the two ways a user types it from a fresh checkout's root, `python prepro/X.py`
and `python -m prepro.X`, on small local inputs, and both ways write the same files."""
import filecmp
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["gpt2_tokenizer", "tinyshakespeare", "fineweb", "tinystories", "hellaswag", "gpt2_weights"]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """The repository's files as a fresh clone has them (tracked and new, nothing ignored: no data/, no
    caches), for what the prepro scripts import."""
    root = tmp_path_factory.mktemp("checkout")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "--", "cli.py", "fileformats.py", "prepro"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / name, root / name)
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    text = "\n\n".join(f"Citizen {i}: Before we proceed any further, hear me speak of {i * 7919} ducats."
                       for i in range(2500))
    (folder / "input.txt").write_text(text)
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": f"Document {i}. " * 20}) + "\n" for i in range(50)))
    with tarfile.open(folder / "stories.tar.gz", "w:gz") as tar:
        for k in range(2):
            data = folder / f"data{k:02d}.json"
            data.write_text(json.dumps([{"story": f" Story {k}.{i}: a cat sat. "} for i in range(20)]))
            tar.add(data, arcname=data.name)
    ending = {"ctx": "A man is sitting on a roof. he", "label": 1, "endings": ["a", "b", "c", "d"]}
    (folder / "hellaswag.jsonl").write_text(json.dumps(ending) + "\n")
    from transformers import GPT2Config, GPT2LMHeadModel  # a small random GPT-2 saved as the hub saves them
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=64, n_positions=32)).save_pretrained(folder / "hf")
    return {
        "gpt2_tokenizer": lambda out: ["-o", str(out / "gpt2_tokenizer.bin")],
        "tinyshakespeare": lambda out: ["-o", str(out), "--url", (folder / "input.txt").as_uri()],
        "fineweb": lambda out: ["-o", str(out), "--source", str(folder / "docs.jsonl"), "-s", "1000",
                                "--processes", "1"],
        "tinystories": lambda out: ["-o", str(out), "--source", str(folder / "stories.tar.gz")],
        "hellaswag": lambda out: ["-o", str(out), "--source", str(folder / "hellaswag.jsonl")],
        "gpt2_weights": lambda out: ["-o", str(out), "--source", str(folder / "hf")],
    }


def written(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("script", SCRIPTS)
def test_runs_as_a_file_and_as_a_module_from_the_root(checkout, inputs, tmp_path, script):
    outs = {}
    for way, command in [("file", [f"prepro/{script}.py"]), ("module", ["-m", f"prepro.{script}"])]:
        out = tmp_path / way
        result = subprocess.run([sys.executable, *command, *inputs[script](out)], cwd=checkout,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{way}: {result.stderr}"
        outs[way] = out
    files = written(outs["file"])
    assert files and files == written(outs["module"])
    assert all(filecmp.cmp(outs["file"] / f, outs["module"] / f, shallow=False) for f in files)


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_output_path_under_a_plain_file_is_one_line(checkout, inputs, tmp_path, script):
    """What the filesystem refuses (here: -o below a regular file) is one line naming the path, exit 1."""
    (tmp_path / "plain").write_text("not a folder")
    result = subprocess.run([sys.executable, f"prepro/{script}.py", *inputs[script](tmp_path / "plain" / "out")],
                            cwd=checkout, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {tmp_path / 'plain'}") and lines[0].endswith(": Not a directory"), lines[0]

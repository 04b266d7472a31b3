"""prepro/gpt2_weights.py: a Hugging Face GPT-2 (a small random one the test saves, no network)
into llm.c's model files, checked against transformers' own forward; make test_gpt2 passes its
GPT2_SOURCE on, and offline the script names the way to give a local directory: its --source, or
under make that make variable."""
import os
import re
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

import train_gpt2 as gpt
from fileformats import read_model
from prepro import gpt2_weights

REPO = Path(__file__).resolve().parents[1]
L, NH, C, MAXT, V = 2, 4, 64, 48, 50257  # 3.3M parameters without the padding: gpt2_3M.bin


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)  # transformers' own random init
    hf = GPT2LMHeadModel(GPT2Config(n_layer=L, n_head=NH, n_embd=C, n_positions=MAXT, vocab_size=V,
                                    activation_function="gelu_new", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    hf.eval()
    directory = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(directory, safe_serialization=True)
    return directory, hf


def convert(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "prepro.gpt2_weights", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    result = convert("--source", str(hf_dir[0]), "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_our_forward_on_the_converted_model_gives_transformers_logits(hf_dir, converted):
    _, hf = hf_dir
    config, params = gpt.load_params(converted / "gpt2_3M.bin")
    assert (config.num_layers, config.num_heads, config.channels, config.max_seq_len) == (L, NH, C, MAXT)
    assert (config.vocab_size, config.padded_vocab_size) == (V, 50304)
    tokens = np.random.default_rng(1).integers(0, V, (2, MAXT)).astype(np.int32)
    model = gpt.GPT2(config, params, 2, MAXT)
    gpt.forward(model, tokens)
    with torch.no_grad():
        expected = hf(torch.from_numpy(tokens).long()).logits.numpy()
    ours = model.acts["logits"][..., :V]
    assert np.abs(ours - expected).max() <= 1e-5 * np.abs(expected).max()


def test_wte_is_padded_with_zero_rows_and_matrices_are_out_by_in(hf_dir, converted):
    _, hf = hf_dir
    config, params = gpt.load_params(converted / "gpt2_3M.bin")
    p = gpt.carve(params, gpt.param_shapes(config))
    assert not p["wte"][V:].any()
    np.testing.assert_array_equal(p["wte"][:V], hf.transformer.wte.weight.detach().numpy())
    np.testing.assert_array_equal(p["fcw"][1], hf.transformer.h[1].mlp.c_fc.weight.detach().numpy().T)  # (4C, C)


def test_the_bf16_file_is_the_fp32_one_rounded_to_bf16(converted):
    header = np.fromfile(converted / "gpt2_3M_bf16.bin", dtype="<i4", count=2)
    assert header.tolist() == [20240326, 5]
    assert np.fromfile(converted / "gpt2_3M.bin", dtype="<i4", count=2).tolist() == [20240326, 3]
    _, fp32 = read_model(converted / "gpt2_3M.bin")
    _, bf16 = read_model(converted / "gpt2_3M_bf16.bin")
    np.testing.assert_array_equal(bf16.view(np.uint16), fp32.astype(ml_dtypes.bfloat16).view(np.uint16))


def test_a_model_name_downloads_its_hub_repo_and_names_the_files_as_llmc(hf_dir, tmp_path, monkeypatch, capsys):
    """The hub is out of reach here: the download returns the local directory, as it would its cache."""
    asked = []
    monkeypatch.setattr(gpt2_weights, "download", lambda model: asked.append(model) or str(hf_dir[0]))
    monkeypatch.setattr(gpt2_weights, "LLMC_NAMES", {(L, C): "124M"})  # as if this were GPT-2 124M's shape
    gpt2_weights.main(["gpt2", "-o", str(tmp_path)])
    assert asked == ["gpt2"] and gpt2_weights.HUB_REPOS["gpt2"] == "openai-community/gpt2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2_124M.bin", "gpt2_124M_bf16.bin"]


def test_it_runs_without_torch(hf_dir, tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is not to be imported')\n")
    result = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(blocker)!r}); "
                             f"from prepro.gpt2_weights import main; main(['--source', {str(hf_dir[0])!r}, "
                             f"'-o', {str(tmp_path / 'out')!r}])"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "gpt2_3M.bin").exists()


def test_bad_input_is_one_line(hf_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((hf_dir[0] / "config.json").read_text())
    for args, expected in [(["--source", str(tmp_path / "nothing")], "not a directory"),
                           (["--source", str(tmp_path / "empty")], "config.json"),
                           (["--source", str(tmp_path / "noweights")], "model.safetensors"),
                           (["gpt2", "--source", str(hf_dir[0])], "not both"),
                           ([], "--source DIR"),
                           (["gpt3"], "gpt3")]:
        result = convert(*args, "-o", str(tmp_path / "out"), cwd=tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and expected in lines[0], (args, result.stderr)
    assert not (tmp_path / "out").exists()


def make_recipe(*variables):
    """The command make test_gpt2 runs for data/gpt2_124M.bin (make -n: nothing is run), with the test's
    Python: one shell line."""
    result = subprocess.run(["make", "--no-print-directory", "-n", "-B", "test_gpt2", f"PY={sys.executable}",
                             *variables], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.replace("\\\n\t", "").splitlines()
    return next(line for line in lines if "prepro.gpt2_weights" in line)


def test_make_test_gpt2_reads_the_directory_given_as_gpt2_source(hf_dir, tmp_path):
    source = tmp_path / "a GPT-2 here"  # a space in the path, as a user's may have
    source.symlink_to(hf_dir[0])
    recipe = make_recipe(f"GPT2_SOURCE={source}")
    # what make would run, run from a folder of the test's (it writes data/ where it runs)
    result = subprocess.run(recipe, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["gpt2_3M.bin", "gpt2_3M_bf16.bin"]


def test_offline_the_script_names_its_flag_and_under_make_the_make_variable(tmp_path):
    offline = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "no_cache"))
    offline.pop("GPT2_WEIGHTS_MAKE_COMMAND", None)
    under_make = subprocess.run(make_recipe(), shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                                env=offline)
    direct = subprocess.run([sys.executable, "-m", "prepro.gpt2_weights", "gpt2"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env=offline)
    for result, how in [(under_make, "run make test_gpt2 GPT2_SOURCE=DIR"), (direct, "give --source DIR")]:
        assert result.returncode == 1 and result.stdout == ""
        assert re.fullmatch(r"error: cannot download openai-community/gpt2 from the Hugging Face hub: .+ "
                            rf"\(or {re.escape(how)}: a GPT-2 directory written by save_pretrained\)\n", result.stderr), \
            result.stderr
    assert "--source" not in under_make.stderr
    assert not (tmp_path / "data").exists()

"""dev/export_hf.py: the trainer's own checkpoint exported to a transformers GPT-2 directory,
loaded by transformers (no network) and checked against our forward; its tokenizer against
tiktoken's GPT-2."""
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

import train_gpt2 as gpt
from prepro.gpt2_tokenizer import gpt2_encoding

REPO = Path(__file__).resolve().parents[1]


def export(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "dev/export_hf.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A d2 model after 3 training steps, as the trainer checkpoints it."""
    run_dir = tmp_path_factory.mktemp("run") / "run"
    gpt.main(["-e", "d2", *data, "-b", "2", "-t", "32", "-x", "3", "-v", "0", "-s", "0", "-n", "3", "-l", "1e-3",
              "-o", str(run_dir)])
    return run_dir / "model_00000003.bin"


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "gpt2_d2"
    result = export("-i", str(trained), "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_transformers_gives_our_logits(trained, exported):
    from transformers import GPT2LMHeadModel
    config, params = gpt.load_params(trained)
    hf = GPT2LMHeadModel.from_pretrained(exported, local_files_only=True).eval()
    assert hf.config.n_layer == config.num_layers and hf.config.n_positions == config.max_seq_len
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (2, 48)).astype(np.int32)
    model = gpt.GPT2(config, params, 2, 48)
    gpt.forward(model, tokens)
    ours = model.acts["logits"][..., :config.vocab_size]
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens).long()).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied, as in GPT-2


def test_the_tokenizer_encodes_as_tiktoken_gpt2_does(exported):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    encoding = gpt2_encoding()
    for text in ["Hello world", " The quick brown fox's 123 jumps!\n\nNew  line", "naïve café — 日本語 🤖",
                 "First Citizen:\nBefore we proceed any further, hear me speak."]:
        assert tokenizer.encode(text) == encoding.encode(text)
    assert tokenizer.eos_token_id == encoding.eot_token == 50256


def test_bfloat16_export_holds_our_weights_rounded_to_bf16(trained, tmp_path):
    from transformers import GPT2LMHeadModel
    result = export("-i", str(trained), "-o", str(tmp_path / "bf16"), "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "bf16", local_files_only=True)
    assert hf.transformer.wte.weight.dtype == torch.bfloat16
    config, params = gpt.load_params(trained)
    qkvw = gpt.carve(params, gpt.param_shapes(config))["qkvw"][1]  # (3C, C)
    theirs = hf.transformer.h[1].attn.c_attn.weight.detach().float().numpy().T
    np.testing.assert_array_equal(theirs, qkvw.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_bad_input_is_one_line(trained, tmp_path):
    (tmp_path / "file").write_text("x")
    for args, expected in [(["-i", str(tmp_path / "none.bin"), "-o", "out"], "none.bin"),
                           (["-i", str(tmp_path / "file"), "-o", "out"], "file"),
                           (["-i", str(trained), "-o", str(tmp_path / "file")], "not a directory"),
                           (["-i", str(trained), "-o", "out", "--dtype", "fp8"], "--dtype")]:
        result = export(*args, cwd=tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and expected in lines[0], (args, result.stderr)
    assert not (tmp_path / "out").exists()

"""Sampling: the KV-cached forward against the full one, generation against the PyTorch
reference, dev/sample.py's command line, and the trainer's samples never costing a run."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bf16_twins
import train_gpt2 as gpt
from fileformats import read_model, write_model
from prepro.gpt2_tokenizer import gpt2_encoding

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "dev"))
import torch_gpt2 as ref  # noqa: E402

MAXT = 32
CONFIG = ref.Config(num_layers=2, num_heads=2, channels=64, max_seq_len=MAXT)
PROMPT_TEXT = "The meaning of life"
PROMPT = [50256] + gpt2_encoding().encode(PROMPT_TEXT)  # tiktoken's GPT-2, offline; EOT first, as dev/sample.py


@pytest.fixture(scope="module")
def torch_model():
    """llm.c's init plus N(0, 0.1) on every parameter: from llm.c's init alone greedy decoding
    repeats one token, which would not tell one position's argmax from another's."""
    model = ref.init_llmc(ref.GPT2(CONFIG), seed=3)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@pytest.fixture(scope="module")
def model_file(torch_model, tmp_path_factory):
    """The PyTorch reference's weights as an llm.c checkpoint with maxT 32."""
    path = tmp_path_factory.mktemp("model") / "model.bin"
    ref.write_model(path, torch_model)
    return path


def our_model(model_file, T=MAXT, K=gpt.reference):
    config, params = gpt.load_params(model_file)
    return gpt.GPT2(config, params, 1, T, K)


def torch_logits(torch_model, tokens):
    with torch.no_grad():
        return torch_model(torch.tensor([tokens]))[0][0].numpy()  # (T, V)


def test_logits_with_the_kv_cache_equal_a_full_forward_at_every_position(model_file):
    model = our_model(model_file)
    tokens = np.random.default_rng(0).integers(0, 50257, (1, MAXT)).astype(np.int32)
    gpt.forward(model, tokens)
    full = model.acts["logits"].copy()  # (1, T, Vp)
    cache = gpt.KVCache(model, 1, MAXT)
    cached = [gpt.forward(model, tokens[:, :7], cache).copy()]  # a prompt, then one position at a time
    cached += [gpt.forward(model, tokens[:, t:t + 1], cache).copy() for t in range(7, MAXT)]
    cached = np.concatenate(cached, axis=1)
    assert cached.shape == full.shape
    assert np.abs(cached - full).max() <= 1e-5 * np.abs(full).max()


def test_greedy_tokens_equal_the_pytorch_references(model_file, torch_model):
    ours = list(gpt.Sampler(our_model(model_file), MAXT).generate(PROMPT, MAXT - len(PROMPT), seed=0, temperature=0))
    tokens = list(PROMPT)
    while len(tokens) < MAXT:
        tokens.append(int(np.argmax(torch_logits(torch_model, tokens)[-1])))
    assert ours == tokens[len(PROMPT):]
    assert len(set(ours)) > 1  # not one token repeated: each position's argmax was really taken


def test_top_k_never_emits_a_token_outside_the_references_top_k(model_file, torch_model):
    sampler = gpt.Sampler(our_model(model_file), MAXT)
    k = 5
    for seed in range(3):  # temperature 10 flattens the softmax: without the cut, tokens far down would come
        new = list(sampler.generate(PROMPT, MAXT - len(PROMPT), seed=seed, temperature=10.0, top_k=k))
        logits = torch_logits(torch_model, PROMPT + new[:-1])[len(PROMPT) - 1:]  # the logits each token was drawn from
        top_k = np.argsort(logits, axis=-1)[:, -k:]
        assert all(token in row for token, row in zip(new, top_k))
        assert len({int(np.where(row == token)[0][0]) for token, row in zip(new, top_k)}) > 1  # not only the argmax


def test_without_a_cached_attention_the_prefix_is_recomputed_and_said_once(model_file, capsys):
    """The CUDA backend has no decode kernel yet: tests/bf16_twins.py stands in for its interface."""
    sampler = gpt.Sampler(our_model(model_file, K=bf16_twins), MAXT)
    assert capsys.readouterr().out.count("no cached attention kernel") == 1
    assert len(list(sampler.generate(PROMPT, 8, seed=1))) == 8


# ----------------------------------------------------------------------------- dev/sample.py

def sample(*args):
    return subprocess.run([sys.executable, str(REPO / "dev/sample.py"), "--device", "cpu", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_the_same_seed_gives_the_same_text_and_another_seed_another(model_file):
    runs = [sample("-e", str(model_file), "--prompt", PROMPT_TEXT, "-g", "20", "--seed", seed)
            for seed in ("5", "5", "6")]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    assert runs[0].stdout.startswith(PROMPT_TEXT) and len(runs[0].stdout) > len(PROMPT_TEXT) + 20
    assert runs[0].stdout == runs[1].stdout != runs[2].stdout
    assert "20 tokens in" in runs[0].stderr and "KV cache" in runs[0].stderr


def test_the_sampler_streams_the_text_tiktoken_decodes(model_file, torch_model):
    """Greedy, so the tokens are the PyTorch reference's; the text is theirs, decoded by tiktoken."""
    encoding = gpt2_encoding()
    tokens = list(PROMPT)
    while len(tokens) < MAXT:
        tokens.append(int(np.argmax(torch_logits(torch_model, tokens)[-1])))
    result = sample("-e", str(model_file), "--prompt", PROMPT_TEXT, "-g", str(MAXT - len(PROMPT)),
                    "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == encoding.decode(tokens[1:]) + "\n"


BAD_SAMPLE_INPUTS = [
    (["--no-eot"], "--no-eot"),
    (["-g", "40"], "-g 40"),
    (["-g", "28", "--prompt", PROMPT_TEXT], "-g 28"),
    (["--prompt", "word " * 40], "--prompt is"),
    (["--temperature", "-0.5"], "--temperature -0.5: must be a finite number >= 0"),
    (["--temperature", "nan"], "--temperature nan: must be a finite number >= 0"),
    (["--temperature", "inf"], "--temperature inf: must be a finite number >= 0"),
    (["--top-k", "-1"], "--top-k -1"),
    (["-e", "missing.bin"], "missing.bin"),
    (["--seed", "-1", "-g", "4"], "--seed -1"),
    (["--bench", "--no-cache"], "drop --no-cache"),
]


@pytest.mark.parametrize("args, expected", BAD_SAMPLE_INPUTS, ids=[" ".join(a)[:30] for a, _ in BAD_SAMPLE_INPUTS])
def test_bad_sampler_input_is_one_line(model_file, args, expected):
    result = sample("-e", str(model_file), *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], \
        result.stderr


def test_a_file_that_is_no_checkpoint_is_named_once(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bytes(2048))
    result = sample("-e", str(bad))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"error: -e {bad}: bad magic"), \
        result.stderr
    assert lines[0].count(str(bad)) == 1


# ----------------------------------------------------------------------------- the trainer's samples

def test_g_past_the_models_max_seq_len_is_one_line_at_start_with_nothing_written(data, model_file, tmp_path):
    """-g 64, and the model's maxT is 32: the flags alone cannot tell."""
    result = subprocess.run([sys.executable, str(REPO / "train_gpt2.py"), "-e", str(model_file), *data, "-b", "2",
                             "-t", "32", "-x", "2", "-s", "1", "-g", "64", "-n", "1", "-o", "out"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and result.stdout == "", result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: -g 64") and "32" in lines[0]
    assert os.listdir(tmp_path) == []


def test_a_failure_in_the_final_sample_leaves_the_final_checkpoint_on_disk(data, tmp_path, monkeypatch):
    def broken(self, prompt, num_new, seed, temperature=1.0, top_k=0):
        raise RuntimeError("sampling failed")
        yield

    monkeypatch.setattr(gpt.Sampler, "generate", broken)
    with pytest.raises(RuntimeError, match="sampling failed"):
        gpt.main(["-e", "d1", *data, "-b", "2", "-t", "32", "-x", "3", "-v", "0", "-s", "5", "-g", "16", "-n", "2",
                  "-o", str(tmp_path / "run")])
    names = set(os.listdir(tmp_path / "run"))
    assert {"model_00000003.bin", "state_00000003_00000.bin", "DONE_00000003"} <= names
    read_model(tmp_path / "run" / "model_00000003.bin")  # whole


def test_a_diverged_checkpoint_is_one_line_in_dev_sample(model_file, tmp_path):
    """A checkpoint whose weights went nan: dev/sample.py names it in one line, greedy or not."""
    config, params = read_model(model_file)
    params = params.copy()
    params[:1000] = np.nan
    path = tmp_path / "nan.bin"
    write_model(path, config, params, 3)
    for temperature in ("0", "1"):
        result = subprocess.run([sys.executable, str(REPO / "dev/sample.py"), "-e", str(path), "-g", "4", "--device",
                                 "cpu", "--temperature", temperature], capture_output=True, text=True, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1, result.stderr
        assert lines[0] == f"error: -e {path}: the model's logits are not finite (nan): it diverged", lines[0]

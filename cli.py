"""The command-line convention every script here shares: a mistake the user can make (a bad flag,
a missing file, a batch that does not divide) is one line on stderr naming the value and the fix,
and exit status 1; never a traceback. And a failure leaves no empty output folder behind."""
import argparse
import contextlib
import sys
from pathlib import Path


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, missing or non-numeric value) are one line and exit 1;
    hints: flag -> what to say after an error about that flag, in place of '(see --help)'."""

    def __init__(self, *args, hints=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.hints = hints or {}

    def error(self, message):
        flag = message.removeprefix("argument ").split(":")[0] if message.startswith("argument ") else None
        fail(f"{message}: {self.hints[flag]}" if flag in self.hints else f"{message} (see --help)")


def run(main):
    """Call main(), turning what the machine refuses into one line as well: a path that cannot be read
    or written (missing, read-only, a directory where a file belongs, a full disk) names the path;
    memory that cannot be had says how much."""
    try:
        main()
    except OSError as e:
        path = e.filename2 or e.filename  # a rename's target, not the temporary name it came from
        fail(f"{path}: {e.strerror}" if path is not None and e.strerror else str(e))
    except MemoryError as e:
        fail(f"out of memory: {e}" if str(e) else "out of memory")


@contextlib.contextmanager
def output_folder(folder):
    """folder, made (with its parents) if missing; a block that fails before putting anything in the
    folders made here removes them again, so a failed run leaves no empty folder behind."""
    folder = Path(folder)
    made = [f for f in (folder, *folder.parents) if not f.exists()]  # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        for f in made:
            with contextlib.suppress(OSError):  # one that is not empty stays
                f.rmdir()
        raise


# llm.c's training flags, declared once for every script that takes them (train_gpt2.py, and
# dev/torch_train.py and dev/loss_parity.py, which run beside it on the same flags): the short form
# llm.c's train_gpt2.cu reads -> the descriptive name the code reads it as (args.learning_rate for -l,
# as llm.c maps each flag to a named variable), its help, and argparse's other keywords. The help
# gets the default appended; a script may give another default, by name, to add_llmc_flags.
LLMC_FLAGS = {
    "-i": ("train_data", "train data: a shard path or glob", {}),
    "-j": ("val_data", "val data: a shard path or glob", {}),
    "-e": ("model", "model: a checkpoint .bin (version 3 or 5), or dN / gpt2:dN for a fresh GPT-2 of depth N "
                    "(d12 is the 124M model, d2 a small one the CPU trains fast)", dict(default="d12")),
    "-o": ("output_dir", "run directory for main.log and checkpoints", dict(default=None)),
    "-b": ("micro_batch_size", "micro-batch size B", dict(type=int, default=4)),
    "-t": ("seq_len", "sequence length T", dict(type=int, default=1024)),
    "-d": ("total_batch_size", "total batch in tokens; grad accumulation = d / (B*T*processes); -1: B*T*processes, "
                               "no accumulation", dict(type=int, default=-1)),
    "-x": ("max_steps", "steps to train; -1: one epoch of -i", dict(type=int, default=-1)),
    "-l": ("learning_rate", "peak learning rate", dict(type=float, default=3e-4)),
    "-k": ("lr_schedule", "learning rate schedule", dict(default="cosine", choices=("cosine", "linear", "constant",
                                                                                   "wsd"))),
    "-u": ("warmup_steps", "learning rate warmup steps", dict(type=int, default=0)),
    "-q": ("final_lr_frac", "final learning rate as a fraction of -l; 1.0: no decay", dict(type=float, default=1.0)),
    "-c": ("weight_decay", "weight decay, on 2-D weights only", dict(type=float, default=0.0)),
    "-v": ("val_loss_every", "val loss every v steps, and at the end; 0: never", dict(type=int, default=20)),
    "-m": ("val_batches", "val batches per val loss; -1: the whole val split", dict(type=int, default=20)),
    "-s": ("sample_every", "sample from the model every s steps, and at the end; 0: never",
           dict(type=int, default=20)),
    "-g": ("sample_tokens", "tokens per sample, the first being EOT; none: 64, or fewer where B*T or the model's "
                            "maximum sequence length is smaller", dict(type=int, default=None)),
    "-h": ("hellaswag", "1: HellaSwag accuracy with the val loss, on data/hellaswag/hellaswag_val.bin (python -m "
                        "prepro.hellaswag writes it); llm.c's flag, so help is --help",
           dict(type=int, default=0, choices=(0, 1))),
    "-a": ("overfit_single_batch", "1: overfit the first batch (no shuffling)", dict(type=int, default=0,
                                                                                     choices=(0, 1))),
    "-n": ("checkpoint_every", "checkpoint every n steps, and at the end; 0: never", dict(type=int, default=0)),
    "-nk": ("checkpoints_keep", "keep only the last k checkpoints; 0: all", dict(type=int, default=0)),
    "-nm": ("major_checkpoint_every", "checkpoints at multiples of m are major: never removed by -nk; 0: none",
            dict(type=int, default=0)),
    "-y": ("resume", "1: resume from the newest complete checkpoint in -o", dict(type=int, default=0,
                                                                                 choices=(0, 1))),
    "-sl": ("skip_update_lossz", "skip the update when the loss z-score exceeds this; 0: off",
            dict(type=float, default=0.0)),
    "-sg": ("skip_update_gradz", "skip the update when the grad-norm z-score exceeds this; 0: off",
            dict(type=float, default=0.0)),
    "-w": ("master_weights", "1: keep fp32 master weights (the CUDA path; the CPU is fp32 already)",
           dict(type=int, default=1, choices=(0, 1))),
    "-ge": ("gelu_fusion", "GELU fused into the matmuls: 0 none, 1 forward, 2 forward+backward; -1: the backend's "
                           "choice, 2 on sm90 and newer and on the CPU, else 0",
            dict(type=int, default=-1, choices=(-1, 0, 1, 2))),
    "-z": ("zero_stage", "ZeRO stage: 1 shards the AdamW state across processes",
           dict(type=int, default=0, choices=(0, 1))),
    "-r": ("recompute", "recompute in backward, keeping less memory: 0 none, 1 GELU, 2 GELU and layernorm",
           dict(type=int, default=1, choices=(0, 1, 2))),
    "-pn": ("num_processes", "number of processes; alone (no -pr, no launcher's environment), it starts them all on "
                             "this machine; none: 1, or the launcher's", dict(type=int, default=None)),
    "-pr": ("process_rank", "this process's rank, for processes started by hand; none: from torchrun, srun or "
                            "mpirun's environment, else 0", dict(type=int, default=None)),
    "-pg": ("gpus_per_node", "GPUs per node: a rank from -pr uses GPU rank %% pg", dict(type=int, default=8)),
    "-pi": ("init_method", "how the ranks meet: tcp at -ps, fs through -pf, env at MASTER_ADDR:MASTER_PORT (or "
                           "torchrun's store, or Slurm's first node)",
            dict(default="env", choices=("tcp", "fs", "env"))),
    "-ps": ("server_address", "rank 0's address HOST[:PORT], for -pi tcp (port: MASTER_PORT or 29500)",
            dict(default="")),
    "-pf": ("fs_path", "a directory every rank can write, for -pi fs", dict(default="/tmp")),
}


def add_llmc_flags(parser, flags, **defaults):
    """Add the llm.c flags named in flags ("-i -j -b ..."), each read as its descriptive name;
    defaults, by that name, replace the table's."""
    for flag in flags.split():
        dest, help, options = LLMC_FLAGS[flag]
        options = dict(options, dest=dest)
        if dest in defaults:
            options["default"] = defaults.pop(dest)
        assert "default" in options, f"{flag}: the script gives its default"
        options["help"] = f"{help} (default: {'none' if options['default'] is None else '%(default)s'})"
        parser.add_argument(flag, **options)
    assert not defaults, f"defaults for flags not added: {sorted(defaults)}"

"""The run directory (-o): what a run leaves on disk, and where -y 1 goes on from.

    main.log                    rank 0's lines, llm.c's s:<step> trl:/tel:/eval: format
    model_%08d.bin              the parameters at a step (rank 0)
    state_%08d_%05d.bin         each rank's AdamW state and data position at that step
    DONE_%08d                   written last: the checkpoint of that step is whole

Every file is written under a temporary name and renamed into place, DONE last, with SIGINT and
SIGTERM held back meanwhile, so a stopped run leaves whole checkpoints only; -y 1 goes on from the
newest DONE, bit for bit.
"""
import contextlib
import glob
import os
import re
import signal

from cli import fail
from distributed import optimizer_range
from fileformats import FormatError, atomic_write, read_state, state_fits, write_state


def checkpoint_paths(run_dir, step, rank=0):
    return (os.path.join(run_dir, f"model_{step:08d}.bin"), os.path.join(run_dir, f"state_{step:08d}_{rank:05d}.bin"),
            os.path.join(run_dir, f"DONE_{step:08d}"))


def done_steps(run_dir):
    """Steps with a complete checkpoint in run_dir, ascending."""
    names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    return sorted(int(m.group(1)) for m in map(re.compile(r"DONE_(\d{8})$").match, names) if m)


def resume_step(run_dir, resume, nproc, rank):
    """The step -y 1 (resume) goes on from, or None for a fresh run; before anything is read from
    the checkpoint, run_dir is checked against the flags, and rank 0 removes what an interrupted
    write left there."""
    if run_dir is None:
        return None
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        fail(f"-o {run_dir}: is a file, not a directory")
    if not os.path.isdir(run_dir):
        return None
    if rank == 0:
        clean_run_dir(run_dir)
    steps = done_steps(run_dir)
    if steps and not resume:
        fail(f"-o {run_dir} already holds checkpoints (up to step {steps[-1]}): resume with -y 1, "
             f"or give another run directory")
    if not steps:
        return None
    # before any rank looks for its own state file, which another count may lack
    written_by = len(glob.glob(os.path.join(glob.escape(run_dir), f"state_{steps[-1]:08d}_*.bin")))
    if written_by != nproc:
        fail(f"-o {run_dir}: the checkpoint at step {steps[-1]} was written by a run of {written_by} process(es), "
             f"and this one has {nproc}: resume with the same number (-pn {written_by})")
    return steps[-1]


def read_optimizer_state(path, num_params, nproc, rank, zero_stage):
    """This rank's state file of a checkpoint, for -z zero_stage. With several processes -z 0 and
    -z 1 keep different shares of the AdamW state, and the file's size is all that tells them
    apart: one that fits the other stage's share names -z, in words every rank shares."""
    shares = [hi - lo for lo, hi in (optimizer_range(num_params, nproc, rank, z) for z in (0, 1))]
    try:
        return read_state(path, shares[zero_stage], nproc)
    except FormatError:
        other = 1 - zero_stage
        if shares[other] != shares[zero_stage] and state_fits(path, shares[other], nproc):
            raise ValueError(f"-z {zero_stage}: {os.path.dirname(path)} holds a checkpoint written by a -z {other} "
                             f"run: resume with -z {other}") from None
        raise


def save_checkpoint(run_dir, step, comm, save_model, state):
    """model_ (rank 0, written by save_model(path)), state_ (one per rank) and DONE_ for this step.
    Every file is written in full under a temporary name first; once every rank's are, each rank
    renames its own and, once every rank has, rank 0 writes DONE, all with SIGINT/SIGTERM held
    back. So a run stopped by a signal leaves either the whole checkpoint or only .partial files;
    only SIGKILL or a power cut can land between a rename and DONE, and the next run's
    clean_run_dir removes files whose DONE never came."""
    model_path, state_path, done_path = checkpoint_paths(run_dir, step, comm.rank)
    renames = [(state_path + ".partial", state_path)]
    if comm.rank == 0:
        save_model(model_path + ".partial")
        renames.insert(0, (model_path + ".partial", model_path))
    write_state(state_path + ".partial", state)
    comm.barrier()
    with signals_held():
        for partial, path in renames:
            os.replace(partial, path)
        comm.barrier()
        if comm.rank == 0:
            with atomic_write(done_path):
                pass


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM wait until the block is over."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def remove_checkpoint(run_dir, step):
    """DONE first (never a DONE without its files), then the model and every rank's state."""
    model_path, _, done_path = checkpoint_paths(run_dir, step)
    states = glob.glob(os.path.join(glob.escape(run_dir), f"state_{step:08d}_*.bin"))
    for path in [done_path, model_path, *sorted(states)]:
        if os.path.exists(path):
            os.remove(path)


def prune_checkpoints(run_dir, keep, major_every):
    """Keep the newest `keep` checkpoints (0: all), and every one whose step is a multiple of major_every."""
    if keep > 0:
        for step in done_steps(run_dir)[:-keep]:
            if major_every == 0 or step % major_every != 0:
                remove_checkpoint(run_dir, step)


def clean_run_dir(run_dir):
    """Remove what an interrupted write left behind: temporary files (save_checkpoint's .partial,
    atomic_write's .tmp<pid>), and model or state files whose DONE never came."""
    done = set(done_steps(run_dir))
    for name in os.listdir(run_dir):
        m = re.match(r"(model|state)_(\d{8})[._]", name)
        if re.search(r"\.partial$|\.tmp\d+$", name) or (m and int(m.group(2)) not in done):
            os.remove(os.path.join(run_dir, name))


class Log:
    """main.log in llm.c's line format (s:<step> trl:/tel:/eval:). A resumed run first drops the
    lines of steps it is about to redo, so the log reads as if the run had never stopped."""

    def __init__(self, run_dir, first_step):
        self.path = os.path.join(run_dir, "main.log")
        kept = []
        if first_step > 0 and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if (m := re.match(r"s:(\d+) ", line)) and int(m.group(1)) < first_step]
        with atomic_write(self.path) as f:
            f.write("".join(kept).encode())
        self.file = open(self.path, "a")

    def write(self, line):
        self.file.write(line + "\n")
        self.file.flush()

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
import dataclasses
import errno
import fcntl
import glob
import os
import re
import signal
import socket

import numpy as np

from cli import fail
from distributed import optimizer_range
from fileformats import (FormatError, OptimizerState, atomic_write, num_parameters, read_model_config, read_state,
                         state_shard_size, write_state)


LOCK = "lock"  # rank 0's lock on the directory; the file holds "<pid> <host>" of the process that took it last
_held = {}  # run directories (real paths) this process holds the lock of -> its file descriptor, never closed


class RunDir:
    """The run directory of one process (rank). Rank 0 holds a lock on it for as long as it lives,
    released by the kernel however the process ends, so no stale lock can outlive a run; a second
    trainer on the same -o refuses, naming the holder. The lock is taken before anything in the
    directory is read where its file is there already, else at start(): a directory no trainer
    has written to stays as it was when a run is refused on bad input."""

    def __init__(self, path, rank):
        if os.path.exists(path) and not os.path.isdir(path):
            fail(f"-o {path}: is a file, not a directory")
        self.path, self.rank = path, rank
        if rank == 0:
            self._hold(create=False)

    def paths(self, step, rank=0):
        """model_, state_ (of rank) and DONE_ of the checkpoint at step."""
        return (os.path.join(self.path, f"model_{step:08d}.bin"),
                os.path.join(self.path, f"state_{step:08d}_{rank:05d}.bin"), os.path.join(self.path, f"DONE_{step:08d}"))

    def done_steps(self):
        """Steps with a complete checkpoint, ascending."""
        names = os.listdir(self.path) if os.path.isdir(self.path) else []
        return sorted(int(m.group(1)) for m in map(re.compile(r"DONE_(\d{8})$").match, names) if m)

    def checkpoint(self, resume):
        """The newest whole checkpoint, which -y 1 (resume) goes on from, or None for a fresh run.
        One whose files are not whole, despite its DONE (a file deleted, or torn by a disk that lost
        data in a crash), is passed over for the one before, and said: a job restarted by itself
        after a node died then goes on, losing one checkpoint's interval, where a refusal would
        stop it until someone came. Nothing is removed: a run going on from an earlier checkpoint
        writes that step's files anew when it gets there."""
        steps = self.done_steps()
        if steps and not resume:
            fail(f"-o {self.path} already holds checkpoints (up to step {steps[-1]}): resume with -y 1, "
                 f"or give another run directory")
        broken = []
        for step in reversed(steps):
            try:
                checkpoint = self._whole(step)
            except FormatError as e:
                broken.append((step, e))
                continue
            if broken:
                print(f"-o {self.path}: {_not_whole(broken)}: going on from the newest whole one, at step {step}")
            return checkpoint
        if broken:
            fail(f"-o {self.path}: {_not_whole(broken)}, and no earlier one is: restore its files, or start again "
                 f"in another -o")
        return None

    def _whole(self, step):
        """The checkpoint at step, if its model file and every state file are whole as far as their
        headers and sizes tell (the payload is read only by the ranks that resume from it); else
        the FormatError of the first file that is not."""
        model_path, first_state, _ = self.paths(step)
        num_params = num_parameters(read_model_config(model_path))
        written = self._state_paths(step)
        if not written:
            raise FormatError(first_state, "no such file: the checkpoint has no state file at all")
        num_processes = state_shard_size(written[0])[1]  # say the files of the lowest rank there
        states, stages = [], set()
        for rank in range(num_processes):
            path = self.paths(step, rank)[1]
            if not os.path.exists(path):
                raise FormatError(path, f"no such file, although the checkpoint's other state files are of a run "
                                        f"of {num_processes} processes")
            shard_size, processes, file_rank = state_shard_size(path)
            if (processes, file_rank) != (num_processes, rank):
                raise FormatError(path, f"holds rank {file_rank} of {processes} processes, beside the state files of "
                                        f"{num_processes} processes")
            lo, hi = optimizer_range(num_params, num_processes, rank, 1)
            if shard_size not in (num_params, hi - lo):
                raise FormatError(path, f"holds m and v of {shard_size} values, not the model's {num_params}"
                                        + (f" nor rank {rank}'s ZeRO-1 shard of them ({hi - lo})"
                                           if num_processes > 1 else ""))
            states.append(path)
            stages.add(0 if shard_size == num_params else 1)  # one process: the two are the same, -z 0
        if len(stages) > 1:
            raise FormatError(self.path, f"the state files of step {step} mix -z 0 and -z 1 shares")
        info = read_state(states[0], state_shard_size(states[0])[0], part=(0, 0))  # header and trailer
        return Checkpoint(step, model_path, states, stages.pop(), num_params, info)

    def start(self, first_step, comm):
        """Make the directory; on rank 0 hold its lock, remove what an interrupted write left
        behind, and return main.log for lines from first_step on (None on other ranks). Every rank
        waits for that, so no rank writes its first checkpoint while rank 0 still cleans."""
        log = None
        try:
            os.makedirs(self.path, exist_ok=True)
            if self.rank == 0:
                self._hold(create=True)
                self._clean()
                log = Log(self, first_step)
        except OSError as e:
            fail(self.cannot_write(e, re.sub(r"\.tmp\d+$", "", e.filename or self.path)))
        comm.barrier()
        return log

    def save(self, step, comm, save_model, state):
        """model_ (rank 0, written by save_model(path)), state_ (one per rank) and DONE_ for this
        step. Every file is written in full under a temporary name first; once every rank's are,
        each rank renames its own and, once every rank has, rank 0 writes DONE, all with
        SIGINT/SIGTERM held back. So a run stopped by a signal leaves either the whole checkpoint
        or only .partial files; only SIGKILL or a power cut can land between a rename and DONE,
        and the next run's start() removes files whose DONE never came. A step written again
        loses its old DONE before any of its files is replaced, and state files of ranks beyond
        this run's before the new DONE."""
        model_path, state_path, done_path = self.paths(step, comm.rank)
        mine = ([model_path] if comm.rank == 0 else []) + [state_path]
        try:
            if comm.rank == 0:
                self._write_partial(save_model, model_path, step)
            self._write_partial(lambda partial: write_state(partial, state), state_path, step)
            if comm.rank == 0 and os.path.exists(done_path):  # a step written again (its files were not whole)
                os.remove(done_path)
            comm.barrier()
        except BaseException:  # this rank's failure, another's (at the barrier), or a signal: no partial file stays
            for path in mine:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path + ".partial")
            raise
        with signals_held():
            for path in mine:
                os.replace(path + ".partial", path)
            comm.barrier()
            if comm.rank == 0:
                for path in self._state_paths(step)[comm.world_size:]:  # a checkpoint of this step by more ranks
                    os.remove(path)
                with atomic_write(done_path):
                    pass

    def _write_partial(self, write, path, step):
        try:
            write(path + ".partial")
        except OSError as e:
            fail(self.cannot_write(e, path, step))

    def cannot_write(self, error, path, step=None):
        """The one line for an OSError while writing path in the directory. A directory that cannot
        be written at all (read-only, someone else's) is named, not the temporary file the error is
        about; anything else (a full disk) names the file and the step, and where -y 1 goes on."""
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"-o {self.path}: this directory cannot be written ({error.strerror}): give one you can write to"
        steps = self.done_steps()
        return (f"{f'step {step}: ' if step is not None else ''}writing {path}: {error.strerror or error}; "
                + ("its partial files are removed, and " if step is not None else "")
                + (f"the newest whole checkpoint is at step {steps[-1]}, where -y 1 goes on" if steps else
                   "there is no checkpoint to go on from yet"))

    def prune(self, keep, major_every):
        """Keep the newest `keep` checkpoints (0: all), and every one whose step is a multiple of major_every."""
        if keep > 0:
            for step in self.done_steps()[:-keep]:
                if major_every == 0 or step % major_every != 0:
                    self._remove(step)

    def _state_paths(self, step):
        """The state files of a step, by rank."""
        return sorted(glob.glob(os.path.join(glob.escape(self.path), f"state_{step:08d}_[0-9][0-9][0-9][0-9][0-9].bin")))

    def _remove(self, step):
        """DONE first (never a DONE without its files), then the model and every rank's state."""
        model_path, _, done_path = self.paths(step)
        for path in [done_path, model_path, *self._state_paths(step)]:
            if os.path.exists(path):
                os.remove(path)

    def _clean(self):
        """Remove what an interrupted write left behind: temporary files (save's .partial,
        atomic_write's .tmp<pid>), and model or state files whose DONE never came."""
        done = set(self.done_steps())
        for name in os.listdir(self.path):
            m = re.match(r"(model|state)_(\d{8})[._]", name)
            if re.search(r"\.partial$|\.tmp\d+$", name) or (m and int(m.group(2)) not in done):
                os.remove(os.path.join(self.path, name))

    def _hold(self, create):
        """Take the lock, making its file only if create; a lock another process holds is one line
        naming it. A filesystem that cannot lock (some network ones) is said, and the run goes on
        without. A process holds a directory's lock once, however many runs it starts there."""
        if os.path.realpath(self.path) in _held:
            return
        path = os.path.join(self.path, LOCK)
        try:
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, host = os.read(fd, 256).decode(errors="replace").strip().partition(" ")
            fail(f"-o {self.path}: another trainer (pid {pid or 'unknown'}{f' on {host}' if host else ''}) is using "
                 f"this run directory: wait for it to end, or give another -o")
        except OSError as e:
            print(f"-o {self.path}: {LOCK} cannot be locked here ({e.strerror}), so a second trainer on this "
                  f"directory would not be stopped")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        _held[os.path.realpath(self.path)] = fd  # the lock lasts as long as the process


def _not_whole(broken):
    """'the checkpoint at step S is not whole (<why>)', for the newest of the (step, FormatError) pairs."""
    (step, error), *older = broken
    return (f"the checkpoint at step {step} is not whole ({error})"
            + (f", nor are those at steps {', '.join(str(s) for s, _ in older)}" if older else ""))


@dataclasses.dataclass
class Checkpoint:
    """A whole checkpoint: its model file, and the state files of the ranks that wrote it with
    -z zero_stage (for -z 0 each holds the whole model's AdamW state), with what rank 0's says of
    the run (info: step, random state, data position and what it means, without m and v)."""
    step: int
    model_path: str
    state_paths: list
    zero_stage: int
    num_params: int
    info: OptimizerState

    @property
    def num_processes(self):
        return len(self.state_paths)

    @property
    def layout(self):
        """(processes, -b) of the run's first start, whose data orders it keeps."""
        return self.info.layout_processes, self.info.layout_micro_batch

    def batch(self, B, T, d, nproc):
        """The tokens per step to resume with: the checkpoint's -d, kept on any number of processes
        and -b (gradient accumulation adapts). Another -t or -d, or a -d that does not split into
        B*T*nproc, is refused in words every rank shares."""
        info, where = self.info, f"the checkpoint at step {self.step}"
        if T != info.seq_len:
            fail(f"-t {T}: {where} was trained with -t {info.seq_len}, and its data position means another thing at "
                 f"another sequence length: resume with -t {info.seq_len}")
        if d not in (-1, info.tokens_per_step):
            fail(f"-d {d}: {where} was trained with -d {info.tokens_per_step} (tokens a step), which a resumed run "
                 f"keeps: resume with -d {info.tokens_per_step}, or leave -d out")
        if info.tokens_per_step % (B * T * nproc):
            fail(f"-b {B}: the total batch of {where}, {info.tokens_per_step} tokens (-d), does not split into "
                 f"B*T*processes = {B * T * nproc}: choose -b and the number of processes so that it does")
        return info.tokens_per_step

    def check_data(self, pattern, fingerprint):
        """-i must match shards of the lengths the run was trained on (a data position means nothing in others)."""
        info = self.info
        shards, tokens, _ = fingerprint
        if fingerprint != (info.data_shards, info.data_tokens, info.data_hash):
            same = (shards, tokens) == (info.data_shards, info.data_tokens)
            fail(f"-i {pattern}: {shards} shard(s) of {tokens:,} tokens{' (of other lengths)' if same else ''}, and the "
                 f"checkpoint at step {self.step} was trained on {info.data_shards} of {info.data_tokens:,}: its data "
                 f"position means nothing in these; resume with the run's -i")

    def change(self, nproc, B, zero_stage):
        """What resuming on nproc processes with -b B and -z zero_stage changes, in a line, or None."""
        info, processes = self.info, self.num_processes
        restage = nproc > 1 and zero_stage != self.zero_stage  # -z means nothing to one process
        if (nproc, B) == (processes, info.micro_batch) and not restage:
            return None
        said = []
        if (nproc, B) != (processes, info.micro_batch):
            accumulation = [info.tokens_per_step // (b * info.seq_len * n) for n, b in
                            ((processes, info.micro_batch), (nproc, B))]
            said.append(f"the total batch stays {info.tokens_per_step:,} tokens (gradient accumulation "
                        f"{accumulation[0]} -> {accumulation[1]})")
        if nproc != processes or restage:
            said.append(f"AdamW's state is re-sharded from its {processes} state file(s)")
        if (nproc, B) != self.layout:
            said.append(f"the data goes on in the order of the run's first start ({self.layout[0]} process(es) with "
                        f"-b {self.layout[1]}), none of the epoch repeated or skipped")
        return (f"resuming on {nproc} process(es) with -b {B} -z {zero_stage} from a checkpoint written by "
                f"{processes} with -b {info.micro_batch} -z {self.zero_stage}: " + ", ".join(said))

    def optimizer_state(self, nproc, rank, zero_stage):
        """This rank's AdamW state (m, v and master weights over its optimizer_range for nproc
        processes and -z zero_stage) gathered from the part of it each writer's file holds, so a
        run resumes on any number of processes and either -z; no more than this rank's part is
        read. Every other field is the same in every writer's file."""
        lo, hi = optimizer_range(self.num_params, nproc, rank, zero_stage)
        writers = [(path, *optimizer_range(self.num_params, self.num_processes, w, self.zero_stage))
                   for w, path in enumerate(self.state_paths)]
        if self.zero_stage == 0:  # each writer's file holds it all: ranks read from different ones
            writers = [writers[rank % self.num_processes]]
        parts = [read_state(path, w_hi - w_lo, (max(lo, w_lo) - w_lo, min(hi, w_hi) - w_lo))
                 for path, w_lo, w_hi in writers if max(lo, w_lo) < min(hi, w_hi)] or [self.info]
        if len(parts) == 1:
            return parts[0]
        join = {name: np.concatenate([getattr(part, name) for part in parts]) for name in ("m", "v")}
        master = None if parts[0].master is None else np.concatenate([part.master for part in parts])
        return dataclasses.replace(parts[0], **join, master=master)


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM wait until the block is over."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


class Log:
    """main.log in llm.c's line format (s:<step> trl:/tel:/eval:). A resumed run first drops the
    lines of steps it is about to redo, so the log reads as if the run had never stopped."""

    def __init__(self, run_dir, first_step):
        self.run_dir, self.path = run_dir, os.path.join(run_dir.path, "main.log")
        kept = []
        if first_step > 0 and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if (m := re.match(r"s:(\d+) ", line)) and int(m.group(1)) < first_step]
        with atomic_write(self.path) as f:
            f.write("".join(kept).encode())
        self.file = open(self.path, "a")

    def write(self, line):
        try:
            self.file.write(line + "\n")
            self.file.flush()
        except OSError as e:
            fail(self.run_dir.cannot_write(e, self.path))

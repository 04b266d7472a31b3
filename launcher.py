"""The built-in launcher: `python train_gpt2.py -pn N ...` with nothing else giving ranks starts the
N ranks on this machine and watches them. It passes SIGINT and SIGTERM on, shows rank 0's output,
and when a rank fails, stops the others and ends with one line: the failure's cause, not the errors
it set off in the other ranks.
"""
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from cli import fail

KILL_GRACE_SECONDS = 5  # a rank asked to stop (SIGINT, SIGTERM) gets this long before SIGKILL
# When a rank other than 0 fails, rank 0 gets this long to end by itself before it is stopped: the
# same bad input fails every rank, and rank 0 then says it in its own words
FAILURE_GRACE_SECONDS = 3



def _die_with_parent():
    """In a child, before exec: SIGKILL when the launcher dies, however it dies (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe(status):
    if status < 0:
        return f"was killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"


def _cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _visible_gpus():
    """The GPUs a process on this node would see, without initialising CUDA here: the list in
    CUDA_VISIBLE_DEVICES (up to an entry such as -1, which CUDA takes as the end), else the
    driver's entries in /proc; None when neither says."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = 0
        for entry in visible.split(","):
            if not entry.strip() or entry.strip().startswith("-"):
                break
            count += 1
        return count
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return None


def launch(script, argv, world_size, device="auto", max_restarts=0):
    """Start world_size ranks of `script argv` on this machine, each told its rank through the
    environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), and wait for them; returns the
    exit status. SIGINT and SIGTERM are passed on, and the exit is then 128 + the signal. When a
    rank fails, no more are started, the others are stopped, and the exit is 1 with one line on
    stderr, the first failing rank's (see Ranks.outcome).

    Up to max_restarts times (torchrun's --max-restarts; 0, llm.c's way, by default), a rank that
    died (killed by a signal, or any exit status but 1) has every rank stopped and all started
    again, told the restart's number in TORCHELASTIC_RESTART_COUNT as torchrun tells its workers,
    so they go on from the newest checkpoint. Status 1 is a refusal or a fault the rank has said in
    its own line, which a restart would meet again."""
    gpus = _visible_gpus() if device == "cuda" else None
    if gpus is not None and world_size > gpus:
        fail(f"-pn {world_size}: this node shows {gpus} GPU(s) and each rank needs one of its own: give at most "
             f"-pn {gpus} here, or start the ranks on several nodes (torchrun, srun, mpirun)")
    if device != "cuda" and world_size > _cores():
        print(f"launcher: {world_size} ranks on {_cores()} CPU core(s): they share them, so expect it to be slow",
              flush=True)
    threads_each = os.environ.get("OMP_NUM_THREADS")
    if threads_each is None:  # as torchrun does: the ranks' BLAS threads would otherwise fight for the cores
        threads_each = str(max(1, _cores() // world_size))
        print(f"launcher: OMP_NUM_THREADS={threads_each} for each of the {world_size} ranks (set it to choose)",
              flush=True)
    stop, current = [], []

    def forward(signum, frame):
        stop.append(signum)
        for child in current[-1].children if current else []:
            if child.returncode is None:
                child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for restart in range(max_restarts + 1):
            current.append(Ranks(script, argv, world_size, threads_each, restart))
            current[-1].run(stop)
            failed = current[-1].first_failure()
            if stop or failed is None or restart == max_restarts or current[-1].children[failed].returncode == 1:
                break
            print(f"launcher: rank {failed} of {world_size} {_describe(current[-1].children[failed].returncode)}: "
                  f"restarting the {world_size} ranks (restart {restart + 1} of at most {max_restarts}), which go on "
                  f"from the newest checkpoint", flush=True)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return current[-1].outcome(stop)


class Ranks:
    """One start of the world_size ranks: their processes, and the threads that show rank 0's
    stderr, keep each rank's last line, and see each rank end."""

    def __init__(self, script, argv, world_size, threads_each, restart):
        self.script, self.argv, self.world_size = script, argv, world_size
        self.env = dict(os.environ, WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS=threads_each,
                        TORCHELASTIC_RESTART_COUNT=str(restart))
        self.children, self.pumps, self.reapers = [], [], []
        self.exits = []       # ranks in the order they ended, as each one's reaper saw it
        self.last_line = {}   # rank -> its last error line, else its last line
        self.held = []        # rank 0's error line, not shown yet

    def _pump(self, rank, stream):
        for line in stream:
            line = line.rstrip("\n")
            if line.strip() and (line.startswith("error: ") or not self.last_line.get(rank, "").startswith("error: ")):
                self.last_line[rank] = line
            if rank == 0 and line.startswith("error: "):
                if self.held:
                    print(self.held.pop(), file=sys.stderr, flush=True)
                self.held.append(line)
            elif rank == 0:
                print(line, file=sys.stderr, flush=True)

    def _reap(self, rank, child):
        child.wait()
        self.exits.append(rank)

    def first_failure(self):
        return next((r for r in list(self.exits) if self.children[r].returncode != 0), None)

    def run(self, stop):
        """Start the ranks (no more once one has failed, or a signal came) and wait for them all to
        end; once one fails, the others get FAILURE_GRACE_SECONDS to end by themselves, then are
        stopped."""
        for rank in range(self.world_size):
            if stop or self.first_failure() is not None:  # a rank that fails at its start fails the job
                break
            env = dict(self.env, RANK=str(rank), LOCAL_RANK=str(rank))
            # a session of its own: a Ctrl-C at the terminal reaches the launcher alone, which passes it on once
            child = subprocess.Popen([sys.executable, self.script, *self.argv], env=env, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True, preexec_fn=_die_with_parent)
            self.children.append(child)
            self.pumps.append(threading.Thread(target=self._pump, args=(rank, child.stderr), daemon=True))
            self.reapers.append(threading.Thread(target=self._reap, args=(rank, child), daemon=True))
            self.pumps[-1].start()
            self.reapers[-1].start()
        grace_ends = None
        while not stop and len(self.exits) < len(self.children):
            failed = self.first_failure()
            if failed is not None:
                if failed == 0 or self.children[0].returncode is not None:
                    break
                grace_ends = grace_ends or time.monotonic() + FAILURE_GRACE_SECONDS
                if time.monotonic() > grace_ends:
                    break
            time.sleep(0.05)
        if self.first_failure() is not None and not stop:
            for child in self.children:
                if child.returncode is None:
                    child.terminate()
        deadline = time.monotonic() + KILL_GRACE_SECONDS
        for reaper in self.reapers:
            reaper.join(max(deadline - time.monotonic(), 0))
        for child in self.children:
            if child.returncode is None:
                child.kill()
        for reaper in self.reapers:
            reaper.join()
        deadline = time.monotonic() + 2
        for thread in self.pumps:  # the last lines, now that every rank's stderr is closed
            thread.join(max(deadline - time.monotonic(), 0))

    def outcome(self, stop):
        """The exit status, once the one line is said. Rank 0's stderr was shown as it came but for
        its error line, held until now: when the rank that failed first said the very same line
        (one bad input fails every rank), rank 0's is the one shown; when it said another, rank 0's
        is a consequence (a collective whose peer went away) and is dropped for the first failure's."""
        failed = self.first_failure()
        line = self.last_line.get(failed, "")
        if self.held and (stop or failed in (None, 0) or self.held[0] == line):
            print(self.held[0], file=sys.stderr)  # rank 0's own words: the report, or the same line the failed rank said
        elif failed is not None and not stop and (failed != 0 or not line):  # else rank 0's last line is on the screen
            print(f"error: rank {failed} of {self.world_size} {_describe(self.children[failed].returncode)}"
                  + (f": {line}" if line else ""), file=sys.stderr)
        if stop:
            return 128 + stop[0]
        return 0 if failed is None else 1

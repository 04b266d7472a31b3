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


def launch(script, argv, world_size, device="auto"):
    """Start world_size ranks of `script argv` on this machine, each told its rank through the
    environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), and wait for them; returns the
    exit status. SIGINT and SIGTERM are passed on, and the exit is then 128 + the signal. When a
    rank fails, no more are started, the others are stopped, and the exit is 1 with one line on
    stderr, the first failing rank's. Rank 0's stderr is shown as it comes but for its error line,
    held until the outcome is known: when the rank that failed first said the very same line (one
    bad input fails every rank), rank 0's is the one shown; when it said another, rank 0's is a
    consequence (a collective whose peer went away) and is dropped for the first failure's."""
    gpus = _visible_gpus() if device == "cuda" else None
    if gpus is not None and world_size > gpus:
        fail(f"-pn {world_size}: this node shows {gpus} GPU(s) and each rank needs one of its own: give at most "
             f"-pn {gpus} here, or start the ranks on several nodes (torchrun, srun, mpirun)")
    if device != "cuda" and world_size > _cores():
        print(f"launcher: {world_size} ranks on {_cores()} CPU core(s): they share them, so expect it to be slow",
              flush=True)
    port = _free_port()
    threads_each = os.environ.get("OMP_NUM_THREADS")
    if threads_each is None:  # as torchrun does: the ranks' BLAS threads would otherwise fight for the cores
        threads_each = str(max(1, _cores() // world_size))
        print(f"launcher: OMP_NUM_THREADS={threads_each} for each of the {world_size} ranks (set it to choose)",
              flush=True)
    children, pumps, reapers = [], [], []
    exits = []       # ranks in the order they ended, as each one's reaper saw it
    last_line = {}   # rank -> its last error line, else its last line
    held = []        # rank 0's error line, not shown yet

    def pump(rank, stream):
        for line in stream:
            line = line.rstrip("\n")
            if line.strip() and (line.startswith("error: ") or not last_line.get(rank, "").startswith("error: ")):
                last_line[rank] = line
            if rank == 0 and line.startswith("error: "):
                if held:
                    print(held.pop(), file=sys.stderr, flush=True)
                held.append(line)
            elif rank == 0:
                print(line, file=sys.stderr, flush=True)

    def reap(rank, child):
        child.wait()
        exits.append(rank)

    def first_failure():
        return next((r for r in list(exits) if children[r].returncode != 0), None)

    stop = []

    def forward(signum, frame):
        stop.append(signum)
        for child in children:
            if child.returncode is None:
                child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for rank in range(world_size):
            if stop or first_failure() is not None:  # a rank that fails at its start fails the job: start no more
                break
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       OMP_NUM_THREADS=threads_each)
            # a session of its own: a Ctrl-C at the terminal reaches the launcher alone, which passes it on once
            child = subprocess.Popen([sys.executable, script, *argv], env=env, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True, preexec_fn=_die_with_parent)
            children.append(child)
            pumps.append(threading.Thread(target=pump, args=(rank, child.stderr), daemon=True))
            reapers.append(threading.Thread(target=reap, args=(rank, child), daemon=True))
            pumps[-1].start()
            reapers[-1].start()
        grace_ends = None
        while not stop and len(exits) < len(children):
            failed = first_failure()
            if failed is not None:
                if failed == 0 or children[0].returncode is not None:
                    break
                grace_ends = grace_ends or time.monotonic() + FAILURE_GRACE_SECONDS
                if time.monotonic() > grace_ends:
                    break
            time.sleep(0.05)
        if first_failure() is not None and not stop:
            for child in children:
                if child.returncode is None:
                    child.terminate()
        deadline = time.monotonic() + KILL_GRACE_SECONDS
        for reaper in reapers:
            reaper.join(max(deadline - time.monotonic(), 0))
        for child in children:
            if child.returncode is None:
                child.kill()
        for reaper in reapers:
            reaper.join()
        deadline = time.monotonic() + 2
        for thread in pumps:  # the last lines, now that every rank's stderr is closed
            thread.join(max(deadline - time.monotonic(), 0))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    failed = first_failure()
    line = last_line.get(failed, "")
    if held and (stop or failed in (None, 0) or held[0] == line):
        print(held[0], file=sys.stderr)  # rank 0's own words: the report, or the same line the failed rank said
    elif failed is not None and not stop and (failed != 0 or not line):  # else rank 0's last line is on the screen
        print(f"error: rank {failed} of {world_size} {_describe(children[failed].returncode)}"
              + (f": {line}" if line else ""), file=sys.stderr)
    if stop:
        return 128 + stop[0]
    return 0 if failed is None else 1

"""Several processes training one model: who each process is, how they meet, and the collectives
train_gpt2.py calls.

- Identity: rank, world size and local rank come from -pr/-pn/-pg (llm.c's flags), or from the
  environment of torchrun, Slurm's srun, or Open MPI / PMI's mpirun, or from our own launcher
  (launcher.py), which starts -pn processes on this machine when nothing else did.
- Rendezvous: rank 0 hands every other rank one blob (NCCL's unique id, or the address of gloo's
  store) over TCP (-pi tcp, or MASTER_ADDR/PORT), through a shared directory (-pi fs), or through
  torchrun's own store. Each waits a bounded time, then names the ranks that never came.
- Communicators, one interface: NCCL over CuPy for the CUDA backend, torch.distributed's gloo for
  the NumPy backend, and Solo for one process (every collective is then the identity).

Gradients are summed, not averaged: train_gpt2.py scales each rank's loss by 1/processes already.
The flat buffers are padded to a multiple of the world size and split into equal contiguous
shards, shard r at r * shard_size, which is the layout NCCL's in-place reduce-scatter and
all-gather work on; with ZeRO-1 each rank keeps the AdamW state of its own shard (optimizer_range).
"""
import atexit
import datetime
import os
import re
import secrets
import socket
import struct
import time
from dataclasses import dataclass

import numpy as np

from cli import fail

DEFAULT_PORT = 29500  # torchrun's default MASTER_PORT
RENDEZVOUS_MAGIC = b"GPT2RDV1"


@dataclass
class Process:
    rank: int
    world_size: int
    local_rank: int  # the GPU this process uses
    source: str      # where rank and world size came from, for the banner


# ----------------------------------------------------------------------------- identity

def _env_int(name):
    value = os.environ[name]
    if not value.strip().lstrip("-").isdigit():
        fail(f"environment variable {name}={value!r} is not an integer")
    return int(value)


def identify(pn, pr, pg):
    """This process's place among its peers, or None when -pn > 1 was asked for and nothing gave
    this process a rank: then it should start the ranks itself (launch). pn and pr are the flags'
    values, None when not given; values no run can have (-pn 0, -pr 1 without -pn) are one line."""
    if pn is not None and pn < 1:
        fail(f"-pn {pn}: the number of processes must be at least 1")
    if pg < 1:
        fail(f"-pg {pg}: GPUs per node must be at least 1")
    if pr is not None and pn is None and pr > 0:
        fail(f"-pr {pr} needs -pn: give the number of processes as well (-pn N -pr {pr}, with N > {pr})")
    if pr is not None and not 0 <= pr < (pn or 1):
        fail(f"-pr {pr}{f' -pn {pn}' if pn else ''}: need 0 <= rank < processes")
    env = os.environ
    if pr is not None:  # llm.c's way: every process started by hand with -pn N -pr R
        process = Process(pr, pn or 1, pr % pg, "flags -pn/-pr")
    elif "RANK" in env and "WORLD_SIZE" in env:
        local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in env else _env_int("RANK") % pg
        process = Process(_env_int("RANK"), _env_int("WORLD_SIZE"), local, "RANK/WORLD_SIZE: torchrun or launcher")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        local = _env_int("SLURM_LOCALID") if "SLURM_LOCALID" in env else _env_int("SLURM_PROCID") % pg
        process = Process(_env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS"), local, "Slurm")
    elif "OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env:
        local = (_env_int("OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in env
                 else _env_int("OMPI_COMM_WORLD_RANK") % pg)
        process = Process(_env_int("OMPI_COMM_WORLD_RANK"), _env_int("OMPI_COMM_WORLD_SIZE"), local, "Open MPI")
    elif "PMI_RANK" in env and "PMI_SIZE" in env:
        local = _env_int("MPI_LOCALRANKID") if "MPI_LOCALRANKID" in env else _env_int("PMI_RANK") % pg
        process = Process(_env_int("PMI_RANK"), _env_int("PMI_SIZE"), local, "PMI")
    elif (pn or 1) > 1:
        return None
    else:
        return Process(0, 1, 0, "one process")
    if pn is not None and pn != process.world_size:
        fail(f"-pn {pn}: the {process.source} environment says {process.world_size} processes: drop -pn or make "
             f"them agree")
    if not 0 <= process.rank < process.world_size:
        fail(f"rank {process.rank} (from {process.source}) is not below the number of processes "
             f"{process.world_size}")
    return process


def restart_count():
    """How many times the ranks of this job have been restarted: TORCHELASTIC_RESTART_COUNT, which
    torchrun (--max-restarts) and our launcher set, else 0."""
    return _env_int("TORCHELASTIC_RESTART_COUNT") if "TORCHELASTIC_RESTART_COUNT" in os.environ else 0


def first_slurm_host(nodelist):
    """The first host of a Slurm node list: 'gpu[03-05,9],cpu1' -> 'gpu03'."""
    m = re.match(r"([^,\[]+)(?:\[([^,\]-]+))?", nodelist)
    return m.group(1) + (m.group(2) or "")


def meeting_point(pi, ps, pf):
    """Where the ranks meet: ('tcp', host, port), ('fs', dir) or ('torchrun', host, port)."""
    env = os.environ
    if pi == "fs":
        if not (os.path.isdir(pf) and os.access(pf, os.W_OK | os.X_OK)):
            fail(f"-pf {pf}: not a writable directory; -pi fs needs a directory every rank can write")
        return ("fs", pf)
    if pi == "tcp" or ps:
        if not ps and "MASTER_ADDR" not in env:
            fail("-pi tcp: give rank 0's address as -ps HOST[:PORT] (or set MASTER_ADDR)")
        host, _, port = (ps or env["MASTER_ADDR"]).partition(":")
        port = port or env.get("MASTER_PORT", str(DEFAULT_PORT))
        if not port.isdigit() or not 0 < int(port) < 65536:
            fail(f"-ps {ps}: the port must be a number in 1..65535")
        return ("tcp", host, int(port))
    port = int(env.get("MASTER_PORT", DEFAULT_PORT))
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's agent already serves MASTER_PORT
        return ("torchrun", env["MASTER_ADDR"], port)
    if "MASTER_ADDR" in env:
        return ("tcp", env["MASTER_ADDR"], port)
    if "SLURM_JOB_NODELIST" in env:  # rank 0 of a Slurm job runs on its first node; one port per job
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", "0")) % 10000))
        return ("tcp", first_slurm_host(env["SLURM_JOB_NODELIST"]), port)
    if env.get("OMPI_COMM_WORLD_LOCAL_SIZE") == env.get("OMPI_COMM_WORLD_SIZE", "-"):  # mpirun on one node
        return ("tcp", "127.0.0.1", port)
    fail("several processes, but no meeting point: set MASTER_ADDR (and MASTER_PORT), or give -pi tcp -ps HOST, "
         "or -pi fs -pf SHARED_DIR")


# ----------------------------------------------------------------------------- rendezvous

def _missing(ranks, world_size):
    missing = sorted(set(range(1, world_size)) - set(ranks))
    return ", ".join(map(str, missing))


def _recv_exactly(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def _tcp_exchange(process, blob, host, port, timeout):
    deadline = time.monotonic() + timeout
    where = f"{host}:{port}"
    if process.rank == 0:
        try:
            server = socket.create_server(("", port), reuse_port=False)
        except OSError as e:
            fail(f"rank 0 cannot listen on port {port} for the other ranks: {e.strerror} (choose another with "
                 f"-ps HOST:PORT or MASTER_PORT)")
        arrived = {}
        with server:
            while len(arrived) < process.world_size - 1:
                server.settimeout(max(deadline - time.monotonic(), 0.001))
                try:
                    conn, _ = server.accept()
                    conn.settimeout(max(deadline - time.monotonic(), 0.001))
                    magic, rank, world = struct.unpack("<8sii", _recv_exactly(conn, 16))
                except (socket.timeout, TimeoutError):
                    fail(f"rendezvous at {where}: rank(s) {_missing(arrived, process.world_size)} of "
                         f"{process.world_size} never arrived within {timeout:g} s")
                except (OSError, struct.error):
                    continue  # a stranger, or a rank that went away: the deadline still holds
                if magic != RENDEZVOUS_MAGIC or world != process.world_size or not 0 < rank < world or rank in arrived:
                    conn.close()
                    if magic == RENDEZVOUS_MAGIC and world != process.world_size:
                        fail(f"rendezvous at {where}: rank {rank} says {world} processes, rank 0 says "
                             f"{process.world_size}")
                    continue
                arrived[rank] = conn
        for conn in arrived.values():
            with conn:
                conn.sendall(struct.pack("<i", len(blob)) + blob)
        return blob
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(deadline - time.monotonic(), 0.001)) as conn:
                conn.sendall(struct.pack("<8sii", RENDEZVOUS_MAGIC, process.rank, process.world_size))
                conn.settimeout(max(deadline - time.monotonic(), 0.001))
                (size,) = struct.unpack("<i", _recv_exactly(conn, 4))
                return _recv_exactly(conn, size)
        except socket.gaierror as e:
            fail(f"rendezvous: cannot resolve rank 0's host '{host}': {e.strerror}")
        except (OSError, ConnectionError):
            if time.monotonic() > deadline:
                fail(f"rendezvous: no answer from rank 0 at {where} within {timeout:g} s")
            time.sleep(0.05)


def _write_file(path, data):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _read_file(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _fs_exchange(process, blob, directory, timeout):
    """Through files in a shared directory. A file an earlier run left there must never pass for
    this run's (llm.c's race): each rank r writes join_r holding a fresh random nonce, rank 0
    answers with reply_r holding that nonce and the blob, and rank r takes only a reply that
    carries its own nonce. Rank 0 deletes every old join_ file before it reads any, and a rank
    rewrites its join_ whenever it finds it gone, so a stale join_ is never answered either."""
    deadline = time.monotonic() + timeout
    join = lambda r: os.path.join(directory, f"gpt2_rendezvous_join_{r}")  # noqa: E731
    reply = lambda r: os.path.join(directory, f"gpt2_rendezvous_reply_{r}")  # noqa: E731
    try:
        if process.rank == 0:
            for r in range(1, process.world_size):
                for path in (join(r), reply(r)):
                    if os.path.exists(path):
                        os.remove(path)
            nonces = {}
            while len(nonces) < process.world_size - 1:
                for r in set(range(1, process.world_size)) - set(nonces):
                    nonce = _read_file(join(r))
                    if nonce is not None and len(nonce) == 16:
                        nonces[r] = nonce
                if time.monotonic() > deadline:
                    fail(f"rendezvous in -pf {directory}: rank(s) {_missing(nonces, process.world_size)} of "
                         f"{process.world_size} never arrived within {timeout:g} s")
                time.sleep(0.02)
            for r, nonce in nonces.items():  # only once all are here, as over TCP: a missing rank stops every rank
                _write_file(reply(r), nonce + blob)
            return blob
        nonce = secrets.token_bytes(16)
        r = process.rank
        while True:
            if not os.path.exists(join(r)):
                _write_file(join(r), nonce)
            answer = _read_file(reply(r))
            if answer is not None and answer[:16] == nonce:
                os.remove(reply(r))
                os.remove(join(r))
                return answer[16:]
            if time.monotonic() > deadline:
                fail(f"rendezvous in -pf {directory}: no answer from rank 0 within {timeout:g} s")
            time.sleep(0.02)
    except OSError as e:
        fail(f"rendezvous in -pf {directory}: {e.strerror}: {e.filename}")


def _torchrun_exchange(process, blob, host, port, timeout):
    """Through the store torchrun's agent serves at MASTER_ADDR:MASTER_PORT, under keys of this
    run and restart, so an earlier attempt's keys are never read."""
    import torch.distributed as dist
    store = dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout))
    prefix = f"gpt2/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    store.set(f"{prefix}/arrived/{process.rank}", b"1")
    if process.rank == 0:
        deadline = time.monotonic() + timeout
        while True:
            arrived = [r for r in range(1, process.world_size) if store.check([f"{prefix}/arrived/{r}"])]
            if len(arrived) == process.world_size - 1:
                break
            if time.monotonic() > deadline:
                fail(f"rendezvous through torchrun's store: rank(s) {_missing(arrived, process.world_size)} never "
                     f"arrived within {timeout:g} s")
            time.sleep(0.02)
        store.set(f"{prefix}/blob", blob)
        return blob
    try:
        store.wait([f"{prefix}/blob"], datetime.timedelta(seconds=timeout))
    except RuntimeError:
        fail(f"rendezvous through torchrun's store: no answer from rank 0 within {timeout:g} s")
    return store.get(f"{prefix}/blob")


def exchange(process, meeting, blob, timeout):
    """Rank 0's blob (bytes), on every rank."""
    kind, *where = meeting
    if kind == "fs":
        return _fs_exchange(process, blob, *where, timeout)
    if kind == "torchrun":
        return _torchrun_exchange(process, blob, *where, timeout)
    return _tcp_exchange(process, blob, *where, timeout)


# ----------------------------------------------------------------------------- communicators

def shard_size(n, world_size):
    """Elements per rank: n split into world_size equal shards, the last padded."""
    return -(-n // world_size)


def optimizer_range(num_params, world_size, rank, zero_stage):
    """The elements [lo, hi) of the flat parameter buffer whose AdamW state (m, v, master weights)
    this rank keeps and updates: all of them, or with ZeRO-1 its shard (the last one short)."""
    if zero_stage == 0:
        return 0, num_params
    size = shard_size(num_params, world_size)
    return min(rank * size, num_params), min((rank + 1) * size, num_params)


class Solo:
    """One process: nothing to exchange."""
    engine = "none"

    def __init__(self, process):
        self.rank, self.world_size = process.rank, process.world_size

    def reduce_scatter(self, buf):
        pass

    def all_gather(self, buf):
        pass

    def sum(self, values):
        return np.asarray(values, dtype=np.float64)

    def barrier(self):
        pass


class Gloo(Solo):
    """torch.distributed's gloo over the NumPy backend's host arrays (shared with torch, no copy).
    Rank 0 opens a store on a free port and hands its address out through the rendezvous."""
    engine = "gloo"

    def __init__(self, process, meeting, timeout):
        super().__init__(process)
        try:
            import torch
            import torch.distributed as dist
        except ImportError:
            fail(f"--device cpu with {process.world_size} processes needs PyTorch for its gloo collectives "
                 f"(pip install torch==2.13.0), which is not installed")
        self.torch, self.dist = torch, dist
        wait = datetime.timedelta(seconds=timeout)
        store = None
        if process.rank == 0:
            store = dist.TCPStore("0.0.0.0", 0, process.world_size, is_master=True, timeout=wait,
                                  wait_for_workers=False)
            host = meeting[1] if meeting[0] != "fs" else socket.gethostname()
            blob = f"{host}:{store.port}".encode()
        else:
            blob = b""
        host, _, port = exchange(process, meeting, blob, timeout).decode().rpartition(":")
        if store is None:
            store = dist.TCPStore(host, int(port), process.world_size, is_master=False, timeout=wait)
        dist.init_process_group("gloo", store=store, rank=process.rank, world_size=process.world_size, timeout=wait)
        atexit.register(dist.destroy_process_group)  # else gloo's threads abort the process at its exit
        self._scratch = None

    def _shard_scratch(self, size):
        if self._scratch is None or self._scratch.numel() != size:
            self._scratch = self.torch.empty(size, dtype=self.torch.float32)
        return self._scratch

    def _collective(self, name, *tensors):
        """dist.<name>(*tensors); a peer that went away is one line, not a traceback per rank."""
        try:
            getattr(self.dist, name)(*tensors)
        except RuntimeError as e:
            fail(f"rank {self.rank}: {name} failed, so another rank has stopped ({str(e).splitlines()[0]})")

    def reduce_scatter(self, buf):
        assert buf.dtype == np.float32
        size = buf.size // self.world_size
        out = self._shard_scratch(size)
        self._collective("reduce_scatter_single", out, self.torch.from_numpy(buf))
        buf[self.rank * size:(self.rank + 1) * size] = out.numpy()

    def all_gather(self, buf):
        assert buf.dtype == np.float32
        size = buf.size // self.world_size
        own = self._shard_scratch(size)
        own.copy_(self.torch.from_numpy(buf[self.rank * size:(self.rank + 1) * size]))
        self._collective("all_gather_single", self.torch.from_numpy(buf), own)

    def sum(self, values):
        out = np.array(values, dtype=np.float64)
        self._collective("all_reduce", self.torch.from_numpy(out))
        return out

    def barrier(self):
        self._collective("barrier")


class Nccl(Solo):
    """NCCL through CuPy's bindings, on the CUDA backend's device arrays (bf16 as uint16 bits),
    in place on CuPy's current stream."""
    engine = "NCCL"
    TYPES = {"uint16": 9, "float32": 7, "float64": 8}  # ncclBfloat16, ncclFloat32, ncclFloat64
    SUM = 0  # ncclSum

    def __init__(self, process, meeting, timeout):
        super().__init__(process)
        import cupy
        from cupy.cuda import nccl
        self.cupy = cupy
        # CuPy 14's binding gives and takes the id as bytes (older ones, a tuple of ints)
        unique_id = exchange(process, meeting, nccl.get_unique_id() if process.rank == 0 else b"", timeout)
        self.comm = nccl.NcclCommunicator(process.world_size, unique_id, process.rank)
        self._host_sum = cupy.zeros(8, dtype=cupy.float64)

    def _stream(self):
        return self.cupy.cuda.get_current_stream().ptr

    def reduce_scatter(self, buf):
        size = buf.size // self.world_size
        own = buf.data.ptr + self.rank * size * buf.itemsize  # in place: the shard's own place
        self.comm.reduceScatter(buf.data.ptr, own, size, self.TYPES[buf.dtype.name], self.SUM, self._stream())

    def all_gather(self, buf):
        size = buf.size // self.world_size
        own = buf.data.ptr + self.rank * size * buf.itemsize
        self.comm.allGather(own, buf.data.ptr, size, self.TYPES[buf.dtype.name], self._stream())

    def sum(self, values):
        values = np.asarray(values, dtype=np.float64)
        assert values.size <= self._host_sum.size
        buf = self._host_sum[:values.size]
        buf.set(values)
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, values.size, self.TYPES["float64"], self.SUM, self._stream())
        return buf.get()

    def barrier(self):
        self.sum([0.0])


def connect(process, backend_is_cuda, pi, ps, pf, timeout):
    """The communicator for this process: Solo, or NCCL / gloo after the rendezvous."""
    if process.world_size == 1:
        return Solo(process)
    meeting = meeting_point(pi, ps, pf)
    return (Nccl if backend_is_cuda else Gloo)(process, meeting, timeout)

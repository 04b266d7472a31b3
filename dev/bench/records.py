"""What every benchmark here leaves behind: a JSON record (device, commit, command, figures) in
dev/bench/results/, written to a temporary name and renamed. The scripts put the repository on
sys.path before importing this."""
import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "dev/bench/results"
# Set by the command that starts a run on a copy of the tree without .git (a GPU machine: see
# dev/gpu_check.py run --commit): the commit, with "+dirty" when the tree had uncommitted changes.
COMMIT_ENV = "BENCH_COMMIT"
COMMIT = re.compile(r"[0-9a-f]{7,40}(\+dirty)?")


def git(*args):
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)


def commit():
    """What the figures were measured on: the short commit, '+dirty' added when tracked or unignored
    files other than the records themselves (dev/bench/results/, which a run rewrites as it goes: a
    bench of two models had made the second record dirty with the first) differ from it. From
    COMMIT_ENV when set, else from git when the repository is a checkout of its own (not a copy
    inside some other one), else 'unknown'."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != REPO.resolve():
            return "unknown"
        dirty = git("status", "--porcelain", "--", ".", f":!{RESULTS.relative_to(REPO)}").stdout.strip() != ""
        return git("rev-parse", "--short", "HEAD").stdout.strip() + ("+dirty" if dirty else "")
    except OSError:  # no git installed
        return "unknown"


def tag(name):
    """A device or model name as a file-name part: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write(directory, name, record, announce=True):
    """The record, as directory/name; announce: say so in one line (a record rewritten as a run goes
    says it once, at the end)."""
    from fileformats import write_json  # NumPy: dev/gpu_check.py reads commit() before it knows NumPy is there
    os.makedirs(directory, exist_ok=True)
    path = Path(directory) / name
    write_json(path, record)
    if announce:
        print(f"wrote {path}")
    return path

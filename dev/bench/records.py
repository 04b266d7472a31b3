"""What every benchmark here leaves behind: a JSON record (device, commit, command, figures) in
dev/bench/results/, written to a temporary name and renamed. The scripts put the repository on
sys.path before importing this."""
import os
import re
import subprocess
from pathlib import Path

from fileformats import write_json

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "dev/bench/results"


def commit():
    """The checked-out commit, short form: what the figures were measured on ('' outside a git
    checkout, or where git is not installed: a copy of the tree on a GPU machine)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return ""


def tag(name):
    """A device or model name as a file-name part: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write(directory, name, record):
    os.makedirs(directory, exist_ok=True)
    path = Path(directory) / name
    write_json(path, record)
    print(f"wrote {path}")

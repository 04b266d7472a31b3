"""What the prepro scripts share: downloading to a file that appears only when whole (or reusing it),
GPT-2's encoding loaded with a one-line error, reading jsonl records, and an ordered parallel map with
bounded memory. Each script opens with
two lines that put the repository root on sys.path when it is run as a file (`python
prepro/fineweb.py`), as `python -m prepro.fineweb` does."""
import collections
import functools
import http.client
import json
import shutil
import urllib.request

from cli import fail, output_folder
from fileformats import atomic_write
from prepro.gpt2_tokenizer import gpt2_encoding


def download(url, path, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as response, atomic_write(path) as f:
        shutil.copyfileobj(response, f)


def local_copy(url, path, timeout=10):
    """path, downloaded from url unless a copy is there already; a download that fails is one line
    that points at --source, and leaves none of the folders it made for path."""
    if path.exists():
        print(f"reusing {path}")
        return path
    print(f"downloading {url} to {path}")
    with output_folder(path.parent):
        try:
            download(url, path, timeout)
        except (OSError, http.client.HTTPException) as e:  # URLError and timeouts are OSErrors too
            fail(f"could not download {url} ({e}); give a local copy with --source")
    return path


@functools.cache
def load_encoding():
    try:
        return gpt2_encoding()
    except (RuntimeError, ValueError) as e:  # missing package, or files whose hash is not GPT-2's
        fail(str(e))


class SourceError(Exception):
    """A local input file that does not read as what it should be; str() is one line naming it."""


def one_line(e):
    return " ".join(str(e).split())


def jsonl_records(path):
    """(line number, record) for each non-blank line of a jsonl file; a file or a line that does not
    read is a SourceError."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise SourceError(f"{path}:{lineno}: not JSON ({e})") from None
                    yield lineno, record
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: not a readable jsonl file ({one_line(e)})") from None


def ordered_map(pool, func, items, ahead):
    """pool.imap(func, items) with at most `ahead` items in flight: Pool.imap reads its input to the end
    at once, which for a dataset means all of it in memory."""
    pending = collections.deque()
    for item in items:
        pending.append(pool.apply_async(func, (item,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()

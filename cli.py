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
    """argparse whose errors (unknown flag, missing or non-numeric value) are one line and exit 1."""

    def error(self, message):
        fail(f"{message} (see --help)")


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

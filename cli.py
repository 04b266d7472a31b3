"""The command-line convention every script here shares: a mistake the user can make (a bad flag,
a missing file, a batch that does not divide) is one line on stderr naming the value and the fix,
and exit status 1; never a traceback."""
import argparse
import sys


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, missing or non-numeric value) are one line and exit 1."""

    def error(self, message):
        fail(f"{message} (see --help)")

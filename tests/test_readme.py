"""README.md and docs/*.md as a front door: every command they show runs a script or module that
exists, with only the flags its own parser takes (read from its --help), and every make command a
target and variables the Makefile has; before its first python command the README says, once, how
to enter the environment make builds; every link resolves, and every page of docs/ is linked from
the README."""
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.MULTILINE | re.DOTALL)
SPAN = re.compile(r"`([^`]+)`")
LAUNCHERS = {"torchrun", "srun", "mpirun", "bash", "make"}


def is_python(word):
    return re.fullmatch(r"(.*/)?python3?", word) is not None


def commands(text):
    """(offset in text, command line) for each line of a fenced block (continuations joined) and each
    inline code span that starts with a python, a launcher, make or a .py path: what a reader may paste."""
    found = []
    for block in FENCE.finditer(text):
        offset = block.start(1)
        for line in re.split(r"(?<!\\)\n", block.group(1)):
            if line.strip():
                found.append((offset, line.replace("\\\n", " ").strip()))
            offset += len(line) + 1
    prose = FENCE.sub(lambda m: " " * len(m.group(0)), text)  # the same offsets, without the blocks
    for span in SPAN.finditer(prose):
        words = span.group(1).split()
        if "\n\n" not in span.group(1) and words and (is_python(words[0]) and len(words) > 1
                                                      or words[0] in LAUNCHERS or words[0].endswith(".py")):
            found.append((span.start(), " ".join(words)))
    return found


def program(words):
    """(how it is run, what: a script path or a module name, its arguments), or None for a command of
    another program (lm_eval, pip)."""
    for i, word in enumerate(words):
        if is_python(word) and i + 1 < len(words):
            if words[i + 1] == "-m":
                return "module", words[i + 2], words[i + 3:]
            return "script", words[i + 1], words[i + 2:]
        if word.endswith(".py"):
            return "script", word, words[i + 1:]
    if words[0] == "bash":
        return "script", words[1], []
    return None


def every_command():
    for page in PAGES:
        for offset, line in commands(page.read_text()):
            words = shlex.split(line, comments=True)
            if words:
                yield page.relative_to(REPO), offset, line, words


def module_file(name):
    """The file `python -m name` runs from the repository root, when the module is the repository's own."""
    base = REPO / name.replace(".", "/")
    return next((path for path in (base.with_suffix(".py"), base / "__main__.py") if path.exists()), None)


def test_every_command_runs_a_script_or_module_that_exists():
    missing = []
    for page, _, line, words in every_command():
        ran = program(words)
        if ran is None:
            continue
        kind, name, _ = ran
        if kind == "script" and not any(REPO.glob(name)):  # a path, or a glob such as tests/test_cuda_*.py
            missing.append(f"{page}: {line}")
        if kind == "module" and module_file(name) is None and importlib.util.find_spec(name) is None:
            missing.append(f"{page}: {line}")
    assert not missing, "no such script or module:\n" + "\n".join(missing)


def flags(words):
    """The option words a command gives (a synopsis's [--flag] too), not negative numbers or placeholders."""
    return [w.strip("[]") for w in words if re.match(r"\[?--?[A-Za-z]", w)]


def options(help_text):
    """Every option string an argparse --help lists: '  -b BATCH, --batch BATCH   ...' gives -b and --batch."""
    found = set()
    for line in help_text.splitlines():
        if re.match(r"  -", line):
            invocation = re.split(r"\s{2,}", line.strip())[0]
            found.update(part.split()[0] for part in invocation.split(", "))
    return found


def help_of(kind, name, verb):
    argv = [sys.executable, *(["-m", name] if kind == "module" else [name]), *([verb] if verb else []), "--help"]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, f"{shlex.join(argv[1:])}: {result.stderr}"
    return result.stdout


def verb(args, help_text):
    """The subcommand (or choice) a command's first argument names, when its --help lists one: its
    own options come from `SCRIPT VERB --help`."""
    choices = {c for group in re.findall(r"\{([\w,.-]+)\}", help_text) for c in group.split(",")}
    return args[0] if args and args[0] in choices else None


def test_every_flag_a_command_gives_is_one_its_script_takes():
    ours = []  # (page, line, kind, name, args) of the repository's own scripts and modules given flags
    for page, _, line, words in every_command():
        ran = program(words)
        if ran is None or not flags(ran[2]):
            continue
        kind, name, _ = ran
        if name.endswith(".py") if kind == "script" else module_file(name):
            ours.append((page, line, *ran))
    assert {"train_gpt2.py", "dev/sample.py", "prepro/fineweb.py"} <= {name for _, _, _, name, _ in ours}
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        keys = sorted({(kind, name) for _, _, kind, name, _ in ours})
        helps = dict(zip(keys, pool.map(lambda key: help_of(*key, None), keys)))
        keys = sorted({(kind, name, v) for _, _, kind, name, args in ours if (v := verb(args, helps[kind, name]))})
        helps.update(zip(keys, pool.map(lambda key: help_of(*key), keys)))
    unknown = []
    for page, line, kind, name, args in ours:
        takes = options(helps[kind, name])
        v = verb(args, helps[kind, name])
        if v is not None:
            takes |= options(helps[kind, name, v])
        unknown += [f"{page}: {flag} in: {line}" for flag in flags(args) if flag not in takes]
    assert not unknown, "flags the script's --help does not list:\n" + "\n".join(unknown)


def test_every_make_command_names_targets_and_variables_the_makefile_has():
    makefile = (REPO / "Makefile").read_text()
    targets = {t for line in re.findall(r"^([^\s#=:][^=:]*):(?!=)", makefile, re.MULTILINE) for t in line.split()}
    bad, seen = [], 0
    for page, _, line, words in every_command():
        if words[0] != "make":
            continue
        seen += 1
        for word in words[1:]:
            if "=" in word:
                name = word.split("=")[0]
                if f"$({name})" not in makefile:
                    bad.append(f"{page}: variable {name} in: {line}")
            elif not word.startswith("-") and word not in targets:
                bad.append(f"{page}: target {word} in: {line}")
    assert seen and not bad, "\n".join(bad)


def test_the_readme_says_once_how_to_enter_the_environment_before_its_first_python_command():
    text = README.read_text()
    assert text.count("source .venv/bin/activate") == 1
    note = text.index("source .venv/bin/activate")
    paragraph = text[text.rindex("\n\n", 0, note):text.index("\n\n", note)]
    assert ".venv/bin/python" in paragraph  # the other way: the venv's python in each command
    first = min(offset for offset, line in commands(text) if (words := shlex.split(line, comments=True))
                and any(is_python(w) for w in words))
    assert note < first, f"the first python command comes before the note: {text[first:first + 60]!r}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_resolves(page):
    text = FENCE.sub("", page.read_text())
    links = [target for target in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"\w+://", target)]
    broken = [target for target in links if not (page.parent / target.split("#")[0]).exists()]
    assert not broken, f"{page.name}: {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / target).resolve() for target in re.findall(r"\]\((docs/[^)#\s]+)", README.read_text())}
    assert linked == {page.resolve() for page in PAGES[1:]}

"""dev/plot_logs.py: PNGs from recorded main.log files (a run, and one stopped and resumed), llm.c's
resumed-log convention, the reference lines, and one-line errors."""
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

import train_gpt2 as gpt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "dev"))
from plot_logs import read_log  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["-e", "d1", "-b", "2", "-t", "32", "-s", "0", "-v", "2", "-m", "1", "-n", "3"]


def plot(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "dev/plot_logs.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def run_dirs(data, tmp_path_factory):
    """Two recorded runs of 6 steps: one straight, one stopped at its step-3 checkpoint and resumed."""
    d = tmp_path_factory.mktemp("runs")
    gpt.main([*TINY, *data, "-x", "6", "-o", str(d / "straight")])
    gpt.main([*TINY, *data, "-x", "3", "-l", "1e-3", "-o", str(d / "resumed")])
    gpt.main([*TINY, *data, "-x", "6", "-l", "1e-3", "-o", str(d / "resumed"), "-y", "1"])
    return d


def test_a_png_is_written_from_two_recorded_runs_one_resumed(run_dirs, tmp_path):
    result = plot(str(run_dirs / "straight"), str(run_dirs / "resumed"), "-o", str(tmp_path / "runs.png"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {tmp_path / 'runs.png'}"
    assert (tmp_path / "runs.png").read_bytes()[:8] == PNG_MAGIC
    resumed = read_log(run_dirs / "resumed" / "main.log")
    assert sorted(resumed["trl"]) == list(range(6)) and sorted(resumed["tel"]) == [0, 2, 4, 6]


def test_a_step_logged_twice_by_a_resumed_llmc_run_keeps_its_later_value(tmp_path):
    """llm.c appends to main.log on resume, so the steps after the checkpoint appear twice."""
    (tmp_path / "main.log").write_text("s:0 tel:10.9\ns:0 trl:10.8 lr:0.0003 norm:1.0\ns:1 trl:9.5 lr:0.0003 norm:1.0\n"
                                       "s:2 trl:9.0 lr:0.0003 norm:1.0\n"                    # stopped here;
                                       "s:1 trl:9.4 lr:0.0003 norm:1.0\ns:2 trl:8.9 lr:0.0003 norm:1.0\n"  # resumed at 1
                                       "s:3 trl:8.5 lr:0.0003 norm:1.0\ns:3 tel:8.7\ns:3 eval:0.2500\n")
    curves = read_log(tmp_path / "main.log")
    assert curves == {"trl": {0: 10.8, 1: 9.4, 2: 8.9, 3: 8.5}, "tel": {0: 10.9, 3: 8.7}, "eval": {3: 0.25}}


def test_hellaswag_and_the_gpt2_reference_get_a_third_panel(run_dirs, tmp_path):
    assert plot(str(run_dirs / "straight"), "-o", str(tmp_path / "two.png")).returncode == 0
    result = plot(f"mine={run_dirs / 'straight' / 'main.log'}", "--gpt2", "124M", "-o", str(tmp_path / "three.png"))
    assert result.returncode == 0, result.stderr
    two, three = plt.imread(tmp_path / "two.png"), plt.imread(tmp_path / "three.png")
    assert two.shape[0] == three.shape[0] and three.shape[1] == two.shape[1] * 3 // 2  # 12 and 18 inches wide


def test_bad_paths_are_one_line(run_dirs, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notalog.txt").write_text("hello\n")
    for args, expected in [([str(tmp_path / "nothing")], "no such run directory"),
                           ([str(tmp_path / "empty")], "no main.log"),
                           ([str(tmp_path / "notalog.txt")], "no s:<step>"),
                           ([str(run_dirs / "straight"), "-o", str(tmp_path / "no" / "dir.png")], "no directory"),
                           ([str(run_dirs / "straight"), "-o", "x.txt"], "x.txt: .txt is not an image format"),
                           ([str(run_dirs / "straight"), "-o", "runs"], "end it in .png, .pdf, .svg"),
                           ([str(run_dirs / "straight"), "--gpt2", "7B"], "--gpt2")]:
        result = plot(*args, cwd=tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and expected in lines[0], (args, result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "notalog.txt"]


def test_o_a_directory_writes_runs_png_inside_it_and_says_where(run_dirs, tmp_path):
    (tmp_path / "plots").mkdir()
    result = plot(str(run_dirs / "straight"), "-o", str(tmp_path / "plots"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {tmp_path / 'plots' / 'runs.png'}"
    assert (tmp_path / "plots" / "runs.png").read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots"]  # no plots.png beside it


def test_the_extension_picks_the_format(run_dirs, tmp_path):
    result = plot(str(run_dirs / "straight"), "-o", str(tmp_path / "runs.PDF"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "runs.PDF").read_bytes()[:5] == b"%PDF-"


def test_a_value_that_is_not_a_number_is_one_line_naming_file_and_line(tmp_path):
    (tmp_path / "main.log").write_text("s:0 trl:10.8 lr:0.0003 norm:1.0\ns:1 trl:abc lr:0.0003 norm:1.0\n")
    result = plot(str(tmp_path), "-o", str(tmp_path / "out.png"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and lines == [f"error: {tmp_path / 'main.log'}:2: trl:abc is not a number"], \
        result.stderr
    assert not (tmp_path / "out.png").exists()

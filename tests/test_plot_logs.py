"""dev/plot_logs.py: PNGs from recorded main.log files (a run, and one stopped and resumed), llm.c's
resumed-log convention, the panels and legend entries there are values for, the reference lines, the
smoothing at the curve's ends, and one-line errors."""
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

import train_gpt2 as gpt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "dev"))
from plot_logs import figure, read_log, smooth  # noqa: E402

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


def legends(fig):
    """{panel title: its legend's labels}"""
    return {ax.get_title(): [t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes}


GPT2_LINE = "OpenAI GPT-2 (124M) checkpoint"


def test_hellaswag_gets_a_third_panel_only_when_a_run_has_its_values_even_with_gpt2(run_dirs, tmp_path):
    """--gpt2 alone drew an empty HellaSwag panel (its axis -0.04 to 0.04) around GPT-2's line."""
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "main.log").write_text("s:0 trl:10.8\ns:1 trl:9.5\ns:1 tel:9.7\ns:1 eval:0.25\n")
    two = plot(str(run_dirs / "straight"), "-o", str(tmp_path / "two.png"))
    gpt2 = plot(str(run_dirs / "straight"), "--gpt2", "124M", "-o", str(tmp_path / "gpt2.png"))
    three = plot(f"mine={run_dirs / 'straight' / 'main.log'}", str(tmp_path / "evals"), "--gpt2", "124M",
                 "-o", str(tmp_path / "three.png"))
    assert two.returncode == gpt2.returncode == three.returncode == 0, (two.stderr, gpt2.stderr, three.stderr)
    assert gpt2.stdout.splitlines() == ["--gpt2 124M: no run has HellaSwag values, so OpenAI GPT-2's HellaSwag line "
                                        "is left out, with the panel", f"wrote {tmp_path / 'gpt2.png'}"]
    assert three.stdout.splitlines() == [f"wrote {tmp_path / 'three.png'}"]
    two, gpt2, three = (plt.imread(tmp_path / f"{name}.png") for name in ("two", "gpt2", "three"))
    assert two.shape == gpt2.shape
    assert two.shape[0] == three.shape[0] and three.shape[1] == two.shape[1] * 3 // 2  # 12 and 18 inches wide


def test_a_panel_no_run_has_values_for_is_left_out_with_its_gpt2_line():
    runs = {"a": {"trl": {0: 10.0, 1: 9.0}, "tel": {1: 9.5}, "eval": {}},
            "b": {"trl": {0: 10.5, 1: 9.2}, "tel": {}, "eval": {}}}
    fig = figure(runs, gpt2="124M")
    assert legends(fig) == {"train loss": ["a", "b"], "val loss": ["a", GPT2_LINE]}
    plt.close(fig)
    runs["b"]["eval"] = {1: 0.26}
    fig = figure(runs, gpt2="124M")
    assert legends(fig) == {"train loss": ["a", "b"], "val loss": ["a", GPT2_LINE], "HellaSwag": ["b", GPT2_LINE]}
    plt.close(fig)
    fig = figure({"a": {"trl": {0: 10.0, 1: 9.0}, "tel": {}, "eval": {}}}, gpt2="124M")
    assert legends(fig) == {"train loss": ["a"]}
    plt.close(fig)


def test_a_run_without_values_in_a_panel_has_no_line_and_no_legend_entry_there():
    runs = {"a": {"trl": {0: 10.0, 1: 9.0}, "tel": {}, "eval": {}},
            "b": {"trl": {0: 10.5, 1: 9.2}, "tel": {0: 10.4, 1: 9.6}, "eval": {}},
            "c": {"trl": {}, "tel": {1: 9.9}, "eval": {}}}
    fig = figure(runs, smoothing=0)
    train, val = fig.axes
    assert [line.get_label() for line in train.get_lines()] == ["a", "b"]
    assert [line.get_label() for line in val.get_lines()] == ["b", "c"]
    assert [list(line.get_ydata()) for line in val.get_lines()] == [[10.4, 9.6], [9.9]]
    assert legends(fig) == {"train loss": ["a", "b"], "val loss": ["b", "c"]}
    plt.close(fig)


def test_with_neither_val_nor_hellaswag_values_gpt2_says_both_its_lines_are_left_out(tmp_path):
    (tmp_path / "main.log").write_text("s:0 trl:10.8\ns:1 trl:9.5\n")
    result = plot(str(tmp_path), "--gpt2", "350M", "-o", str(tmp_path / "out.png"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == ("--gpt2 350M: no run has val loss or HellaSwag values, so OpenAI GPT-2's "
                                             "val loss and HellaSwag lines are left out, with the panel")


def test_the_moving_average_takes_the_values_within_its_window_fewer_at_the_ends():
    values = [4.0, 2.0, 6.0, 0.0, 8.0]
    # window 3: one value each side; at the ends, the one neighbour there is
    assert np.allclose(smooth(values, 3), [(4 + 2) / 2, (4 + 2 + 6) / 3, (2 + 6 + 0) / 3, (6 + 0 + 8) / 3, (0 + 8) / 2])
    # window 4: two values before the centre and one after
    assert np.allclose(smooth(values, 4), [(4 + 2) / 2, (4 + 2 + 6) / 3, (4 + 2 + 6 + 0) / 4, (2 + 6 + 0 + 8) / 4,
                                           (6 + 0 + 8) / 3])
    assert list(smooth(values, 2)) == values  # below 3: no smoothing


def test_one_noisy_step_at_an_end_counts_once_in_the_smoothed_curve():
    """Edge padding counted the last value 11 times in a window of 21, bending the curve's end towards it
    (the demo's train loss: 5.75 to 6.1 over its last steps, its val loss still falling)."""
    values = np.zeros(100)
    values[-1] = values[0] = 1.0
    smoothed = smooth(values, 21)
    assert smoothed[-1] == pytest.approx(1 / 11) and smoothed[0] == pytest.approx(1 / 11)  # 11 values in reach


def test_the_smoothed_curve_of_a_falling_loss_falls_to_both_ends_and_of_a_constant_one_stays_constant():
    steps = np.arange(300)
    falling = 3 + 8 * np.exp(-steps / 40) - 1e-3 * steps
    for window in (3, 4, 21, 51):
        smoothed = smooth(falling, window)
        assert np.all(np.diff(smoothed) <= 0), window
        assert falling[-1] <= smoothed[-1] <= falling[-1 - window // 2]  # no upturn, nor a dip below the data
        assert np.allclose(smooth(np.full(300, 3.1), window), 3.1, rtol=1e-14, atol=0)


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

"""dev/torch_train.py against train_gpt2.py on the CPU: two independent implementations (the NumPy
twins, PyTorch autograd) of the whole training loop (data order, schedule, clipping, decay groups,
grad accumulation, val loss) give the same losses step by step; and dev/loss_parity.py, the driver
that compares ours with PyTorch fp32 and bf16, writes its plot and record and judges the smoothed
train curve and every val point against a bar set by PyTorch bf16's own distance from fp32; a run
cut short keeps its curves without a verdict; more than 3 epochs of the train split is refused."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "dev"))
import loss_parity  # noqa: E402
from plot_logs import read_log  # noqa: E402

# 1 layer, C=64; grad accumulation 2; warmup, cosine decay and weight decay all active; val every 4 steps
LOOP = ["-e", "d1", "-b", "2", "-t", "32", "-d", "128", "-x", "12", "-l", "1e-3", "-u", "3", "-q", "0.1", "-c", "0.1",
        "-v", "4", "-m", "3"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(script, *args, cwd, check=True):
    result = subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def steps(stdout):
    """(loss, norm) of each step line, as printed (6 and 4 decimals)."""
    return [(float(loss), float(norm)) for loss, norm in re.findall(r"^step +\d+/\d+ \| loss (\S+) .*?\| norm +(\S+)",
                                                                   stdout, re.M)]


def vals(stdout):
    return [float(v) for v in re.findall(r"^val loss (\S+)$", stdout, re.M)]


@pytest.fixture(scope="module")
def both(data, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("runs")
    ours = run("train_gpt2.py", *LOOP, *data, "--device", "cpu", "-s", "0", "-o", "ours", cwd=cwd)
    theirs = run("dev/torch_train.py", *LOOP, *data, "--device", "cpu", "--dtype", "fp32", "-o", "torch", cwd=cwd)
    return dict(cwd=cwd, ours=ours.stdout, torch=theirs.stdout)


def test_pytorch_reproduces_our_losses_step_by_step(both):
    ours, theirs = steps(both["ours"]), steps(both["torch"])
    assert len(ours) == len(theirs) == 12
    np.testing.assert_allclose([loss for loss, _ in theirs], [loss for loss, _ in ours], rtol=0, atol=1e-4)
    np.testing.assert_allclose([norm for _, norm in theirs], [norm for _, norm in ours], rtol=0, atol=2e-4)
    assert len(vals(both["ours"])) == 4  # steps 0, 4, 8 and the last
    np.testing.assert_allclose(vals(both["torch"]), vals(both["ours"]), rtol=0, atol=1e-4)


def test_the_losses_fall(both):
    losses = [loss for loss, _ in steps(both["torch"])]
    val = vals(both["torch"])
    assert losses[-1] < losses[0] - 0.5 and val[-1] < val[0] - 0.5 and val == sorted(val, reverse=True), (losses, val)


def test_both_write_the_same_main_log_lines(both):
    ours = (both["cwd"] / "ours" / "main.log").read_text().splitlines()
    theirs = (both["cwd"] / "torch" / "main.log").read_text().splitlines()
    assert [line.split()[0] + line.split()[1][:4] for line in theirs] == \
           [line.split()[0] + line.split()[1][:4] for line in ours]  # the same steps, trl and tel in the same order
    for a, b in zip(ours, theirs):
        if " trl:" in a:
            assert re.fullmatch(r"s:\d+ trl:\d+\.\d{4} lr:\d+\.\d{6} norm:\d+\.\d{2}", b), b
            assert a.split(" lr:")[1].split()[0] == b.split(" lr:")[1].split()[0]  # the same schedule, to 6 decimals
        else:
            assert re.fullmatch(r"s:\d+ tel:\d+\.\d{4}", b), b
        # the losses agree to 1e-6 or so: 4 decimals can round apart by at most one unit
        assert abs(float(a.split(":")[2].split()[0]) - float(b.split(":")[2].split()[0])) <= 1.01e-4, (a, b)


def test_loss_parity_on_the_cpu_writes_its_plot_and_a_passing_record(data, tmp_path):
    result = run("dev/loss_parity.py", "--device", "cpu", "-e", "d1", "-b", "2", "-t", "32", "-d", "128", "-x", "6",
                 "-l", "1e-3", "-u", "1", "-v", "2", "-m", "2", *data, "-o", "out", "--results", "results",
                 cwd=tmp_path)
    assert result.stdout.splitlines()[-1] == "ours against PyTorch fp32: PASS"
    assert (tmp_path / "results" / "loss_parity_cpu.png").read_bytes()[:8] == PNG_MAGIC
    record = json.loads((tmp_path / "results" / "loss_parity_cpu.json").read_text())
    assert (record["device"], record["status"], record["passed"], record["steps"]) == ("cpu", "complete", True, 6)
    assert record["commit"] and record["command"].startswith("python dev/loss_parity.py")
    runs = record["runs"]
    assert set(runs) == {"ours", "torch_fp32", "torch_bf16"}
    for name, figures in runs.items():
        assert figures["exit_status"] == 0 and figures["seconds"] > 0 and figures["first_step_ms"] > 0
        assert figures["median_step_ms"] > 0 and len(figures["train"]) == 6 and figures["val_steps"] == [0, 2, 4, 6]
        assert read_log(tmp_path / "out" / name / "main.log")["tel"][6] == figures["val"][-1]
        assert ("--dtype bf16" in figures["command"]) == (name == "torch_bf16")
    # ours and PyTorch fp32 agree to the logs' 4 decimals; the bars follow from PyTorch bf16's own distance
    np.testing.assert_allclose(runs["ours"]["train"], runs["torch_fp32"]["train"], rtol=0, atol=1.01e-4)
    np.testing.assert_allclose(runs["ours"]["val"], runs["torch_fp32"]["val"], rtol=0, atol=1.01e-4)
    fp32, bf16 = runs["torch_fp32"], runs["torch_bf16"]
    train_gap = np.abs(moving_average(bf16["train"], 10) - moving_average(fp32["train"], 10)).max()
    val_gap = np.abs(np.subtract(bf16["val"], fp32["val"])).max()
    assert record["bars"] == {"train": pytest.approx(max(3 * train_gap, 0.02), abs=1e-6),
                              "val": pytest.approx(max(3 * val_gap, 0.02), abs=1e-6)}
    assert record["gaps"]["ours_train"] <= 1.01e-4 and record["gaps"]["ours_val"] <= 1.01e-4


def moving_average(values, window):
    """A centred moving average, the ends padded with the edge values (vislog's smoothing)."""
    padded = np.pad(np.asarray(values, dtype=np.float64), (window // 2, window - 1 - window // 2), mode="edge")
    return np.array([padded[i:i + window].mean() for i in range(len(values))])


def fake_curves(fp32=0.0, bf16=0.0, ours=0.0, ours_val=0.0, spike=0.0, steps=20):
    """Three runs' main.log lines around one falling curve: offsets for each (train and val alike),
    ours' val further moved by ours_val, and a one-step spike in ours' train loss at step 10."""
    base = [10.0 - 0.25 * s for s in range(steps)]
    offsets = {"torch_fp32": (fp32, 0.0), "torch_bf16": (bf16, 0.0), "ours": (ours, ours_val)}
    logs = {}
    for name, (offset, val_extra) in offsets.items():
        lines = []
        for s in range(steps + 1):
            if s % 10 == 0:
                lines.append(f"s:{s} tel:{9.0 - 0.2 * s + offset + val_extra:.4f}")
            if s < steps:
                loss = base[s] + offset + (spike if name == "ours" and s == 10 else 0.0)
                lines.append(f"s:{s} trl:{loss:.4f} lr:0.000100 norm:1.00")
        logs[name] = "\n".join(lines) + "\n"
    return logs


def run_parity_on(logs, tmp_path, monkeypatch, data, capsys, exit_status=None, interrupt=False):
    """loss_parity's main with the trainers replaced by logs already written: (exit code, stderr, record)."""
    def fake_train_all(runs, out, at_once):
        for name, argv in runs.items():
            run_dir = Path(argv[argv.index("-o") + 1])
            run_dir.mkdir(parents=True)
            (run_dir / "main.log").write_text(logs[name])
        if interrupt:
            raise KeyboardInterrupt
        return {name: ((exit_status or {}).get(name, 0), 1.0) for name in runs}

    monkeypatch.setattr(loss_parity, "train_all", fake_train_all)
    with pytest.raises(SystemExit) as exit_:
        loss_parity.main(["--device", "cpu", *data, "-b", "2", "-t", "32", "-d", "-1", "-x", "20", "-o",
                          str(tmp_path / "out"), "--results", str(tmp_path)])
    return exit_.value.code, capsys.readouterr().err, json.loads((tmp_path / "loss_parity_cpu.json").read_text())


@pytest.mark.parametrize("curves, passed", [
    (dict(bf16=0.01, ours=0.0299), True),     # the bar: 3 x PyTorch bf16's gap of 0.01
    (dict(bf16=0.01, ours=0.0301), False),
    (dict(bf16=-0.01, ours=-0.0299), True),   # a gap either way
    (dict(bf16=0.001, ours=0.0199), True),    # 3 x 0.001 is under the floor of 0.02
    (dict(bf16=0.001, ours=0.0201), False),
    (dict(bf16=0.01, ours_val=0.031), False),  # one val point is enough
    (dict(bf16=0.001, spike=0.19), True),     # one step's spike, smoothed over 10 steps: 0.019
    (dict(bf16=0.001, spike=0.21), False),    # 0.021
])
def test_loss_parity_judges_the_curves_by_pytorchs_own_bf16_gap(data, tmp_path, monkeypatch, capsys, curves, passed):
    code, _, record = run_parity_on(fake_curves(**curves), tmp_path, monkeypatch, data, capsys)
    assert code == (0 if passed else 1) and record["passed"] is passed and record["status"] == "complete"
    bf16_gap = abs(curves["bf16"])
    assert record["bars"] == {"train": pytest.approx(max(3 * bf16_gap, 0.02), abs=1e-6),
                              "val": pytest.approx(max(3 * bf16_gap, 0.02), abs=1e-6)}
    assert record["gaps"]["torch_bf16_val"] == pytest.approx(bf16_gap, abs=1e-6)


def test_loss_parity_cut_short_keeps_the_curves_so_far_without_a_verdict(data, tmp_path, monkeypatch, capsys):
    logs = {name: "".join(log.splitlines(keepends=True)[:7]) for name, log in fake_curves().items()}  # tel, 6 trl
    code, stderr, record = run_parity_on(logs, tmp_path, monkeypatch, data, capsys, interrupt=True)
    assert code == 1 and stderr == ("error: interrupted (SIGINT): the curves so far, no verdict (the trainers' "
                                    f"output is in {tmp_path / 'out'}/<run>.txt)\n")
    assert record["status"].startswith("interrupted") and record["passed"] is None and record["gaps"] is None
    assert [len(r["train"]) for r in record["runs"].values()] == [6, 6, 6]
    assert record["runs"]["ours"]["val_steps"] == [0]


def test_loss_parity_with_a_failed_trainer_has_no_verdict(data, tmp_path, monkeypatch, capsys):
    code, stderr, record = run_parity_on(fake_curves(), tmp_path, monkeypatch, data, capsys,
                                         exit_status={"torch_bf16": 1})
    assert code == 1 and stderr.startswith("error: failed: torch_bf16 exited non-zero") and stderr.count("\n") == 1
    assert record["passed"] is None and record["runs"]["torch_bf16"]["exit_status"] == 1


def test_loss_parity_refuses_more_than_3_epochs(data, tmp_path):
    # the fixture's train shards hold 5,501 tokens: 100 steps of 256 are 4.7 epochs
    result = run("dev/loss_parity.py", "--device", "cpu", "-e", "d1", "-b", "2", "-t", "32", "-d", "256", "-x", "100",
                 *data, "-o", "out", "--results", "results", cwd=tmp_path, check=False)
    assert result.returncode == 1 and result.stdout == "" and result.stderr == (
        "error: -x 100: 100 steps of 256 tokens are 4.7 epochs of -i (5,501 tokens), over 3: lower -x or -d\n")
    assert not (tmp_path / "out").exists() and not (tmp_path / "results").exists()


def test_read_log_keeps_train_and_val_losses_and_hellaswag_by_step(tmp_path):
    (tmp_path / "main.log").write_text("s:0 tel:10.9000\ns:0 trl:10.8000 lr:0.000300 norm:2.50\ns:1 trl:9.5000 "
                                       "lr:0.000600 norm:1.50\ns:2 eval:0.2500\ns:2 tel:9.1000\n")
    assert read_log(tmp_path / "main.log") == {"trl": {0: 10.8, 1: 9.5}, "tel": {0: 10.9, 2: 9.1}, "eval": {2: 0.25}}


@pytest.mark.parametrize("args, expected", [(["-d", "100"], "-d 100"), (["-e", "model.bin"], "model.bin"),
                                            (["-o", "full"], "main.log")])
def test_bad_input_is_one_line_and_exit_1(data, tmp_path, args, expected):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "main.log").write_text("s:0 tel:1.0\n")
    result = run("dev/torch_train.py", *LOOP, *data, *args, cwd=tmp_path, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and expected in lines[0], result.stderr
    assert result.stdout == ""

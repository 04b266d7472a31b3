"""dev/torch_train.py against train_gpt2.py on the CPU: two independent implementations (the NumPy
twins, PyTorch autograd) of the whole training loop (data order, schedule, clipping, decay groups,
grad accumulation, val loss) give the same losses step by step; and dev/loss_parity.py, the
driver that compares their curves, writes its plot and record and decides by its tolerance."""
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
    result = run("dev/loss_parity.py", "--device", "cpu", "-e", "d1", "-b", "2", "-t", "32", "-x", "4", "-l", "1e-3",
                 "-u", "1", "-v", "2", "-m", "1", *data, "-o", "out", "--results", "results", cwd=tmp_path)
    assert "PASS" in result.stdout.splitlines()[-1]
    assert (tmp_path / "results" / "loss_parity_cpu.png").read_bytes()[:8] == PNG_MAGIC
    record = json.loads((tmp_path / "results" / "loss_parity_cpu.json").read_text())
    assert record["device"] == "cpu" and record["passed"] is True and record["steps"] == 4 and record["tol"] == 0.01
    assert record["rel_diff"] <= 1e-4 and record["commit"] and record["command"].startswith("python dev/loss_parity.py")
    assert record["ours_final_val"] == pytest.approx(record["torch_final_val"], abs=1e-4)
    assert len(record["ours_train"]) == len(record["torch_train"]) == 4 and record["val_steps"] == [0, 2, 4]
    np.testing.assert_allclose(record["torch_train"], record["ours_train"], rtol=0, atol=1.01e-4)
    np.testing.assert_allclose(record["torch_val"], record["ours_val"], rtol=0, atol=1.01e-4)
    assert record["ours_val"][-1] == record["ours_final_val"] and record["torch_val"][-1] == record["torch_final_val"]
    assert read_log(tmp_path / "out" / "torch" / "main.log")["tel"][4] == record["torch_final_val"]


@pytest.mark.parametrize("torch_val, passed", [(2.0202, True), (2.0203, False), (1.9802, True), (1.9801, False)])
def test_loss_parity_passes_exactly_within_its_relative_tolerance(tmp_path, monkeypatch, torch_val, passed):
    """The decision alone, on made-up logs: ours ends at 2.0, and |ours - torch| / torch <= 0.01
    passes: torch in [2 / 1.01, 2 / 0.99] = [1.98020, 2.02020]."""
    def fake_train(name, script, flags):
        run_dir = Path(flags[flags.index("-o") + 1])
        run_dir.mkdir(parents=True)
        final = 2.0 if name == "ours" else torch_val
        (run_dir / "main.log").write_text(f"s:0 tel:10.0000\ns:0 trl:10.0000 lr:0.000100 norm:1.00\ns:1 tel:{final}\n")

    monkeypatch.setattr(loss_parity, "train", fake_train)
    with pytest.raises(SystemExit) as exit_:
        loss_parity.main(["--device", "cpu", "-o", str(tmp_path / "out"), "--results", str(tmp_path)])
    assert exit_.value.code == (0 if passed else 1)
    record = json.loads((tmp_path / "loss_parity_cpu.json").read_text())
    assert record["passed"] is passed
    assert record["rel_diff"] == pytest.approx(abs(2.0 - torch_val) / torch_val, abs=1e-6)


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

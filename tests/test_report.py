"""``python -m ddp.report`` and the summary at the end of every run."""

import pytest

from ddp.reporting import report
from ddp.train import main as train
from tests.harness import run_cli

FAST = ["train.epochs=2", "data.batch_size=256", "log.progress=false", "log.tensorboard=false",
        "dist.threads_per_rank=1"]


@pytest.fixture
def finished_run(in_tmp):
    assert train([*FAST, "run.name=rep"]) == 0
    return in_tmp / "runs" / "rep"


def test_report_writes_a_valid_png_and_prints_the_epochs(finished_run, capsys):
    from matplotlib.image import imread

    capsys.readouterr()
    assert report.main([str(finished_run)]) == 0  # the group: its newest version
    out = capsys.readouterr().out
    png = finished_run / "version_0" / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = imread(png).shape
    assert (width, height) == (900, 630)  # 10×7 inches at 90 dpi
    rows = [line for line in out.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert len(rows) == 2 and "test accuracy: best" in out
    assert f"best checkpoint: {finished_run / 'version_0' / 'checkpoints'}" in out


def test_every_run_ends_with_a_summary(finished_run, capsys):
    assert train([*FAST, "run.name=rep", "train.resume=never"]) == 0
    err = capsys.readouterr().err
    assert "summary" in err and "test accuracy: best" in err and "samples/s" in err
    assert "peak memory:" in err and "best checkpoint: runs/rep/version_1/checkpoints/step-" in err


def test_report_on_a_directory_without_a_run_is_one_line_exit_2(tmp_path):
    done = run_cli(["-m", "ddp.report", str(tmp_path / "nothing")], cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "no run under" in done.stderr

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


def _write_run(version, records, history):
    import json

    version.mkdir(parents=True)
    (version / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (version / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))


def test_a_regression_run_resumed_once_plots_its_metrics_on_integer_epochs_and_marks_the_resume(tmp_path):
    version = tmp_path / "runs" / "reg" / "version_0"
    records = [{"kind": "epoch", "epoch": e, "step": 10 * e, "train_loss": 1.0 / e ** 3, "test_loss": 2.0 / e ** 3,
                "test_acc": None, "test_mae": 0.5 / e, "lr": 0.1, "samples_per_s": 100.0, "epoch_time_s": 1.0}
               for e in range(1, 5)]
    _write_run(version, records, [{"event": "start", "epoch": 0}, {"event": "resume", "epoch": 2}])
    fig = report.figure(version)
    loss, acc = fig.axes[0], fig.axes[1]
    assert loss.get_yscale() == "log"
    assert [line.get_label() for line in acc.get_lines() if not line.get_label().startswith("_")] == ["test_mae"]
    ticks = [t for t in acc.get_xticks() if 1 <= t <= 4]
    assert ticks and all(float(t).is_integer() for t in ticks)
    marks = [line for line in loss.get_lines() if line.get_linestyle() == "--" and list(line.get_xdata()) == [2.5, 2.5]]
    assert len(marks) == 1 and "resumed" in [line.get_label() for line in loss.get_lines()]
    text = report.summary(version, wall_s=3.0)
    assert "over the run's 2 starts" in text and "this start:    3.0 s wall" in text


def test_report_reads_a_run_of_your_own_loop_that_logs_only_a_loss(tmp_path, capsys):
    version = tmp_path / "runs" / "own" / "version_0"
    _write_run(version, [{"kind": "epoch", "epoch": e, "step": 5 * e, "loss": 1.0 / e} for e in (1, 2)],
               [{"event": "start", "epoch": 0}])
    assert report.main([str(tmp_path / "runs" / "own")]) == 0
    out = capsys.readouterr().out
    assert "2 epoch records, 10 steps" in out and (version / "report.png").stat().st_size > 1000

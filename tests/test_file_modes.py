"""Run files are readable as the umask says, like any file the user's tools write: a teammate or an
evaluation job on a shared filesystem can read recipe.yaml, metrics, history and checkpoints."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from tests.harness import python_env

MODES = [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)]


@pytest.mark.parametrize(("umask", "expected"), MODES)
def test_atomic_writes_get_the_mode_open_would_give_them(tmp_path, umask, expected):
    code = ("import os, sys; from pathlib import Path; from ddp.checkpoint.atomic import write_text_atomic;"
            f"os.umask({umask}); write_text_atomic(Path(sys.argv[1]), 'x')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "f")], check=True, env=python_env())
    assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == expected


def test_every_file_of_a_run_is_group_and_world_readable_under_umask_022(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os, runpy; os.umask(0o022); "
                           "runpy.run_module('ddp.train', run_name='__main__')", "train.max_steps=3",
                           "train.epochs=1", "log.progress=false", "log.tensorboard=false"],
                          cwd=tmp_path, env=python_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    files = [p for p in (tmp_path / "runs" / "digits" / "version_0").rglob("*") if p.is_file() and p.name != ".lock"]
    names = {p.name for p in files}
    assert {"recipe.yaml", "metrics.jsonl", "history.jsonl", "latest", "rank0.log"} <= names, names
    assert any(p.suffix == ".pt" for p in files)
    unreadable = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files if stat.S_IMODE(p.stat().st_mode) != 0o644}
    assert not unreadable

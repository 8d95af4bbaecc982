"""CI's share of the chaos runs (``python -m tests.chaos --runs 50`` runs the full set).

One job under ``torchrun --max-restarts``, at the same time as the uninterrupted reference (the two
share the cores): rank 0 is killed inside the checkpoint save of step 10 with its ``.tmp`` partly
written, then, in the restarted group, rank 1 is killed during training at step 30. The job must
exit 0 after two restarts, resume from the last complete checkpoint each time and end with the
reference's weights bitwise. (Two separate runs cost CI one more torch start-up of three
processes, ~15 s on 2 cores.)
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ddp.lifecycle.history import read_history
from tests.chaos import RUN_DIR, Kill, Schedule, chaos_run, judge, train_reference

AIMED = Schedule(save_steps=(), steps=46, seconds=0.0)  # unused: the kills name their steps
KILLS = (Kill("save", rank=0, step=10), Kill("step", rank=1, step=30))


def test_killed_ranks_resume_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    with ThreadPoolExecutor(2) as pool:
        reference = pool.submit(train_reference, tmp_path / "reference", 2)
        run = pool.submit(chaos_run, 1, KILLS, tmp_path / "run", 2, AIMED)
        outcome = judge(run.result(), reference.result())
    log = Path(outcome.directory) / "torchrun.log"
    assert outcome.passed, f"{outcome.line()}\n{log.read_text()[-4000:]}"
    assert outcome.versions == [RUN_DIR.name], outcome.line()  # both restarts resumed version_0
    in_save, in_training = outcome.kills
    assert not in_save.missed and not in_training.missed, outcome.line()
    torn = re.search(r"\.tmp (\d+) bytes", in_save.where)
    assert torn and int(torn.group(1)) > 0, outcome.line()  # rank 0 died with the .pt partly written
    history = read_history(Path(outcome.directory) / RUN_DIR / "history.jsonl")
    assert [h["event"] for h in history] == ["start", "resume", "resume"], history
    assert history[1]["step"] == 5, history  # the torn save of step 10 was skipped
    assert history[2]["step"] >= 25, history  # saved at 25 before step 26 began

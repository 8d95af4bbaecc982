"""``data.batch_size=auto`` trains a sound model: the largest batch that fits, capped so an epoch
keeps ``data.auto_min_steps`` optimizer steps, said in one line."""

from __future__ import annotations

import json

import pytest

from ddp.memory.policy import sound_batch
from tests.harness import run_torchrun


@pytest.mark.parametrize(("fits", "samples", "world", "accumulate", "min_steps", "expected"), [
    (719, 1437, 2, 1, 20, 35),     # the default recipe on 2 ranks: the whole shard fits
    (16, 1437, 2, 1, 20, 16),      # memory is the limit: unchanged
    (719, 1437, 2, 2, 20, 17),     # accumulation counts micro-batches per step
    (719, 30, 4, 1, 20, 1),        # tiny data: never below 1
])
def test_the_auto_batch_keeps_the_steps_per_epoch(fits, samples, world, accumulate, min_steps, expected):
    chosen = sound_batch(fits, samples, world, accumulate, min_steps)
    assert chosen == expected
    if chosen > 1:
        assert samples // (chosen * world * accumulate) >= min_steps


def test_the_default_recipe_with_an_auto_batch_on_two_ranks_reaches_97_percent(tmp_path):
    done = run_torchrun(2, ["-m", "ddp.train", "data.batch_size=auto", "memory.budget_mb=4000", "memory.cache=''",
                            "log.progress=false", "log.tensorboard=false"], tmp_path, timeout=420)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "optimizer steps (data.auto_min_steps=20)" in done.stderr, done.stderr[-3000:]
    version = tmp_path / "runs" / "digits" / "version_0"
    records = [json.loads(line) for line in (version / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "epoch"][-1]
    assert last["test_acc"] >= 0.97, last
    assert last["step"] >= 10 * 20  # 10 epochs of at least 20 steps

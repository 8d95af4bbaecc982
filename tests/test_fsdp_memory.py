"""FSDP's point, measured: at 4 Gloo ranks, the memory training adds to each rank is at most 0.4×
DDP's for a model whose state (parameters, gradients, AdamW's two moments) dominates.

One spawned job of 4 ranks. Each rank first runs FSDP and DDP once on a tiny model, so their
one-time set-up (≈ 100 MB for FSDP's first ``fully_shard``, paid once per process whatever the
model) is not counted; then, for FSDP and then DDP on the large model, it resets its peak RSS
(``/proc/self/clear_refs``), trains, reads the peak (``VmHWM``) and frees everything: what
training added. glibc is told to return freed blocks to the system (``MALLOC_MMAP_THRESHOLD_``), as
docs/memory.md advises for FSDP on CPU: it otherwise keeps each freed all-gathered block resident.

FSDP's peak here is not its sharded state (a quarter of DDP's) but the start: every rank builds
the whole model before sharding it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.harness import spawn_ranks

BLOCKS, WIDTH, BATCH, STEPS = 12, 2048, 8, 1  # 50 M parameters: 201 MB, ×4 with gradients and AdamW
MB = 2**20


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _trained_peak(env, parallel: str, blocks: int = BLOCKS, width: int = WIDTH) -> dict[str, float]:
    """Reset the peak, train ``STEPS`` steps under ``parallel``, free everything; the memory added."""
    import gc

    from ddp.cluster.devices import Devices
    from ddp.config import DistConfig, Parallel
    from ddp.model.parallel import ddp_options, wrap_model

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from here
    start = _status("VmRSS")
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(blocks)])
    model = wrap_model(model, Parallel(parallel), torch.device("cpu"), Devices(False, 0),
                       ddp_kwargs=ddp_options(DistConfig()))  # DDP as a run has it: gradients in its buckets
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = torch.randn(BATCH, width)
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=False)
        model(inputs).square().mean().backward()
        optimizer.step()
    peak = _status("VmHWM")
    del model, optimizer
    torch.distributed.barrier()
    return {"added_mb": (peak - start) / MB, "start_mb": start / MB, "peak_mb": peak / MB}


def _both(env) -> dict[str, dict[str, float]]:
    """Both once on a small model (their one-time set-up, ≈ 100 MB for FSDP's first ``fully_shard``,
    is not what sharding saves), then FSDP and DDP in turn on the large one."""
    for parallel in ("fsdp", "ddp"):
        _trained_peak(env, parallel, blocks=2, width=64)
    return {parallel: _trained_peak(env, parallel) for parallel in ("fsdp", "ddp")}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads and resets the peak RSS through /proc")
@pytest.mark.timeout(300)
def test_fsdp_at_4_ranks_adds_at_most_0_4_of_ddps_memory_per_rank(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # inherited by the spawned ranks
    ranks = spawn_ranks(_both, 4, timeout=240)
    added = {}
    for parallel in ("ddp", "fsdp"):
        added[parallel] = max(r[parallel]["added_mb"] for r in ranks)
        print(f"{parallel}: " + ", ".join(f"rank {i} +{r[parallel]['added_mb']:.0f} MB (from "
                                          f"{r[parallel]['start_mb']:.0f} to {r[parallel]['peak_mb']:.0f})"
                                          for i, r in enumerate(ranks)))
    state_mb = BLOCKS * (WIDTH * WIDTH + WIDTH) * 4 * 4 / MB  # parameters + gradients + two moments, fp32
    assert added["ddp"] >= state_mb, added  # DDP holds all of it on every rank
    ratio = added["fsdp"] / added["ddp"]
    print(f"FSDP ÷ DDP, memory added per rank at 4 ranks: {ratio:.2f} ({added['fsdp']:.0f} / {added['ddp']:.0f} MB)")
    assert ratio <= 0.4, added

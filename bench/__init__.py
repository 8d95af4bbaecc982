"""Benchmark suite: ``python -m bench all`` compares ddp-recipes' training loop with a hand-written
DDP loop, PyTorch Lightning and Accelerate on the same model, data, per-rank batch and world size.

What is measured (see ``bench.measure``): steady-state loop throughput in samples/s from per-step
wall-clock records, and the time from launching ``torchrun`` to the first optimizer step finishing.
Every competitor runs under ``torchrun --standalone`` in its own process tree, one at a time, in
interleaved rounds; the report gives medians of per-round ratios with their min–max.
"""

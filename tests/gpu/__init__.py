"""GPU checks: real runs on one CUDA GPU (``bash tests/gpu/run.sh``); skipped where CUDA is absent."""

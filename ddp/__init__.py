"""ddp: a distributed training launcher and cluster recipes for PyTorch.

Entry points: ``python -m ddp.train`` (or ``torchrun ... -m ddp.train``); ``ddp.fit(...)`` in Python;
``run = ddp.setup()`` for a training loop of your own (``ddp.run``).
"""

__version__ = "0.1.0"

__all__ = ["fit", "setup", "Run"]


def __getattr__(name: str):  # ``ddp.fit`` / ``ddp.setup`` without importing torch at ``import ddp``
    if name == "fit":
        from ddp.api import fit

        return fit
    if name == "setup":
        from ddp.run import setup

        return setup
    if name == "Run":
        from ddp.run import Run

        return Run
    raise AttributeError(f"module 'ddp' has no attribute {name!r}")

"""ddp: a distributed training launcher and cluster recipes for PyTorch.

Entry points: ``python -m ddp.train`` (or ``torchrun ... -m ddp.train``), and ``ddp.fit(...)`` in Python.
"""

__version__ = "0.1.0"

__all__ = ["fit"]


def __getattr__(name: str):  # ``ddp.fit`` without importing torch at ``import ddp``
    if name == "fit":
        from ddp.api import fit

        return fit
    raise AttributeError(f"module 'ddp' has no attribute {name!r}")

"""ddp: a distributed training launcher and cluster recipes for PyTorch.

Entry point: ``python -m ddp.train`` (or ``torchrun ... -m ddp.train``).
"""

__version__ = "0.1.0"

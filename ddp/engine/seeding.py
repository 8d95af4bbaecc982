"""Seeding every random generator a training run touches, and deterministic kernels on request."""

from __future__ import annotations

import logging
import random
import re

import numpy as np
import torch

from ddp.cluster.environment import export_variables
from ddp.errors import ConfigError

log = logging.getLogger(__name__)

# cuBLAS picks its reduction order per workspace unless one fixed configuration is set before its
# first call (CUDA ≥ 10.2); torch refuses such kernels under use_deterministic_algorithms otherwise.
CUBLAS_WORKSPACE = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
_NOT_DETERMINISTIC = re.compile(r"^(\S+) does not have a deterministic implementation")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) with ``seed``. Not collective.

    Every rank uses the same seed, so models start identical even before DDP's broadcast;
    data order differs per rank through the DistributedSampler, not through this seed.
    ``deterministic`` also makes every kernel deterministic: cuDNN's deterministic algorithms,
    cuBLAS's fixed workspace (``CUBLAS_WORKSPACE_CONFIG``, unless you set it) and
    ``torch.use_deterministic_algorithms(True)``, under which an op with no deterministic kernel
    raises (``not_deterministic`` turns that into one line) instead of warning and going on.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        for line in export_variables(CUBLAS_WORKSPACE, "train.deterministic=true"):
            log.debug("%s", line)
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True)


def not_deterministic(err: BaseException) -> ConfigError | None:
    """The one-line refusal for torch's "<op> does not have a deterministic implementation", or None."""
    found = _NOT_DETERMINISTIC.search(str(err)) if isinstance(err, RuntimeError) else None
    if found is None:
        return None
    return ConfigError(f"train.deterministic=true, but {found.group(1)} has no deterministic implementation "
                       "on this device.",
                       "set train.deterministic=false (runs then differ in the last bits), or replace that "
                       "operation in the model")

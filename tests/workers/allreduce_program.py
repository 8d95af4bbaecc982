"""A user's own program for ``slurm.submit``: torch.distributed from torchrun-style variables.

Writes ``out/rank<r>.txt`` with its rank, the world size and an all_reduce of all ranks' (rank + 1).
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> int:
    out = Path(sys.argv[sys.argv.index("--out") + 1])
    dist.init_process_group("gloo")
    total = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(total)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.get_rank()}.txt").write_text(
        f"{dist.get_rank()} {dist.get_world_size()} {int(total.item())} {os.environ['LOCAL_RANK']}\n")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

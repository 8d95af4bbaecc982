"""Hold all but LEAVE_MB of the GPU's free memory, until stdin closes (GPU check c).

    python tests/gpu/ballast.py LEAVE_MB      → prints one JSON line once the memory is held

On a 139 GiB H200 the real out-of-memory boundary of a training step is minutes of trial steps
away; with the rest held by this process, every other process sees only LEAVE_MB free through
``torch.cuda.mem_get_info`` — the number the memory probe's budget is read from — and really runs
out of memory beyond it (minus its own CUDA context). Plain device memory (cudaMalloc through
torch's allocator), never managed memory.
"""

from __future__ import annotations

import json
import sys

import torch

CHUNK = 2**30


def main(leave_mb: int) -> int:
    free, total = torch.cuda.mem_get_info(0)
    leave, held = leave_mb * 2**20, []
    for _ in range(4096):  # 1 GiB blocks, re-reading what is free after each
        if free <= leave + 64 * 2**20:
            break
        try:
            held.append(torch.empty(min(CHUNK, free - leave), dtype=torch.uint8, device="cuda:0"))
        except torch.cuda.OutOfMemoryError:
            break  # the device gives no more than this
        torch.cuda.synchronize()
        free, _ = torch.cuda.mem_get_info(0)
    print(json.dumps({"held_mb": round(sum(b.numel() for b in held) / 2**20), "free_mb": round(free / 2**20),
                      "total_mb": round(total / 2**20)}), flush=True)
    sys.stdin.read()  # hold until the parent closes our stdin (or kills us)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))

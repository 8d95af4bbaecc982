"""``python -m ddp.train`` as if this process saw GPUs, faked at the CUDA boundary only.

Usage: python tests/workers/fake_gpus.py UUID[,UUID...] [ddp.train arguments]
torch.cuda's availability, device count and device properties (each GPU's UUID) are faked, and
``torch.cuda.set_device`` records instead of touching a driver; ``CUDA_VISIBLE_DEVICES`` and every
decision above the boundary (backend, device, the rendezvous's GPU check) run for real. Anything
that really needs a GPU (moving a tensor there) fails, so this only reaches a run's refusals.
"""

import sys
import types

import torch

UUIDS = sys.argv[1].split(",")

torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: len(UUIDS)
torch.cuda.get_device_properties = lambda index: types.SimpleNamespace(uuid=UUIDS[index], name="Fake GPU")
torch.cuda.set_device = lambda device: None

if __name__ == "__main__":
    from ddp.train import main

    sys.exit(main(sys.argv[2:]))

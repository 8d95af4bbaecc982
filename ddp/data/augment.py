"""Random augmentation applied to a whole batch on its device (the in-memory data path).

Each batch draws from a generator seeded by (seed, rank, global step), so augmentation is the
same after a resume, mid-epoch included, whatever happened before.
"""

from __future__ import annotations

import torch


class CropFlip:
    """torchvision's RandomCrop(size, padding) + RandomHorizontalFlip, batched.

    ``fill`` is the per-channel value of a zero pixel AFTER normalisation, so the padding matches
    torchvision's (which pads the raw image with 0 before normalising).
    """

    def __init__(self, padding: int, fill: tuple[float, ...]) -> None:
        self.padding = padding
        self.fill = torch.tensor(fill)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, channels, height, width = images.shape
        pad = self.padding
        fill = self.fill.to(images.device, images.dtype).view(1, channels, 1, 1)
        padded = fill.expand(batch, channels, height + 2 * pad, width + 2 * pad).clone()
        padded[:, :, pad:pad + height, pad:pad + width] = images
        dy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=images.device)
        dx = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=images.device)
        rows = (dy[:, None] + torch.arange(height, device=images.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(width, device=images.device))[:, None, None, :]
        batch_idx = torch.arange(batch, device=images.device)[:, None, None, None]
        chan_idx = torch.arange(channels, device=images.device)[None, :, None, None]
        cropped = padded[batch_idx, chan_idx, rows, cols]
        flip = torch.rand(batch, generator=generator, device=images.device) < 0.5
        return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)

"""One prepared slice of raw data, as site adaptation and self-supervised validation use it."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class SiteSlice:
    """One prepared slice: undersampled k-space (C, ky, kx), mask (ky, kx), ESPIRiT maps, ACS;
    the file it came from and its slice index there (-1: not from a file)."""

    kspace: torch.Tensor
    mask: torch.Tensor
    maps: torch.Tensor
    acs: tuple[int, int] | None
    source: str
    index: int = -1

    def to(self, device: torch.device | str) -> SiteSlice:
        """The same slice with its tensors on ``device``."""
        return replace(self, kspace=self.kspace.to(device), mask=self.mask.to(device),
                       maps=self.maps.to(device))

"""A torch ``Dataset`` over patches, for training with a ``DataLoader``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ._patches import Patches, extract_patches

if TYPE_CHECKING:
    from spatialdata import SpatialData


class PatchDataset(Dataset):
    """Patches as ``(c, h, w)`` float tensors in [0, 1], optionally with a target per patch.

    The patches are cut once, chunk by chunk (:func:`histoseq.pp.extract_patches`), and kept as uint8, so random
    access by a shuffling ``DataLoader`` never goes back to the image (224 px RGB: 150 kB per spot). To stream a
    whole-slide grid that does not fit in memory, iterate :func:`histoseq.pp.iter_patches` instead.

    Parameters
    ----------
    patches
        Patches from :func:`histoseq.pp.extract_patches`.
    targets
        Optional array with one row per patch (e.g. expression), returned with each patch.
    transform
        Optional callable applied to each ``(c, h, w)`` tensor (augmentation).

    Examples
    --------
    >>> import histoseq as hs
    >>> from torch.utils.data import DataLoader
    >>> sdata = hs.datasets.synthetic(n_sections=1)
    >>> ds = hs.pp.PatchDataset.from_sdata(sdata, patch_size_um=56, patch_px=32, progress=False)
    >>> next(iter(DataLoader(ds, batch_size=8))).shape
    torch.Size([8, 3, 32, 32])

    """

    def __init__(self, patches: Patches, targets: Any = None, transform: Callable | None = None):
        self.patches = patches
        self.images = torch.from_numpy(np.ascontiguousarray(patches.images))
        if targets is not None:
            targets = torch.as_tensor(np.asarray(targets, dtype=np.float32))
            if len(targets) != len(patches):
                raise ValueError(f"`targets` has {len(targets)} rows for {len(patches)} patches.")
        self.targets = targets
        self.transform = transform

    @classmethod
    def from_sdata(
        cls, sdata: SpatialData, *, targets: Any = None, transform: Callable | None = None, **kwargs: Any
    ) -> PatchDataset:
        """Cut the patches with :func:`histoseq.pp.extract_patches` (``kwargs``) and wrap them."""
        return cls(extract_patches(sdata, **kwargs), targets=targets, transform=transform)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = self.images[i].permute(2, 0, 1).float().div_(255.0)
        if self.transform is not None:
            x = self.transform(x)
        if self.targets is None:
            return x
        return x, self.targets[i]

"""Plots of patches."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..pp import Patches


def patches(
    patches: Patches,
    *,
    n: int = 16,
    ncols: int = 8,
    random_state: int | None = 0,
    title: str | None = None,
    ax_size: float = 1.4,
    show: bool | None = None,
) -> Figure:
    """Show a sample of patches in a grid, each titled with its spot; padded border patches framed in red.

    Parameters
    ----------
    patches
        Patches from :func:`histoseq.pp.extract_patches`.
    n
        How many patches to show (a random sample when there are more).
    ncols
        Patches per row.
    random_state
        Seed of the sample.
    title
        Figure title; default states the physical size.
    ax_size
        Size of one patch in inches.
    show
        Call ``plt.show()``; by default only in interactive sessions.

    Returns
    -------
    The matplotlib figure.

    Examples
    --------
    >>> import histoseq as hs
    >>> sdata = hs.datasets.synthetic(n_sections=1)
    >>> p = hs.pp.extract_patches(sdata, patch_size_um=56, patch_px=32, progress=False)
    >>> fig = hs.pl.patches(p, n=8)

    """
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(random_state)
    idx = np.arange(len(patches)) if len(patches) <= n else np.sort(rng.choice(len(patches), n, replace=False))
    nrows = int(np.ceil(len(idx) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * ax_size, nrows * ax_size + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, idx):
        img: Any = patches.images[i]
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
        ax.set_title(str(patches.obs_names[i]), fontsize=7)
        if patches.at_border[i]:
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor("red")
                spine.set_linewidth(2)
    params = patches.params
    fig.suptitle(title or f"{len(patches)} patches of {params.get('patch_size_um')} µm at {params.get('patch_px')} px")
    fig.tight_layout()
    if show or (show is None and plt.isinteractive()):
        plt.show()
    return fig

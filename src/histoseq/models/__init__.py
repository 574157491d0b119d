"""Torch modules (networks) used by :mod:`histoseq.tl`."""

__all__: list[str] = []

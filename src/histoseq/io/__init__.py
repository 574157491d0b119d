"""Readers: legacy Spatial Transcriptomics sections, lazily read H&E images, pixel sizes."""

from ._concat import concatenate
from ._image import read_image_lazy
from ._legacy_st import read_legacy_st
from ._pixel_size import set_pixel_size

__all__ = ["concatenate", "read_image_lazy", "read_legacy_st", "set_pixel_size"]

"""embedcache: run SAM's frozen image encoder once per image and cache the embeddings in Zarr v3."""

from embedcache.models import MODEL_TYPES, build_sam

__all__ = ["MODEL_TYPES", "build_sam"]

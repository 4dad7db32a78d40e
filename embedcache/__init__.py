"""embedcache: run SAM's frozen image encoder once per image and cache the embeddings in Zarr v3."""

from embedcache.cache import Cache, CacheError, open_cache
from embedcache.models import MODEL_TYPES, build_sam

__all__ = ["MODEL_TYPES", "Cache", "CacheError", "build_sam", "open_cache"]

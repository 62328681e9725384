"""The HDF5 feature cache: its format as data, a crash-safe resumable writer, and the readers.

The format is specified in ``docs/cache-format.md`` and, as data, in
:mod:`featurecache.cache.format`: per patch ``features`` (N×D), ``label``, ``image_index``,
``box`` and ``scale``; per image the ``images/`` table; the images that could not be read in
``skipped/``; and, as JSON file attributes, the :class:`Provenance` of the features,
including a *feature fingerprint* that later stages compare before using a head on a cache.

Modules: :mod:`~featurecache.cache.format` (the tables, :class:`Provenance`, fingerprints),
:mod:`~featurecache.cache.files` (crash-safe files, the writer's lock),
:mod:`~featurecache.cache.writer` and :mod:`~featurecache.cache.assemble` (parts, the final
file), :mod:`~featurecache.cache.reader` (:class:`FeatureCache`), :mod:`~featurecache.cache.memory`
(:class:`MemoryCache`), :mod:`~featurecache.cache.base` (:class:`CacheLike`). Nothing here
imports torch.
"""

from featurecache.cache.base import CacheLike
from featurecache.cache.files import KEPT_ALL, KEPT_PARTS, data_folders
from featurecache.cache.format import (
                                           FORMAT_NAME,
                                           FORMAT_VERSION,
                                           DatasetSource,
                                           Provenance,
                                           describe_fingerprint_difference,
                                           feature_fingerprint,
                                           now_iso,
                                           record_problem,
)
from featurecache.cache.memory import MemoryCache
from featurecache.cache.reader import AnyCache, FeatureCache, open_cache
from featurecache.cache.table import ImageTable, PatchChunk, read_rows
from featurecache.cache.writer import CacheWriter, PartData
from featurecache.errors import CacheError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "KEPT_ALL", "KEPT_PARTS", "AnyCache", "CacheError", "CacheLike",
           "CacheWriter", "DatasetSource", "FeatureCache", "ImageTable", "MemoryCache", "PartData", "PatchChunk",
           "Provenance", "data_folders", "describe_fingerprint_difference", "feature_fingerprint", "now_iso",
           "open_cache", "read_rows", "record_problem"]

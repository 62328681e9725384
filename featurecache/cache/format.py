"""The cache's format as data: the datasets of a cache file and of its parts, the provenance record, fingerprints."""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Mapping, Optional

import h5py
import numpy as np

from featurecache.patches import LabelRule, PatchGrid

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "IMAGE_ARRAYS", "PART_ARRAYS", "PATCH_ARRAYS", "SKIPPED_ARRAYS", "Array",
           "DatasetSource", "Provenance", "describe_fingerprint_difference", "feature_fingerprint", "now_iso",
           "record_problem"]

FORMAT_NAME = "featurecache"
FORMAT_VERSION = 1
PART_PATTERN = re.compile(r"^part-(\d{6})\.h5$")
STR = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class Array:
    """One dataset of the format: its name in the file, its rank, its type (None: the features, stored as
    the run's dtype; ``"str"``: UTF-8 text)."""

    name: str
    ndim: int
    dtype: Optional[str]

    def h5_dtype(self, features: Optional[np.dtype] = None):
        return features if self.dtype is None else STR if self.dtype == "str" else np.dtype(self.dtype)


#: Per patch, in the file's root.
PATCH_ARRAYS = (Array("features", 2, None), Array("label", 1, "int16"), Array("image_index", 1, "int32"),
                Array("box", 2, "float32"), Array("scale", 1, "float32"))
#: Per extracted image, in ``images/``.
IMAGE_ARRAYS = (Array("path", 1, "str"), Array("width", 1, "int32"), Array("height", 1, "int32"),
                Array("labels", 2, "bool"), Array("difficult", 2, "bool"), Array("split", 1, "str"),
                Array("dataset_index", 1, "int32"), Array("patch_start", 1, "int64"), Array("patch_count", 1, "int64"))
#: Per skipped image, in ``skipped/``.
SKIPPED_ARRAYS = (Array("path", 1, "str"), Array("reason", 1, "str"))
#: In a part file (``OUT.parts/part-NNNNNN.h5``): its patches (``image``: the data set index of each
#: patch's image) and the images skipped among its images.
PART_ARRAYS = (Array("features", 2, None), Array("label", 1, None), Array("image", 1, None), Array("box", 2, None),
               Array("scale", 1, None), Array("skipped_index", 1, None), Array("skipped_reason", 1, "str"))


def canonical_json(obj) -> str:
    """Compact JSON with sorted keys: what attributes and fingerprints are made of."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def feature_fingerprint(feature_settings: dict) -> str:
    """SHA-256 of the settings that determine the features (canonical JSON)."""
    return hashlib.sha256(canonical_json(feature_settings).encode()).hexdigest()


def describe_fingerprint_difference(ours: dict, theirs: dict, *, ours_name: str = "cache",
                                    theirs_name: str = "head") -> str:
    """Name the feature settings that differ, e.g. ``backbone: alexnet (cache) vs vgg16 (head)``."""
    diffs = []
    for key in sorted(set(ours) | set(theirs)):
        a, b = ours.get(key), theirs.get(key)
        if a != b:
            diffs.append(f"{key}: {short(a)} ({ours_name}) vs {short(b)} ({theirs_name})")
    return "; ".join(diffs) or "no difference"


def short(v) -> str:
    """A value in at most 60 characters, for messages."""
    s = v if isinstance(v, str) else canonical_json(v)
    return s if len(s) <= 60 else s[:57] + "..."


def chunk_rows(dim: int, itemsize: int, n: int) -> int:
    """Rows per chunk so that a chunk of features is about 1 MiB."""
    return max(1, min(max(n, 1), (1 << 20) // max(dim * itemsize, 1)))


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def record_problem(record: Mapping) -> str:
    """What is wrong in an extraction record ('' when nothing): a cache's attributes, or the copy of
    them a head file keeps. Each part that later stages read must be there as the type they read."""
    for key in ("backbone", "grid", "label_rule", "dataset", "extraction", "feature_settings"):
        if record.get(key) is not None and not isinstance(record[key], dict):
            return f"the {key} attribute is not a JSON object"
    if isinstance(record.get("backbone"), dict) and not isinstance(record["backbone"].get("name", ""), str):
        return "the backbone attribute has no name"
    for key, make in (("grid", PatchGrid.from_dict), ("label_rule", LabelRule.from_dict)):
        if record.get(key) is not None:
            try:
                make(record[key])
            except Exception as e:  # a forged record: unknown fields, wrong types, values out of range
                return f"the {key} attribute does not describe a {key.replace('_', ' ')} ({type(e).__name__})"
    mode = (record.get("feature_settings") or {}).get("mode", "crop")
    if mode not in ("crop", "dense"):
        return f"the feature settings' mode is {mode!r} (crop or dense)"
    return ""


@dataclass(frozen=True)
class DatasetSource:
    """Where a cache's images came from: the ``dataset`` attribute."""

    root: Optional[str] = None
    layout: Optional[str] = None
    split: Optional[str] = None
    annotations: Optional[str] = None
    num_images: Optional[int] = None
    sha256: Optional[str] = None

    @classmethod
    def from_dict(cls, d: Optional[Mapping]) -> "DatasetSource":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in known})


@dataclass(frozen=True)
class Provenance:
    """Everything a cache records about how its features were made (its JSON file attributes), typed.

    Read with :meth:`from_attrs` (refusing, one line, what later stages could not read) by every
    consumer; written with :meth:`to_attrs`. ``grid`` and ``label_rule`` are absent only from
    caches made by hand; ``extraction`` (mode, runtime, storage) and ``versions`` are records
    kept as they are.
    """

    classes: tuple
    feature_settings: dict
    fingerprint: str
    backbone: dict
    grid: Optional[PatchGrid] = None
    label_rule: Optional[LabelRule] = None
    dataset: DatasetSource = field(default_factory=DatasetSource)
    extraction: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    created: Optional[str] = None

    @classmethod
    def from_attrs(cls, attrs: Mapping) -> "Provenance":
        """The provenance of parsed file attributes; ``ValueError`` naming what is damaged."""
        classes = attrs.get("classes")
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ValueError("the classes attribute is not a list of names")
        if len(set(classes)) != len(classes):
            raise ValueError("the classes attribute names a class twice")
        if not isinstance(attrs.get("feature_settings"), dict):
            raise ValueError("the feature_settings attribute is not a JSON object")
        if not isinstance(attrs.get("fingerprint"), str):
            raise ValueError("no fingerprint attribute")
        if not isinstance(attrs.get("backbone"), dict) or not isinstance(attrs["backbone"].get("name"), str):
            raise ValueError("the backbone attribute names no backbone")
        problem = record_problem(attrs)
        if problem:
            raise ValueError(problem)
        grid, rule = attrs.get("grid"), attrs.get("label_rule")
        return cls(tuple(classes), attrs["feature_settings"], attrs["fingerprint"], attrs["backbone"],
                   PatchGrid.from_dict(grid) if grid is not None else None,
                   LabelRule.from_dict(rule) if rule is not None else None,
                   DatasetSource.from_dict(attrs.get("dataset")),
                   attrs.get("extraction") or {}, attrs.get("versions") or {}, attrs.get("created"))

    def to_attrs(self) -> dict:
        """The file attributes (JSON-ready values) this record is written as."""
        out = {"classes": list(self.classes), "backbone": self.backbone, "dataset": asdict(self.dataset),
               "extraction": self.extraction, "feature_settings": self.feature_settings,
               "fingerprint": self.fingerprint, "versions": self.versions, "created": self.created}
        if self.grid is not None:
            out["grid"] = self.grid.to_dict()
        if self.label_rule is not None:
            out["label_rule"] = self.label_rule.to_dict()
        return out

    @property
    def mode(self) -> str:
        """``crop`` or ``dense``: how the features were made."""
        return self.feature_settings.get("mode", "crop")


def parse_attr(v):
    """A file attribute's value: JSON decoded when it is JSON text (a forged one nested thousands deep is
    left as text, which the checks name)."""
    if isinstance(v, bytes):
        v = v.decode(errors="replace")
    if isinstance(v, str):
        try:
            return json.loads(v)
        except (ValueError, RecursionError):
            return v
    if isinstance(v, np.generic):
        return v.item()
    return v

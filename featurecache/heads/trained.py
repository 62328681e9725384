"""A trained head and its file: the one route from a head to patch scores and image scores on a cache."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch

from featurecache.cache import describe_fingerprint_difference, record_problem
from featurecache.errors import HeadError
from featurecache.heads.pooling import ScorePooler
from featurecache.heads.registry import EVAL_OPTIONS, Objective, get_objective, make_head, objective_of_kind
from featurecache.outputs import check_output, os_reason

__all__ = ["HEAD_FORMAT", "HEAD_FORMAT_VERSION", "TrainedHead"]

HEAD_FORMAT = "featurecache-head"
#: Version 1 files written before heads recorded their objective read as before: the
#: objective comes from the summary, else from the head kind.
HEAD_FORMAT_VERSION = 1

#: The training cache's attributes a head keeps to extract new images the same way (the
#: cache's ``extraction`` attribute holds the stored dtype and batching).


#: Estimator parameters read back as tuples (JSON stores lists).
_TUPLE_PARAMS = ("hidden", "pooling", "members")


#: JSON fields of a head file and the type each must have (``extraction`` is absent from old files).
_JSON_FIELDS = {"params": dict, "classes": list, "feature_settings": dict, "summary": dict, "extraction": (dict,
                                                                                                        type(None))}


def _read_fields(p: dict) -> dict:
    """A head file's JSON fields, parsed and type-checked (KeyError/TypeError/ValueError name the bad one)."""
    out = {}
    for key, kind in _JSON_FIELDS.items():
        try:
            value = json.loads(p.get(key, "null") if key == "extraction" else p[key])
        except json.JSONDecodeError:
            raise ValueError(f"{key} is not valid JSON") from None
        except RecursionError:  # a forged field nested thousands deep
            raise ValueError(f"{key} is nested too deep") from None
        if not isinstance(value, kind):
            raise TypeError(f"{key} is a {type(value).__name__}")
        out[key] = value
    if not all(isinstance(c, str) for c in out["classes"]) or not out["classes"]:
        raise TypeError("classes are not a list of names")
    problem = record_problem({**(out["extraction"] or {}), "feature_settings": out["feature_settings"]})
    if problem:
        raise ValueError(problem.replace(" attribute", "").replace("the ", "the extraction record's ", 1))
    for key in ("kind", "fingerprint", "state", "n_features", "n_outputs"):
        if key not in p:
            raise KeyError(key)
    if not isinstance(p["kind"], str) or not isinstance(p["fingerprint"], str):
        raise TypeError("kind or fingerprint is not text")
    return out


def _what(error: Exception) -> str:
    return f"no {error.args[0]} field" if isinstance(error, KeyError) else str(error)


def _non_finite(state, where: str = "state", depth: int = 0) -> Optional[str]:
    """The first tensor or array of a head's state (members' states included) with a NaN, or an
    infinity anywhere but in an intercept (where +-inf is how a linear head scores a class it saw
    with one label only: exactly 1 or 0), by name; None when there is none."""
    if depth > 32:
        return f"{where} (nested too deep)"
    allowed = torch.isnan if where.endswith("intercept") else (lambda t: ~torch.isfinite(t))
    if isinstance(state, np.ndarray) and state.dtype.kind == "f":
        state = torch.from_numpy(state)
    if isinstance(state, torch.Tensor):
        return None if not state.is_floating_point() or not bool(allowed(state).any()) else where
    if isinstance(state, np.ndarray):
        return None
    if isinstance(state, float):
        return None if np.isfinite(state) else where
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    for key, value in items:
        found = _non_finite(value, f"{where}.{key}", depth + 1)
        if found:
            return found
    return None


def _plain(value):
    """JSON for numpy scalars and arrays in parameters and summaries."""
    return value.tolist() if isinstance(value, (np.generic, np.ndarray)) else str(value)


@dataclass
class TrainedHead:
    """A fitted head with what it needs to be used safely on caches.

    Attributes
    ----------
    estimator : object
        The fitted estimator (:data:`featurecache.heads.registry.HEAD_KINDS`).
    kind : str
        Its head kind (``mlp``, ``logreg``, ``linearsvm``, ``image-logreg``, ``image-mlp``,
        ``mil``).
    classes : tuple of str
    feature_settings : dict
        The cache's, at training time; compared with a cache's before use.
    fingerprint : str
    summary : dict
        Training facts (patches per class, background weight, epochs, seconds, loss ...).
    objective : str, optional
        What it learnt from (:data:`featurecache.heads.registry.OBJECTIVES`); default: the
        summary's ``objective``, else the one the kind implies.
    extraction : dict, optional
        How the training cache was extracted beyond the features themselves (``grid``,
        ``label_rule``, ``backbone``): what it takes to extract new images the same way.
        None for heads written before heads recorded it.
    """

    @classmethod
    def from_cache(cls, estimator, kind: str, cache, summary: dict, objective: str) -> "TrainedHead":
        """A head trained on ``cache``: its classes, feature settings and extraction recorded."""
        p = cache.provenance
        record = {"grid": p.grid.to_dict() if p.grid else None, "label_rule": p.label_rule.to_dict() if p.label_rule
                  else None, "backbone": p.backbone, "extraction": p.extraction or None}
        extraction = {k: v for k, v in record.items() if v is not None}
        return cls(estimator, kind, tuple(cache.classes), dict(cache.feature_settings), cache.fingerprint, summary,
                   objective, extraction)

    estimator: object
    kind: str
    classes: tuple
    feature_settings: dict
    fingerprint: str
    summary: dict = field(default_factory=dict)
    objective: Optional[str] = None
    extraction: Optional[dict] = None

    def __post_init__(self) -> None:
        if self.objective is None:
            self.objective = self.summary.get("objective") or objective_of_kind(self.kind)
        get_objective(self.objective)

    @property
    def spec(self) -> Objective:
        """The registry's description of its objective."""
        return get_objective(self.objective)

    # -- use on caches
    def check_cache(self, cache) -> None:
        """Refuse a cache whose features differ from the training cache's, or whose classes do."""
        if cache.fingerprint != self.fingerprint:
            raise HeadError(f"{cache.path}: features differ from the ones this head was trained on ("
                            + describe_fingerprint_difference(cache.feature_settings, self.feature_settings)
                            + ")")
        if tuple(cache.classes) != tuple(self.classes):
            ours, theirs = ", ".join(cache.classes[:5]), ", ".join(self.classes[:5])
            raise HeadError(f"{cache.path}: classes differ from the head's ({len(cache.classes)} vs "
                            f"{len(self.classes)}: {ours}... vs {theirs}...)")

    def predict_proba(self, X) -> np.ndarray:
        """Patch heads: class probabilities ``(N, 1 + C)`` of patch features (background first)."""
        self._need_patch_probabilities()
        return self.estimator.predict_proba(X)

    def patch_probabilities(self, cache, *, chunk_size: int = 65536) -> np.ndarray:
        """Patch heads: :meth:`predict_proba` of a cache's selected patches, read chunk by chunk.

        Memory grows with the patches (``N × (1 + C)`` floats); :meth:`image_scores` and
        ``evaluate`` aggregate :meth:`probability_chunks` instead and keep none of them.
        """
        with contextlib.closing(self.probability_chunks(cache, chunk_size=chunk_size)) as chunks:
            out = [p for p, _, _ in chunks]
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, len(self.classes) + 1), np.float32)

    def probability_chunks(self, cache, *, chunk_size: int = 65536) -> Iterator[tuple]:
        """Patch heads: ``(probabilities (n, 1 + C), image position of each patch, patch labels)`` per chunk
        of a cache's selected patches, in file order (the next chunk read while this one is scored)."""
        self._need_patch_probabilities()  # checked now, not at the first chunk
        self.check_cache(cache)
        rows = cache.images.row

        def chunks():
            with contextlib.closing(cache.iter_chunks(chunk_size, dtype=None)) as reader:
                for ch in reader:
                    yield (np.asarray(self.estimator.predict_proba(ch.features), np.float32),
                           np.searchsorted(rows, ch.image_index), ch.labels)

        return chunks()

    def image_scores(self, cache, *, pooling: Optional[str] = None, k: Optional[float] = None) -> np.ndarray:
        """Per-class scores ``(M, C)`` of a cache's selected images.

        Patch heads pool their patch probabilities (``pooling``, default ``power`` with
        ``k = 5``); the image-level heads score images themselves and refuse ``pooling``
        and ``k``.
        """
        self.check_cache(cache)
        k = None if k is None else EVAL_OPTIONS["k"].read(k)
        if self.spec.pools_patches:
            pooler = ScorePooler(cache.num_images, len(self.classes), pooling=pooling or "power",
                                 k=5.0 if k is None else k)
            with contextlib.closing(self.probability_chunks(cache)) as chunks:
                for probs, local, _ in chunks:
                    pooler.add(probs, local)
            return pooler.result()
        if pooling is not None or k is not None:
            raise HeadError(f"applies to patch heads; this {self.objective} head scores images itself",
                            param="pooling" if pooling is not None else "k")
        return self.estimator.score_images(cache)

    def patch_scores(self, X) -> np.ndarray:
        """Per-class scores ``(N, C)`` of single patches (localisation), for heads that have them."""
        if not self.spec.patch_scores:
            raise HeadError(f"an {self.objective}-objective head scores pooled image features, not patches; "
                            "localisation needs a patch, mil or hybrid head")
        return self.estimator.patch_scores(X)

    def region_scores(self, X) -> np.ndarray:
        """Per-class scores ``(N, C)`` of image regions each described by one feature vector
        ``(N, D)`` (class activation maps): patch scores for patch, mil and hybrid heads; for
        image and fusion heads, the score of an image whose patches all have that feature."""
        if self.spec.patch_scores:
            return self.estimator.patch_scores(X)
        return self.estimator.region_scores(X)

    def scoring(self, *, pooling: Optional[str] = None, k: Optional[float] = None) -> tuple:
        """``(label, text)`` of how images are scored: ``("power", "power k=5")``, ``("mil:max", "trained max")``."""
        k = None if k is None else EVAL_OPTIONS["k"].read(k)
        if self.spec.pools_patches:
            pooling = pooling or "power"
            k = 5.0 if k is None else k
            return pooling, (f"power k={k:g}" if pooling == "power" else pooling)
        return self.estimator.scoring_label(), self.estimator.scoring_text()

    def _need_patch_probabilities(self) -> None:
        if not self.spec.pools_patches:
            raise HeadError(f"a {self.objective} head has no patch class probabilities; use image_scores")

    def summary_line(self) -> str:
        """One line on what training did, for the end of ``featurecache fit``."""
        line = self.spec.describe({"objective": self.objective, **self.summary}, self.kind)
        return (self.selection_line() + ": " if "selection" in self.summary else "") + line

    def selection_line(self) -> str:
        """Which candidate ``auto`` chose and why ('' for a head trained with a given objective)."""
        sel = self.summary.get("selection")
        if not sel:
            return ""
        rows = sorted(sel["table"], key=lambda r: -np.nan_to_num(r["map_mean"], nan=-1.0))
        runner_up = next((r for r in rows if r["candidate"] != sel["chosen"]), None)
        chosen = next(r for r in rows if r["candidate"] == sel["chosen"])
        versus = (f"; next {runner_up['candidate']} {100 * runner_up['map_mean']:.1f}" if runner_up else "")
        return (f"auto chose {sel['chosen']} ({sel['reason']}: mAP {100 * chosen['map_mean']:.1f} "
                f"± {100 * chosen['map_std']:.1f}{versus})")

    def selection_table(self) -> str:
        """``auto``'s cross-validation table, best first ('' for a head trained with a given objective)."""
        sel = self.summary.get("selection")
        if not sel:
            return ""
        rows = sorted(sel["table"], key=lambda r: -np.nan_to_num(r["map_mean"], nan=-1.0))
        width = max(len(r["candidate"]) for r in rows) + 2
        lines = [f"{'candidate':<{width}}  {'CV mAP':>12}  {'train s':>7}"]
        for r in rows:
            mark = " <- chosen" if r["candidate"] == sel["chosen"] else ""
            lines.append(f"{r['candidate']:<{width}}  {100 * r['map_mean']:>5.1f} ± {100 * r['map_std']:<4.1f}  "
                         f"{r['seconds']:>7.1f}{mark}")
        return "\n".join(lines)

    # -- the file
    def to_payload(self) -> dict:
        """The head as plain tensors, numbers and JSON strings (what :meth:`save` writes)."""
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.estimator.get_params().items()}
        return {
            "format": HEAD_FORMAT,
            "format_version": HEAD_FORMAT_VERSION,
            "kind": self.kind,
            "objective": self.objective,
            "params": json.dumps(params, default=_plain),
            "classes": json.dumps(list(self.classes)),
            "feature_settings": json.dumps(self.feature_settings, sort_keys=True),
            "fingerprint": self.fingerprint,
            "summary": json.dumps(self.summary, default=_plain),
            "extraction": json.dumps(self.extraction, default=_plain),
            "n_features": int(self.estimator.n_features_in_),
            "n_outputs": int(self.estimator.n_outputs_),
            "state": self.estimator._state(),
        }

    @classmethod
    def from_payload(cls, p: dict, *, device: str = "auto", source: str = "head") -> "TrainedHead":
        """The head of a :meth:`to_payload` dictionary (``source`` names it in errors)."""
        if not isinstance(p, dict) or p.get("format") != HEAD_FORMAT:
            raise HeadError(f"{source}: not a featurecache head file")
        try:
            if int(p["format_version"]) > HEAD_FORMAT_VERSION:
                raise HeadError(f"{source}: head format {p['format_version']} is newer than this featurecache reads")
            fields = _read_fields(p)
        except HeadError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise HeadError(f"{source}: damaged featurecache head: {_what(e)}") from None
        bad = _non_finite(p["state"])
        if bad:
            raise HeadError(f"{source}: damaged featurecache head: {bad} holds a NaN or an infinity (a training that "
                            "diverged, or a forged file); train it again")
        params = fields["params"]
        for key in _TUPLE_PARAMS:
            if isinstance(params.get(key), list):
                params[key] = tuple(params[key])
        if "device" in params:
            params["device"] = device
        try:
            est = make_head(p["kind"], **params)
            est._restore(p["state"], int(p["n_features"]), int(p["n_outputs"]), device=device)
            head = cls(est, p["kind"], tuple(fields["classes"]), fields["feature_settings"], p["fingerprint"],
                       fields["summary"], p.get("objective"), fields["extraction"])
        except HeadError as e:
            raise HeadError(f"{source}: damaged featurecache head: {e}") from None
        except Exception as e:  # a state that does not fit its estimator: torch and numpy raise many kinds
            raise HeadError(f"{source}: damaged featurecache head: its {p['kind']} state does not load "
                            f"({type(e).__name__})") from None
        return head

    def save(self, path: Union[str, Path]) -> Path:
        """Write one torch file of tensors and JSON strings (loadable with ``weights_only=True``); a head
        whose weights are not all finite is refused, nothing written."""
        path = Path(path)
        check_output(path, param="path")
        payload = self.to_payload()
        bad = _non_finite(payload["state"])
        if bad:
            raise HeadError(f"{path}: not written: the head's {bad} holds a NaN or an infinity (its training "
                            "diverged); train it again with a lower learning rate")
        tmp = path.with_name(path.name + ".tmp")
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # never written through a link planted there
            torch.save(payload, tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise HeadError(f"{path}: cannot write the head file ({os_reason(e)})") from None
        return path

    @classmethod
    def load(cls, path: Union[str, Path], *, device: str = "auto") -> "TrainedHead":
        """Read a head file; never executes code from it."""
        path = Path(path)
        if not path.is_file():
            raise HeadError(f"{path}: no such head file")
        try:
            p = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise HeadError(f"{path}: not a readable head file ({type(e).__name__})") from None
        return cls.from_payload(p, device=device, source=str(path))

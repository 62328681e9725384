"""The head file format: a trained head as tensors and checked JSON fields, written and read safely."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from featurecache.cache import record_problem
from featurecache.errors import HeadError
from featurecache.heads.recipe import Recipe
from featurecache.heads.registry import make_head
from featurecache.outputs import check_output, os_reason

__all__ = ["HEAD_FORMAT", "HEAD_FORMAT_VERSION", "read_head_file", "read_payload", "to_payload", "write_head_file"]

HEAD_FORMAT = "featurecache-head"
#: Version 1 files written before heads recorded their objective read as before: the
#: objective comes from the summary, else from the head kind.
HEAD_FORMAT_VERSION = 1

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


def to_payload(head) -> dict:
    """A :class:`~featurecache.heads.trained.TrainedHead` as plain tensors, numbers and JSON strings."""
    est = head.estimator
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in est.get_params().items()}
    return {
        "format": HEAD_FORMAT,
        "format_version": HEAD_FORMAT_VERSION,
        "kind": head.kind,
        "objective": head.objective,
        "params": json.dumps(params, default=_plain),
        "classes": json.dumps(list(head.classes)),
        "feature_settings": json.dumps(head.feature_settings, sort_keys=True),
        "fingerprint": head.fingerprint,
        "summary": json.dumps(head.summary, default=_plain),
        "extraction": json.dumps(head.recipe.to_record() if head.recipe else None, default=_plain),
        "n_features": int(est.n_features_in_),
        "n_outputs": int(est.n_outputs_),
        "state": est._state(),
    }


def _checked(p: dict, source: str) -> dict:
    """The parsed JSON fields of a payload; HeadError naming what is damaged."""
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
    return fields


def read_payload(p: dict, *, device: str = "auto", source: str = "head") -> dict:
    """The keyword arguments of a ``TrainedHead`` from a :func:`to_payload` dictionary (``source`` names it
    in errors): the estimator restored, the JSON fields checked, the recipe read."""
    fields = _checked(p, source)
    params = fields["params"]
    for key in _TUPLE_PARAMS:
        if isinstance(params.get(key), list):
            params[key] = tuple(params[key])
    if "device" in params:
        params["device"] = device
    try:
        est = make_head(p["kind"], **params)
        est._restore(p["state"], int(p["n_features"]), int(p["n_outputs"]), device=device)
    except HeadError as e:
        raise HeadError(f"{source}: damaged featurecache head: {e}") from None
    except Exception as e:  # a state that does not fit its estimator: torch and numpy raise many kinds
        raise HeadError(f"{source}: damaged featurecache head: its {p['kind']} state does not load "
                        f"({type(e).__name__})") from None
    fs = fields["feature_settings"]
    return {"estimator": est, "kind": p["kind"], "classes": tuple(fields["classes"]), "feature_settings": fs,
            "fingerprint": p["fingerprint"], "summary": fields["summary"], "objective": p.get("objective"),
            "recipe": Recipe.from_record(fields["extraction"], fs, p["fingerprint"])}


def write_head_file(payload: dict, path: Union[str, Path]) -> Path:
    """Write one torch file of tensors and JSON strings (loadable with ``weights_only=True``); a payload
    whose weights are not all finite is refused, nothing written."""
    path = Path(path)
    check_output(path, param="path")
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


def read_head_file(path: Union[str, Path]) -> dict:
    """The payload of a head file; never executes code from it."""
    path = Path(path)
    if not path.is_file():
        raise HeadError(f"{path}: no such head file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise HeadError(f"{path}: not a readable head file ({type(e).__name__})") from None

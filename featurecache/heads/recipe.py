"""A head's recipe: how its features are made again for new images (grid, label rule, backbone, extraction)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from featurecache.backbones import FrozenBackbone, build_backbone, weights_argument
from featurecache.cache import Provenance, describe_fingerprint_difference, feature_fingerprint
from featurecache.errors import BackboneError, HeadError
from featurecache.extract import ExtractConfig, feature_settings
from featurecache.patches import LabelRule, PatchGrid
from featurecache.resources import DEFAULT_MAX_SIDE

__all__ = ["OLD_HEAD", "Recipe"]

#: The one "old head file" rule: heads written before featurecache 0.2 record no recipe.
OLD_HEAD = ("this head file does not record how its features were extracted (written before featurecache 0.2); "
            "train it again with fit")


@dataclass(frozen=True)
class Recipe:
    """What it takes to extract new images exactly as a head's training cache was extracted.

    Attributes
    ----------
    grid : PatchGrid
    backbone : dict
        The training cache's backbone record (name, weights source, SHA-256, ...).
    feature_settings : dict
        What determines the features; ``fingerprint`` is its SHA-256.
    fingerprint : str
    label_rule : LabelRule, optional
    run : dict
        The training cache's ``extraction`` record (stored dtype, part size, dense ``max_side``,
        runtime): settings that fix how batches are formed, hence the exact features.
    """

    grid: PatchGrid
    backbone: dict
    feature_settings: dict
    fingerprint: str
    label_rule: Optional[LabelRule] = None
    run: dict = field(default_factory=dict)

    @classmethod
    def from_provenance(cls, p: Provenance) -> Optional["Recipe"]:
        """The recipe of a cache; None for caches made by hand without a grid."""
        if p.grid is None:
            return None
        return cls(p.grid, p.backbone, dict(p.feature_settings), p.fingerprint, p.label_rule, dict(p.extraction))

    @classmethod
    def from_record(cls, record: Optional[dict], feature_settings: dict, fingerprint: str) -> Optional["Recipe"]:
        """The recipe of a head file's ``extraction`` record; None when it records none (before 0.2)."""
        if not record or "grid" not in record or "backbone" not in record:
            return None
        rule = record.get("label_rule")
        return cls(PatchGrid.from_dict(record["grid"]), record["backbone"], feature_settings, fingerprint,
                   LabelRule.from_dict(rule) if rule else None, record.get("extraction") or {})

    def to_record(self) -> dict:
        """The head file's ``extraction`` record (absent keys left out, as written since 0.2)."""
        record = {"grid": self.grid.to_dict(), "label_rule": self.label_rule.to_dict() if self.label_rule else None,
                  "backbone": self.backbone, "extraction": self.run or None}
        return {k: v for k, v in record.items() if v is not None}

    @property
    def mode(self) -> str:
        """``crop`` or ``dense``."""
        return self.feature_settings["mode"]

    def build_backbone(self, *, weights: Optional[Union[str, Path]] = None, download: bool = False) -> FrozenBackbone:
        """The backbone that made the features, rebuilt; refused when it would make other features.

        Parameters
        ----------
        weights : str or path, optional
            The weights file, when not where the training found it.
        download : bool
            Let default weights missing from the local cache be downloaded.

        Raises
        ------
        BackboneError
            The weights are not found, or the backbone found would make other features than the
            head was trained on (``param="weights"``).
        """
        try:
            net = build_backbone(self.backbone["name"], layer=self.feature_settings.get("layer"),
                                 weights=str(weights) if weights else weights_argument(self.backbone),
                                 download=download)
        except BackboneError as e:
            raise BackboneError(e.message, param="weights") from None
        ours = feature_settings(net, self.grid, self.mode)
        if feature_fingerprint(ours) != self.fingerprint:
            raise BackboneError(f"the backbone found ({net.spec.weights}) would not make the features this head was "
                                "trained on (" + describe_fingerprint_difference(ours, self.feature_settings,
                                                                                 ours_name="found") + ")",
                                param="weights")
        return net

    def extract_config(self, backbone: FrozenBackbone, **run) -> ExtractConfig:
        """The :class:`ExtractConfig` for new images: this recipe's settings, ``run``'s for the rest.

        ``run`` takes the fields that do not change the features (``batch_size``, ``workers``,
        ``device``, ``strict``, ``overwrite``, ``runtime``, ``threads``, ``progress``).
        """
        fixed = sorted({"grid", "rule", "mode", "dtype", "part_patches", "max_side", "backbone"} & set(run))
        if fixed:
            raise HeadError("fixed by the head's recipe", param=fixed[0])
        return ExtractConfig(backbone=backbone, grid=self.grid, rule=self.label_rule, mode=self.mode,
                             dtype=self.run.get("dtype", "float16"),
                             part_patches=int(self.run.get("part_patches", 2048)),
                             max_side=self.run.get("max_side") or DEFAULT_MAX_SIDE, **run)


def require(recipe: Optional[Recipe]) -> Recipe:
    """The recipe, or the one-line error of a head written before heads recorded it."""
    if recipe is None:
        raise HeadError(OLD_HEAD)
    return recipe

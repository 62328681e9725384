"""Tests of a head's recipe: how new images are extracted as its training cache was."""

import pytest

from featurecache.errors import HeadError
from featurecache.extract import ExtractConfig
from featurecache.heads.recipe import Recipe
from featurecache.patches import LabelRule, PatchGrid

GRID = PatchGrid(scales=(1.0, 2.0), input_size=32)
SETTINGS = {"backbone": "efficientnet_lite0", "mode": "dense", "input_size": 32}


def _recipe(**run) -> Recipe:
    return Recipe(GRID, {"name": "efficientnet_lite0", "weights": "default"}, SETTINGS, "f" * 64,
                  LabelRule(min_patch_fraction=0.3), run)


@pytest.mark.parametrize("record", [None, {}, {"backbone": {"name": "x"}}, {"grid": GRID.to_dict()}])
def test_a_record_without_grid_or_backbone_is_no_recipe(record):
    assert Recipe.from_record(record, SETTINGS, "f" * 64) is None


def test_the_record_round_trips_and_leaves_absent_parts_out():
    recipe = _recipe(dtype="float32", part_patches=512, max_side=640)
    record = recipe.to_record()
    assert set(record) == {"grid", "label_rule", "backbone", "extraction"}
    assert Recipe.from_record(record, SETTINGS, "f" * 64) == recipe
    bare = Recipe(GRID, {"name": "efficientnet_lite0"}, SETTINGS, "f" * 64)
    assert set(bare.to_record()) == {"grid", "backbone"}


def test_the_extract_config_keeps_what_fixes_the_features_and_takes_the_rest():
    config = _recipe(dtype="float32", part_patches=512, max_side=640).extract_config(
        "efficientnet_lite0", batch_size=7, workers=0, device="cpu")
    assert isinstance(config, ExtractConfig)
    assert (config.grid, config.mode, config.dtype, config.part_patches, config.max_side) == (
        GRID, "dense", "float32", 512, 640)
    assert config.rule == LabelRule(min_patch_fraction=0.3) and (config.batch_size, config.workers) == (7, 0)
    # What the caches of 0.2 did not record takes the values they were made with.
    old = Recipe(GRID, {"name": "efficientnet_lite0"}, SETTINGS, "f" * 64).extract_config("efficientnet_lite0")
    assert (old.dtype, old.part_patches, old.max_side) == ("float16", 2048, 2048)


@pytest.mark.parametrize("field", ["grid", "dtype", "max_side", "part_patches", "mode"])
def test_the_extract_config_refuses_to_change_what_fixes_the_features(field):
    with pytest.raises(HeadError, match="fixed by the head's recipe") as e:
        _recipe().extract_config("efficientnet_lite0", **{field: None})
    assert e.value.param == field

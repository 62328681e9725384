"""Tests of the head file and the one route from a trained head to scores."""

import numpy as np
import pytest
import torch

from featurecache.cache import FeatureCache
from featurecache.errors import HeadError
from featurecache.evaluate import evaluate
from featurecache.heads import TrainedHead
from featurecache.train import fit_head, fit_objective

from conftest import blob_cache


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory):
    splits = ["train" if i % 4 else "val" for i in range(40)]
    return blob_cache(tmp_path_factory.mktemp("t") / "b.h5", n_images=40, splits=splits)


def _as_written_by_0_1(path, drop_summary_objective: bool):
    """Rewrite a head file as featurecache 0.1 wrote it: no ``objective`` or ``extraction`` field (patch heads:
    no objective in the summary either)."""
    import json

    p = torch.load(path, weights_only=True)
    del p["objective"], p["extraction"]
    if drop_summary_objective:
        summary = json.loads(p["summary"])
        summary.pop("objective")
        p["summary"] = json.dumps(summary)
    torch.save(p, path)


@pytest.mark.parametrize("objective,settings", [("patch", dict(head="logreg")), ("mil", dict(image_epochs=5)),
                                                ("hybrid", dict(image_epochs=5)), ("image", {})])
def test_head_files_of_the_previous_release_load_with_their_objective(cache_file, tmp_path, objective, settings):
    head = fit_objective(cache_file, objective=objective, train_split="train", device="cpu", **settings)
    report = evaluate(head, cache_file, split="val")
    path = head.save(tmp_path / "h.pt")
    assert torch.load(path, weights_only=True)["objective"] == objective
    _as_written_by_0_1(path, drop_summary_objective=objective == "patch")
    old = TrainedHead.load(path, device="cpu")
    assert old.objective == objective and old.kind == head.kind and old.recipe is None
    again = evaluate(old, cache_file, split="val")
    assert again.ap == report.ap and again.objective == objective
    # The one rule for what such a head cannot do: extract new images (predict, cam maps).
    with pytest.raises(HeadError, match="written before featurecache 0.2"):
        old.new_images_recipe()


def test_scores_through_the_head(cache_file):
    patch = fit_head(cache_file, head="logreg", train_split="train")
    mil = fit_objective(cache_file, objective="mil", train_split="train", image_epochs=5, device="cpu")
    image = fit_objective(cache_file, objective="image", train_split="train")
    with FeatureCache(cache_file, split="val") as c:
        X = c.read_features()
        probs = patch.patch_probabilities(c)
        np.testing.assert_allclose(probs, patch.predict_proba(X))
        # The paper's image score, by hand: (1/M) sum p^5 over each image's patches.
        local = np.searchsorted(c.images.row, c.image_index)
        want = np.stack([(probs[local == i, 1:] ** 5).mean(0) for i in range(c.num_images)])
        np.testing.assert_allclose(patch.image_scores(c), want, rtol=1e-5)
        np.testing.assert_allclose(patch.image_scores(c, pooling="max"),
                                   np.stack([probs[local == i, 1:].max(0) for i in range(c.num_images)]))
        assert mil.image_scores(c).shape == image.image_scores(c).shape == (c.num_images, 3)
        assert mil.patch_scores(X).shape == (len(X), 3)
        with pytest.raises(HeadError, match="scores images itself") as e:
            mil.image_scores(c, pooling="max")
        assert e.value.param == "pooling"
        with pytest.raises(HeadError, match="not patches"):
            image.patch_scores(X)
        with pytest.raises(HeadError, match="no patch class probabilities"):
            mil.patch_probabilities(c)
    assert patch.scoring(k=2) == ("power", "power k=2")
    assert mil.scoring() == ("mil:power k=5", "trained power k=5")
    assert image.scoring() == ("image:mean", "image features mean")
    with pytest.raises(HeadError, match="unknown objective"):
        TrainedHead(patch.estimator, "logreg", patch.classes, patch.feature_settings, patch.fingerprint, {}, "boxes")


def test_a_head_records_how_its_cache_was_extracted(cache_file, tmp_path):
    head = fit_head(cache_file, head="logreg")
    with FeatureCache(cache_file) as c:
        assert head.recipe.to_record() == {"grid": c.attrs["grid"], "backbone": c.attrs["backbone"]}
    assert TrainedHead.load(head.save(tmp_path / "h.pt")).recipe == head.recipe


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_head_whose_weights_are_not_finite_is_refused_at_load_and_never_saved(cache_file, tmp_path, value):
    head = fit_objective(cache_file, objective="patch", head="mlp", hidden=0, epochs=1, device="cpu")
    path = head.save(tmp_path / "h.pt")
    payload = torch.load(path, weights_only=True)
    name = next(iter(payload["state"]))
    payload["state"][name].view(-1)[0] = value
    torch.save(payload, tmp_path / "forged.pt")
    with pytest.raises(HeadError, match=rf"forged.pt: damaged featurecache head: state.{name} holds a NaN or an "
                                        "infinity"):
        TrainedHead.load(tmp_path / "forged.pt")
    with torch.no_grad():
        next(head.estimator.net_.parameters()).view(-1)[0] = value
    with pytest.raises(HeadError, match="not written: the head's state.* holds a NaN or an infinity"):
        head.save(tmp_path / "nan.pt")
    assert not (tmp_path / "nan.pt").exists()


def test_features_that_are_not_finite_give_no_ap(cache_file, tmp_path):
    import h5py

    from featurecache.errors import EvalError

    head = fit_objective(cache_file, objective="image")
    bad = tmp_path / "nan.h5"
    bad.write_bytes(open(cache_file, "rb").read())
    with h5py.File(bad, "r+") as f:
        f["features"][:3] = np.nan
    with pytest.raises(EvalError, match=r"scores are NaN or infinite, so no AP is computed"):
        evaluate(head, bad)

"""Tests of the auto objective: candidates cross-validated on the training images, the best one kept."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import featurecache.heads.auto as auto
from featurecache.cache import FeatureCache
from featurecache.cli import main
from featurecache.errors import HeadError
from featurecache.evaluate import evaluate
from featurecache.heads import TrainedHead
from featurecache.heads.auto import clearly_behind
from featurecache.heads.registry import FitConfig
from featurecache.metrics import mean_ap
from featurecache.train import fit_objective

from conftest import blob_cache, make_synthetic_cache


def _one_patch_signal(path, n_img=60, per=50, dim=32, seed=0):
    """Positive images carry the class in one patch of fifty: max-pooled features find it, mean pooling dilutes it."""
    rng = np.random.default_rng(seed)
    X, img = [], []
    labels = np.zeros((n_img, 1), bool)
    for i in range(n_img):
        labels[i, 0] = i % 2 == 0
        f = rng.normal(size=(per, dim))
        if labels[i, 0]:
            f[rng.integers(per), :4] += 4.5
        X.append(f)
        img += [i] * per
    splits = ["train" if i < 45 else "val" for i in range(n_img)]
    return make_synthetic_cache(path, np.concatenate(X), [0] * len(img), img, labels, ["obj"], splits=splits)


def test_auto_lets_the_training_images_choose(tmp_path):
    cache = _one_patch_signal(tmp_path / "one.h5")
    head = fit_objective(cache, candidates="image:mean,image:max", train_split="train", progress=False)
    sel = head.summary["selection"]
    by = {r["candidate"]: r for r in sel["table"]}
    assert sel["chosen"] == "image:max" and head.objective == "image" and head.estimator.pooling == ("max",)
    assert by["image:max"]["map_mean"] > by["image:mean"]["map_mean"] + 0.1, by
    assert sel["images"] == 45 and sel["folds"] == 3 and len(by["image:max"]["maps"]) == 3  # training images only
    assert head.summary_line().startswith("auto chose image:max (highest mean AP in 3-fold cross-validation")
    assert "<- chosen" in head.selection_table().splitlines()[1]
    report = evaluate(TrainedHead.load(head.save(tmp_path / "a.pt")), cache, split="val")
    assert report.mean_ap > 0.9 and "auto chose image:max" in report.to_text()
    again = fit_objective(cache, candidates="image:mean,image:max", train_split="train", progress=False)
    assert [r["maps"] for r in again.summary["selection"]["table"]] == [r["maps"] for r in sel["table"]]  # seeded


def test_default_candidates_fusion_and_folds(tmp_path):
    splits = ["train" if i % 4 else "val" for i in range(40)]
    cache = blob_cache(tmp_path / "b.h5", n_images=40, splits=splits)
    head = fit_objective(cache, train_split="train", cv_folds=2, image_epochs=10, epochs=5, hidden=0,
                         device="cpu", progress=False)
    sel = head.summary["selection"]
    assert [r["candidate"] for r in sel["table"]] == ["image:coarse", "image:mean", "mil", "hybrid", "patch:0",
                                                       "fusion"]
    assert sel["folds"] == 2 and sel["members"] == ["image:coarse", "hybrid"]
    best = max(r["map_mean"] for r in sel["table"])
    assert next(r for r in sel["table"] if r["candidate"] == sel["chosen"])["map_mean"] == best
    fusion = next(r for r in sel["table"] if r["candidate"] == "fusion")
    parts = [r["seconds"] for r in sel["table"] if r["candidate"] in ("image:coarse", "hybrid")]
    assert fusion["seconds"] == pytest.approx(sum(parts))  # a fusion costs its members' trainings


def test_auto_refuses_too_few_images_and_unknown_candidates(tmp_path):
    cache = blob_cache(tmp_path / "b.h5", n_images=3)
    with pytest.raises(HeadError, match="too few for 2-fold") as e:
        fit_objective(cache)
    assert e.value.param == "objective"
    with pytest.raises(HeadError) as e:
        fit_objective(cache, candidates="mil,trees")
    assert e.value.param == "candidates"


def test_cli_fit_defaults_to_auto_and_prints_the_table(tmp_path):
    cache = _one_patch_signal(tmp_path / "one.h5", n_img=40)
    r = CliRunner().invoke(main, ["fit", str(cache), "--candidates", "image:mean,image:max", "--cv-folds", "2", "-q"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith("auto chose image:max") and lines[1].startswith("candidate")
    assert len(lines) == 4 and "<- chosen" in r.output


def test_halving_drops_a_clearly_worse_candidate_after_the_first_fold(tmp_path):
    cache = _one_patch_signal(tmp_path / "one.h5")  # 45 training images: 15 on each fold
    common = dict(candidates="image:mean,image:max", train_split="train", progress=False)
    head = fit_objective(cache, **common)
    sel = head.summary["selection"]
    by = {r["candidate"]: r for r in sel["table"]}
    assert sel["halving"] == "interval" and sel["chosen"] == "image:max"
    assert [d["candidate"] for d in sel["dropped"]] == ["image:mean"]
    gone = sel["dropped"][0]
    assert gone["after_fold"] == 1 and gone["behind"] == "image:max" and gone["vs_best"][2] < 0
    assert len(by["image:mean"]["maps"]) == 1 and len(by["image:max"]["maps"]) == 3  # two trainings saved
    assert "dropped after fold 1" in head.selection_table()
    assert "(1 candidate(s) dropped as clearly behind: image:mean after fold 1)" in head.summary_line()
    full = fit_objective(cache, cv_halving="none", **common).summary["selection"]
    assert full["dropped"] == [] and all(len(r["maps"]) == 3 for r in full["table"])
    assert full["chosen"] == sel["chosen"]
    again = fit_objective(cache, **common).summary["selection"]
    assert again["dropped"] == sel["dropped"]  # seeded


def _scored(n=120, behind=1.8, seed=5):
    """One class, every other image positive; per image, each candidate's score: ``image:mean`` and ``image:max``
    separate the classes equally well (independent noise), ``mil`` less well (``behind``)."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2 == 0)[:, None]
    return y, {"image:mean": y * 2.5 + rng.normal(size=(n, 1)), "image:max": y * 2.5 + rng.normal(size=(n, 1)),
               "mil": y * behind + rng.normal(size=(n, 1))}


def test_clearly_behind_pools_the_folds_so_far():
    y, scores = _scored()
    folds = [({c: v[i::3] for c, v in scores.items()}, SimpleNamespace(images=SimpleNamespace(
        labels=y[i::3], difficult=np.zeros_like(y[i::3])))) for i in range(3)]
    one, two = clearly_behind(folds[:1], 0), clearly_behind(folds[:2], 0)
    assert "mil" in two and "image:max" not in two and "image:mean" not in two
    assert two["mil"]["vs_best"][2] < 0 and two["mil"]["behind"] in ("image:mean", "image:max")
    maps = {c: [mean_ap(s, t.images.labels) for s, t in ((f[c], t) for f, t in folds[:2])] for c in scores}
    assert two["mil"]["vs_best"][0] == pytest.approx(np.mean(maps["mil"]) - np.mean(maps[two["mil"]["behind"]]))
    assert one == {}  # fold 1 alone: too few images to tell
    assert clearly_behind(folds[:2], 0) == two  # seeded


def _fake_training(monkeypatch, scores):
    """Each candidate's 'training' gives the scores of ``scores`` for the images it is asked about."""
    def train_member(train, config, name):
        return SimpleNamespace(image_scores=lambda c: scores[name][c.images.row].astype(np.float32))
    monkeypatch.setattr(auto, "train_member", train_member)


def test_halving_drops_after_the_second_fold_on_the_two_folds_pooled(tmp_path, monkeypatch):
    y, scores = _scored()
    _fake_training(monkeypatch, scores)
    path = make_synthetic_cache(tmp_path / "s.h5", np.zeros((len(y), 4)), [0] * len(y), np.arange(len(y)), y, ["obj"])
    candidates = ("image:mean", "image:max", "mil")
    with FeatureCache(path) as c:
        data = c.to_memory()
        table = {r["candidate"]: r for r in auto.cross_validate(data, FitConfig("auto"), candidates, (), 3)}
        full = auto.cross_validate(data, FitConfig("auto", {"cv_halving": "none"}), candidates, (), 3)
        two = auto.cross_validate(data, FitConfig("auto"), candidates, (), 2)
    gone = table["mil"]["dropped"]
    assert gone is not None and gone["after_fold"] == 2 and gone["vs_best"][2] < 0, gone  # not after fold 1
    assert len(table["mil"]["maps"]) == 2 and table["mil"]["maps"] == full[2]["maps"][:2]  # one training saved
    assert table["image:max"]["dropped"] is None and len(table["image:max"]["maps"]) == 3  # close: kept
    assert table["image:mean"]["dropped"] is None and len(table["image:mean"]["maps"]) == 3
    assert all(r["dropped"] is None and len(r["maps"]) == 3 for r in full)
    assert all(r["dropped"] is None or r["dropped"]["after_fold"] == 1 for r in two)  # never after the last fold


def test_screening_options_are_recorded_checked_and_never_tighter_than_the_refits(tmp_path):
    cache = blob_cache(tmp_path / "b.h5", n_images=36, splits=["train" if i % 4 else "val" for i in range(36)])
    common = dict(candidates="image:mean,mil", train_split="train", device="cpu", progress=False)
    head = fit_objective(cache, **common)
    sel = head.summary["selection"]
    assert sel["cv_tol"] == 0.01 and sel["cv_epochs"] == 20
    assert sel["screening"] == {"image_tol": 0.01, "epochs": 20}
    if head.objective == "mil":
        assert head.estimator.tol == 0.003  # the chosen candidate's refit keeps --image-tol
    loose = fit_objective(cache, image_tol=0.05, epochs=10, **common).summary["selection"]
    assert loose["screening"] == {"image_tol": 0.05, "epochs": 10}  # never tighter than --image-tol, --epochs
    before = fit_objective(cache, cv_tol=0, cv_epochs=0, **common).summary["selection"]
    assert before["screening"] == {"image_tol": 0.003, "epochs": 60} and before["cv_tol"] == 0.0
    assert before["chosen"] == sel["chosen"]
    for bad, param in (({"cv_tol": -1}, "cv_tol"), ({"cv_epochs": -1}, "cv_epochs"), ({"cv_tol": "x"}, "cv_tol")):
        with pytest.raises(HeadError) as e:
            fit_objective(cache, **bad, **common)
        assert e.value.param == param and "\n" not in e.value.message
    with pytest.raises(HeadError) as e:
        fit_objective(cache, objective="mil", cv_tol=0.01)  # an option of auto only
    assert e.value.param == "cv_tol"
    r = CliRunner().invoke(main, ["fit", str(cache), "--cv-tol", "-1", "-q"])
    assert r.exit_code == 2 and "Invalid value for '--cv-tol': must be >= 0, got -1.0" in r.output, r.output



def test_the_folds_fit_at_cv_tol_and_the_refit_is_a_plain_fit(tmp_path):
    cache = _one_patch_signal(tmp_path / "one.h5")
    common = dict(candidates="mil", train_split="train", device="cpu", progress=False)
    loose, exact = (fit_objective(cache, cv_tol=tol, **common) for tol in (0.5, 0))
    assert loose.summary["selection"]["screening"]["image_tol"] == 0.5
    assert exact.summary["selection"]["screening"]["image_tol"] == 0.003
    assert loose.summary["selection"]["table"][0]["maps"] != exact.summary["selection"]["table"][0]["maps"]
    plain = fit_objective(cache, objective="mil", train_split="train", device="cpu")
    for head in (loose, exact):  # the chosen candidate's refit keeps --image-tol whatever the folds used
        assert head.summary["epochs"] == plain.summary["epochs"]
        for k, v in plain.estimator._state().items():
            assert torch.equal(v, head.estimator._state()[k]), k

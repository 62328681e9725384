"""Tests of the multiple-instance objectives (mil, hybrid): bags, aggregations, training, streaming."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from featurecache.cache import FeatureCache
from featurecache.cli import main
from featurecache.evaluate import evaluate
from featurecache.heads import BagSource, MILHead, TrainedHead
from featurecache.heads.bags import aggregate
from featurecache.train import fit_objective

from conftest import make_synthetic_cache


def _one_patch_signal_cache(path, n_img=120, per=50, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    direction = np.zeros(dim)
    direction[:4] = 4.5
    X, img, where = [], [], {}
    labels = np.zeros((n_img, 1), bool)
    for i in range(n_img):
        labels[i, 0] = i % 2 == 0
        f = rng.normal(size=(per, dim))
        if labels[i, 0]:
            where[i] = int(rng.integers(per))
            f[where[i]] += direction
        X.append(f)
        img += [i] * per
    splits = ["train" if i < 80 else "val" for i in range(n_img)]
    return make_synthetic_cache(path, np.concatenate(X), [0] * len(img), img, labels, ["obj"], splits=splits), where


@pytest.mark.parametrize("aggregation", ["max", "lse"])
def test_mil_finds_the_one_signal_patch(tmp_path, aggregation):

    cache, where = _one_patch_signal_cache(tmp_path / "one.h5")
    head = fit_objective(cache, objective="mil", train_split="train", aggregation=aggregation, device="cpu")
    assert head.summary["objective"] == "mil"
    report = evaluate(head, cache, split="val")
    assert report.objective == "mil" and report.mean_ap > 0.9, report.mean_ap
    # Its patch scores localise: in positive val images the signal patch scores highest.
    with FeatureCache(cache, split="val") as c:
        p = head.estimator.patch_scores(c.read_features())[:, 0]
        local = c.image_index - c.images.row[0]
        hits = [int(np.argmax(p[local == i])) == where[int(c.images.row[i])]
                for i in range(len(c.images)) if int(c.images.row[i]) in where]
    assert np.mean(hits) > 0.8
    again = evaluate(TrainedHead.load(head.save(tmp_path / "m.pt"), device="cpu"), cache, split="val")
    assert again.ap == report.ap


def test_warm_up_is_what_lets_max_aggregation_find_the_patch(tmp_path):

    cache, _ = _one_patch_signal_cache(tmp_path / "one.h5")
    # Adam's mini-batches (full-batch L-BFGS, the default, finds the patch with or without the warm-up).
    aps = {w: evaluate(fit_objective(cache, objective="mil", train_split="train", aggregation="max", device="cpu",
                                     image_solver="adam", params=dict(warmup_epochs=w)),
                       cache, split="val").mean_ap for w in (0, 10)}
    # From a random start max aggregation locks onto noise patches (measured: AP ~0.54).
    assert aps[10] > 0.9 and aps[0] < aps[10] - 0.2, aps


def test_cli_fit_mil(tmp_path):
    cache, _ = _one_patch_signal_cache(tmp_path / "one.h5", n_img=40)
    r = CliRunner().invoke(main, ["fit", str(cache), "--objective", "mil", "--mil-aggregation", "max",
                                  "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("mil head (max aggregation)")
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "one.head.pt"), str(cache)])
    assert r.exit_code == 0 and "objective mil" in r.output.splitlines()[0]
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "one.head.pt"), str(cache), "--pooling", "max"])
    assert r.exit_code == 1 and "this mil head scores images itself" in r.output


def _distractor_cache(path, n_img=120, per=30, dim=32, seed=0):
    """Positive training images hold the object (dims 0-3, a labelled patch) and, in another
    unlabelled patch, a stronger distractor (dims 4-7) that co-occurs with the class in
    training only; in validation the distractor is in every image."""
    rng = np.random.default_rng(seed)
    obj, dis = np.zeros(dim), np.zeros(dim)
    obj[:4], dis[4:8] = 2.5, 5.0
    X, y, img = [], [], []
    labels = np.zeros((n_img, 1), bool)
    for i in range(n_img):
        train = i < 80
        labels[i, 0] = i % 2 == 0
        f = rng.normal(size=(per, dim))
        lab = np.zeros(per, int)
        where = rng.choice(per, 2, replace=False)
        if labels[i, 0]:
            f[where[0]] += obj
            lab[where[0]] = 1
        if labels[i, 0] or not train:
            f[where[1]] += dis
        X.append(f)
        y += list(lab)
        img += [i] * per
    splits = ["train" if i < 80 else "val" for i in range(n_img)]
    return make_synthetic_cache(path, np.concatenate(X), y, img, labels, ["obj"], splits=splits)


def test_hybrid_patch_loss_uses_box_labels_that_mil_cannot_see(tmp_path):

    cache = _distractor_cache(tmp_path / "d.h5")
    common = dict(aggregation="max", image_lr=0.01, device="cpu", train_split="train")
    mil = fit_objective(cache, objective="mil", **common)
    hybrid = fit_objective(cache, objective="hybrid", patch_weight=1.0, **common)
    assert hybrid.summary["objective"] == "hybrid" and hybrid.summary["patch_weight"] == 1.0
    ap_mil = evaluate(mil, cache, split="val").mean_ap
    report = evaluate(hybrid, cache, split="val")
    assert report.objective == "hybrid"
    # MIL latches onto the distractor, which is in every validation image; the patch loss
    # tells the hybrid head which patch is the object.
    assert report.mean_ap > 0.9 and report.mean_ap > ap_mil + 0.2, (report.mean_ap, ap_mil)
    again = evaluate(TrainedHead.load(hybrid.save(tmp_path / "h.pt"), device="cpu"), cache, split="val")
    assert again.ap == report.ap and again.objective == "hybrid"


def test_mil_streams_bags_from_hdf5_with_the_same_result(tmp_path):

    cache, _ = _one_patch_signal_cache(tmp_path / "one.h5", n_img=40)
    settings = dict(objective="mil", aggregation="lse:2", image_epochs=5, device="cpu", train_split="train")
    mem = fit_objective(cache, **settings)
    disk = fit_objective(cache, **settings, memory_limit=0)
    assert mem.summary["training_data"] == "memory" and disk.summary["training_data"] == "stream"
    for k, v in mem.estimator._state().items():
        assert torch.equal(v, disk.estimator._state()[k]), k


def test_bag_source_batches_pad_and_keep_patch_order(tmp_path):


    X = np.arange(12, dtype=np.float32).reshape(6, 2)
    src = BagSource(X, np.array([1, 0, 1, 1, 2, 0]), 4, patch_labels=np.array([0, 1, 2, 0, -1, 1]))
    x, mask, lab, w = src.batch([1, 3, 0])
    assert x.shape == (3, 3, 2) and w is None
    np.testing.assert_array_equal(x[0], X[[0, 2, 3]])
    assert not mask[1].any() and mask[2].tolist() == [True, True, False]
    assert lab[0].tolist() == [0, 2, 0] and lab[2].tolist() == [1, 1, -1]
    np.testing.assert_array_equal(src.sizes(), [2, 3, 1, 0])


def test_power_aggregation_is_the_papers_power_mean():


    z = torch.tensor([[[0.3], [-2.0], [1.5]], [[-40.0], [-60.0], [0.0]]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    got = aggregate(z, mask, "power", k=5.0)
    p = torch.sigmoid(z)
    want0 = (p[0, :, 0] ** 5).mean() ** 0.2
    assert torch.allclose(got[0, 0], want0)
    # sigma(-40)^5 underflows float32 (the naive mean is 0, and its gradient nothing); in
    # float64 the power mean is ~ (e^-200 / 2)^(1/5) = e^-40 / 2^0.2.
    want1 = ((torch.sigmoid(z[1, :2, 0].double()) ** 5).mean() ** 0.2).float()
    assert (p[1, :2, 0] ** 5).mean() == 0 and torch.allclose(got[1, 0], want1, rtol=1e-4)
    lse = aggregate(z, mask, "lse", temperature=1e-4)
    assert torch.allclose(lse[0, 0], z[0, :, 0].mean(), atol=1e-3)  # r -> 0: the mean


def test_cli_fit_hybrid(tmp_path):
    cache = _distractor_cache(tmp_path / "d.h5", n_img=40)
    r = CliRunner().invoke(main, ["fit", str(cache), "--objective", "hybrid", "--aggregation", "power:5",
                                  "--patch-weight", "0.5", "--image-epochs", "5", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("hybrid head (power k=5 aggregation)") and "patch loss weight 0.5" in r.output
    r = CliRunner().invoke(main, ["fit", str(cache), "--objective", "mil", "--aggregation", "median"])
    assert r.exit_code == 1 and r.output.startswith("Error:") and "aggregation" in r.output


def test_mil_early_stopping_keeps_the_best_held_out_epoch(tmp_path):


    rng = np.random.default_rng(0)
    X = rng.normal(size=(40 * 5, 8)).astype(np.float32)
    img = np.repeat(np.arange(40), 5)
    Y = rng.random((40, 2)) < 0.5  # labels unrelated to the features: held-out loss soon rises
    est = MILHead(validation_fraction=0.25, patience=3, max_epochs=200, lr=0.05, device="cpu").fit(X, img, Y)
    vals = [h["val_loss"] for h in est.history_]
    assert all(v is not None for v in vals) and est.n_epochs_ < 200
    best = int(np.argmin(vals))
    assert est.n_epochs_ == best + 1 + 3  # stopped after `patience` epochs without a better held-out loss
    # The kept parameters are the best epoch's: the held-out images' loss, from the head's own image
    # scores (power aggregation: probabilities), equals the minimum.
    held_out = np.random.RandomState(0).permutation(40)[:10]
    p = np.clip(est.image_scores_from_patches(X, img, 40)[held_out].astype(np.float64), 1e-6, 1 - 1e-6)
    y = Y[held_out]
    again = -np.mean(np.where(y, np.log(p), np.log1p(-p)))
    assert again == pytest.approx(vals[best], rel=1e-4)
    assert again < vals[-1]  # not the last epoch's


@pytest.mark.slow
def test_image_level_objectives_serve_class_folder_data(tmp_path, lite0):
    """Class folders have no boxes: the image-level objectives train from the folder labels."""
    from PIL import Image, ImageDraw

    from featurecache.ablate import ablate, parse_grid
    from featurecache.extract import extract
    from featurecache.patches import PatchGrid

    rng = np.random.default_rng(0)
    for cls in ("discs", "squares"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(12):
            im = Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
            d = ImageDraw.Draw(im)
            x, y, s = int(rng.integers(0, 60)), int(rng.integers(0, 30)), int(rng.integers(40, 64))
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            (d.ellipse if cls == "discs" else d.rectangle)([x, y, x + s, y + s], fill=colour)
            im.save(tmp_path / "data" / cls / f"{i}.png")
    cache = tmp_path / "folders.h5"
    extract(tmp_path / "data", cache, backbone=lite0, grid=PatchGrid(scales=(1, 1.6), input_size=64), workers=0,
            progress=False)
    r = ablate(cache, grid=parse_grid(["objective=image,mil"]), folds=3, device="cpu", progress=False)
    by = {row.config["objective"]: row.mean for row in r.rows}
    assert by["image"] > 0.8 and by["mil"] > 0.8, by


def test_lbfgs_stops_at_the_plateau_and_is_seeded(tmp_path):
    cache, _ = _one_patch_signal_cache(tmp_path / "one.h5", n_img=100)
    settings = dict(objective="mil", train_split="train", device="cpu")
    head = fit_objective(cache, **settings)
    assert head.summary["solver"] == "lbfgs"
    assert head.summary["epochs"] < 200  # the tolerance fired well before the cap on passes
    assert evaluate(head, cache, split="val").mean_ap > 0.9
    again = fit_objective(cache, **settings)
    assert again.summary["epochs"] == head.summary["epochs"]
    for k, v in head.estimator._state().items():
        assert torch.equal(v, again.estimator._state()[k]), k
    # A looser tolerance stops sooner; tol 0 runs until the loss stops changing (or the cap).
    loose = fit_objective(cache, image_tol=0.1, **settings)
    strict = fit_objective(cache, image_tol=0.0, image_epochs=60, **settings)
    assert loose.summary["epochs"] < head.summary["epochs"] <= strict.summary["epochs"] <= 60 + 25
    losses = [h["train_loss"] for h in strict.estimator.history_]
    assert losses[-1] < losses[0] and strict.summary["solver"] == "lbfgs"


def test_the_previous_solver_stays_reachable(tmp_path):
    cache, _ = _one_patch_signal_cache(tmp_path / "one.h5", n_img=40)
    head = fit_objective(cache, objective="mil", train_split="train", image_solver="adam", image_epochs=7,
                         device="cpu")
    assert head.summary["solver"] == "adam" and head.summary["epochs"] == 7
    # An MLP scorer trains with Adam whatever the solver option says.
    mlp = fit_objective(cache, objective="mil", train_split="train", image_hidden=8, image_epochs=3, device="cpu")
    assert mlp.summary["solver"] == "adam" and mlp.summary["epochs"] == 3


def test_hybrid_lbfgs_streams_bags_with_the_same_result(tmp_path):
    cache = _distractor_cache(tmp_path / "d.h5", n_img=40)
    settings = dict(objective="hybrid", image_epochs=8, device="cpu", train_split="train")
    mem = fit_objective(cache, **settings)
    disk = fit_objective(cache, **settings, memory_limit=0)
    assert mem.summary["solver"] == "lbfgs" and disk.summary["training_data"] == "stream"
    assert mem.summary["epochs"] == disk.summary["epochs"]
    for k, v in mem.estimator._state().items():
        assert torch.equal(v, disk.estimator._state()[k]), k

"""Tests of evaluation reports and localisation maps."""

import numpy as np
import pytest

from featurecache.evaluate import average_precision, image_scores


def test_evaluate_reexports_the_metrics():
    from featurecache import metrics
    from featurecache.heads import pooling

    assert average_precision is metrics.average_precision and image_scores is pooling.pool_scores


def _hand_made_mil_head(cache_path, n_features):
    """A MIL head whose class score is σ(feature 0): known patch scores."""
    import torch

    from featurecache.cache import FeatureCache
    from featurecache.heads import MILHead, TrainedHead

    est = MILHead(device="cpu")
    net = torch.nn.Linear(n_features, 1)
    with torch.no_grad():
        net.weight.zero_()
        net.weight[0, 0] = 1.0
        net.bias.zero_()
    est.net_, est.n_features_in_, est.n_outputs_ = net.eval(), n_features, 1
    with FeatureCache(cache_path) as c:
        return TrainedHead(est, "mil", tuple(c.classes), dict(c.feature_settings), c.fingerprint,
                           {"objective": "mil"})


def test_localization_map_is_the_per_pixel_mean_of_covering_patch_scores(tmp_path):
    import h5py

    from featurecache.evaluate import EvalError, localization_map
    from featurecache.train import fit_objective

    from conftest import make_synthetic_cache

    X = np.zeros((5, 4))
    X[:, 0] = [3.0, -3.0, 0.0, 0.0, 1.0]  # patch scores sigma(x0); the last patch is image 1's
    path = make_synthetic_cache(tmp_path / "c.h5", X, [0] * 5, [0, 0, 0, 0, 1], np.array([[True], [False]]), ["obj"])
    with h5py.File(path, "a") as f:  # 100 x 100 images: two top quarters, the bottom half, the whole image
        f["box"][:] = np.array([[0, 0, 50, 50], [50, 0, 100, 50], [0, 50, 100, 100], [0, 0, 100, 100],
                                [0, 0, 100, 100]], np.float32)
    head = _hand_made_mil_head(path, 4)
    m = localization_map(head, path, "img0", stride=10)
    s = 1 / (1 + np.exp(-np.array([3.0, -3.0, 0.0])))
    assert m.scores.shape == (1, 10, 10) and (m.width, m.height) == (100, 100)
    np.testing.assert_allclose(m.scores[0, :5, :5], (s[0] + 0.5) / 2, rtol=1e-5)
    np.testing.assert_allclose(m.scores[0, :5, 5:], (s[1] + 0.5) / 2, rtol=1e-5)
    np.testing.assert_allclose(m.scores[0, 5:, :], 0.5, rtol=1e-5)
    score, x, y = m.peak("obj")
    assert x < 50 and y < 50 and score == pytest.approx((s[0] + 0.5) / 2, rel=1e-5)
    assert "obj" in m.to_text() and m.path == "img0.jpg"
    saved = np.load(m.save(tmp_path / "m.npz"))
    np.testing.assert_array_equal(saved["scores"], m.scores)
    # Image 1 by row; a 7-px stride does not divide 100: the map still covers the image.
    assert localization_map(head, path, 1, stride=7).scores.shape == (1, 15, 15)
    with pytest.raises(EvalError, match="no image"):
        localization_map(head, path, 5)
    with pytest.raises(EvalError, match="match 'cat'"):
        localization_map(head, path, "cat")
    with pytest.raises(EvalError, match="scores pooled image features"):
        localization_map(fit_objective(path, objective="image"), path, 0)


def test_cli_localize(tmp_path):
    import h5py
    from click.testing import CliRunner

    from featurecache.cli import main

    from conftest import make_synthetic_cache

    X = np.zeros((2, 4))
    X[:, 0] = [2.0, -2.0]
    path = make_synthetic_cache(tmp_path / "c.h5", X, [0, 0], [0, 0], np.array([[True]]), ["obj"])
    with h5py.File(path, "a") as f:
        f["box"][:] = np.array([[0, 0, 40, 100], [40, 0, 100, 100]], np.float32)
    _hand_made_mil_head(path, 4).save(tmp_path / "h.pt")
    r = CliRunner().invoke(main, ["localize", str(tmp_path / "h.pt"), str(path), "0", "--stride", "20", "--out",
                                  str(tmp_path / "m.npz")])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("img0.jpg (100x100, 20-px cells, objective mil): obj 0.881 at (10, 10)")
    assert np.load(tmp_path / "m.npz")["scores"].shape == (1, 5, 5)


@pytest.mark.parametrize("pooling", ["power", "max", "mean"])
def test_evaluate_aggregates_chunks_as_pooling_all_patch_scores_at_once(tmp_path, pooling):
    """eval keeps no per-patch scores: image scores and the patch report are summed chunk by chunk, and equal
    pooling every patch's probabilities in one array (chunks that split images included)."""
    from featurecache.cache import FeatureCache
    from featurecache.evaluate import evaluate, patch_report
    from featurecache.heads import TrainedHead
    from featurecache.heads.pooling import ScorePooler
    from featurecache.train import fit_head

    from conftest import blob_cache

    path = blob_cache(tmp_path / "b.h5", n_images=30, patches=7, splits=["train", "val"] * 15)
    head = fit_head(path, head="logreg", train_split="train")
    with FeatureCache(path, split="val") as c:
        probs = head.patch_probabilities(c)
        chunks = list(head.probability_chunks(c, chunk_size=10))  # 10 rows: images cut across chunks
        local = np.searchsorted(c.images.row, c.image_index)
        expected = image_scores(probs, local, c.num_images, pooling=pooling)
        conf, labelled, accuracy = patch_report(probs, c.labels)
        report = evaluate(head, c, pooling=pooling)
    assert len(chunks) == -(-len(probs) // 10)
    np.testing.assert_array_equal(np.concatenate([p for p, _, _ in chunks]), probs)
    pooler = ScorePooler(len(expected), expected.shape[1], pooling=pooling)
    for p, where, _ in chunks:
        pooler.add(p, where)
    np.testing.assert_allclose(pooler.result(), expected, rtol=1e-12)
    np.testing.assert_allclose(report.scores, expected, rtol=1e-12)
    assert (report.confusion, report.labelled_patches, report.patch_accuracy) == (conf, labelled, accuracy)
    assert isinstance(head, TrainedHead) and report.n_patches == len(probs)


def test_patch_report_counts_true_labels_by_predicted_outputs():
    """Rows are true labels, columns predictions; ambiguous patches do not count (a hand-made case)."""
    from featurecache.evaluate import patch_report

    probs = np.array([[0.8, 0.1, 0.1],   # true 0 -> 0
                      [0.1, 0.8, 0.1],   # true 0 -> 1
                      [0.1, 0.1, 0.8],   # true 2 -> 2
                      [0.1, 0.8, 0.1],   # true 2 -> 1
                      [0.1, 0.8, 0.1],   # true 2 -> 1
                      [0.9, 0.05, 0.05]])  # ambiguous: left out
    labels = np.array([0, 0, 2, 2, 2, -1], np.int8)  # a small integer type: label * outputs must not overflow
    conf, labelled, accuracy = patch_report(probs, labels)
    assert conf == [[1, 1, 0], [0, 0, 0], [0, 2, 1]] and labelled == 5 and accuracy == pytest.approx(2 / 5)
    scores = image_scores(probs, np.array([0, 0, 0, 1, 1, 1]), 2, pooling="mean")
    np.testing.assert_allclose(scores, [[(0.1 + 0.8 + 0.1) / 3, (0.1 + 0.1 + 0.8) / 3],
                                        [(0.8 + 0.8 + 0.05) / 3, (0.1 + 0.1 + 0.05) / 3]])

"""Tests of evaluation reports."""

import numpy as np
import pytest

from featurecache.evaluate import average_precision, image_scores


def test_evaluate_reexports_the_metrics():
    from featurecache import metrics
    from featurecache.heads import pooling

    assert average_precision is metrics.average_precision and image_scores is pooling.pool_scores


@pytest.mark.parametrize("pooling", ["power", "max", "mean"])
def test_evaluate_aggregates_chunks_as_pooling_all_patch_scores_at_once(tmp_path, pooling):
    """eval keeps no per-patch scores: image scores and the patch report are summed chunk by chunk, and equal
    pooling every patch's probabilities in one array (chunks that split images included)."""
    from featurecache.cache import FeatureCache
    from featurecache.evaluate import evaluate, patch_report
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
        by_route = head.image_scores(c, pooling=pooling)
        conf, labelled, accuracy = patch_report(probs, c.labels)
        report = evaluate(head, c, pooling=pooling)
    # The pooled scores themselves, image by image, as the paper defines them (k = 5 for power).
    power = {"power": 5.0, "mean": 1.0}.get(pooling)
    for i in range(len(expected)):
        p = probs[local == i, 1:].astype(np.float64)
        want = p.max(0) if pooling == "max" else (p ** power).mean(0)
        np.testing.assert_allclose(expected[i], want, rtol=1e-6)
    assert len(chunks) == -(-len(probs) // 10)
    np.testing.assert_array_equal(np.concatenate([p for p, _, _ in chunks]), probs)
    pooler = ScorePooler(len(expected), expected.shape[1], pooling=pooling)
    for p, where, _ in chunks:
        pooler.add(p, where)
    np.testing.assert_allclose(pooler.result(), expected, rtol=1e-12)
    np.testing.assert_allclose(report.scores, expected, rtol=1e-12)
    assert (report.confusion, report.labelled_patches, report.patch_accuracy) == (conf, labelled, accuracy)
    # One pooled scoring route: the head's image scores are evaluate's.
    np.testing.assert_array_equal(by_route, report.scores)
    assert report.n_patches == len(probs) and report.pooling == pooling
    assert report.k == 5.0  # recorded at its default whatever the pooling


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


def test_report_settings_default_to_pooled_patch_scores_and_fields_override_them():
    from featurecache.evaluate import POOLED, ReportSettings, report_from_arrays, report_from_image_scores

    probs = np.array([[0.2, 0.8], [0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    index, labels = np.array([0, 0, 1, 1]), np.array([[True], [False]])
    r = report_from_arrays(probs, index, labels, np.zeros_like(labels), ["c"], patch_labels=np.array([1, 0, 0, 0]))
    assert (r.pooling, r.k, r.method) == ("power", 5.0, "voc07") and POOLED.k == 5.0
    np.testing.assert_allclose(r.scores[:, 0], [(0.8 ** 5 + 0.1 ** 5) / 2, (0.7 ** 5 + 0.4 ** 5) / 2])
    assert r.labelled_patches == 4 and r.patch_accuracy == pytest.approx(3 / 4)
    m = report_from_arrays(probs, index, labels, np.zeros_like(labels), ["c"], settings=POOLED, pooling="max",
                           head="mlp")
    np.testing.assert_allclose(m.scores[:, 0], [0.8, 0.7])
    assert (m.pooling, m.head) == ("max", "mlp")
    image = report_from_image_scores(np.array([[0.9], [0.2]]), labels, np.zeros_like(labels), ["c"],
                                     settings=ReportSettings(objective="image", method="all"))
    assert (image.pooling, image.k, image.objective, image.method, image.mean_ap) == ("", 0.0, "image", "all", 1.0)
    with pytest.raises(TypeError, match="depth"):
        report_from_image_scores(np.array([[0.9], [0.2]]), labels, np.zeros_like(labels), ["c"], depth=3)

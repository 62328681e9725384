"""Tests of pooling patch scores into image scores."""

import numpy as np
import pytest

from featurecache.errors import HeadError
from featurecache.heads.pooling import DEFAULT_POWER, pool_chunks, pooling_key
from featurecache.heads.pooling import pool_scores as image_scores


def test_power_max_mean_pooling():
    probs = np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.0, 0.8], [0.9, 0.1, 0.0]])
    img = np.array([0, 0, 1, 1])
    np.testing.assert_allclose(image_scores(probs, img, 2, k=2), [[(0.25 + 1) / 2, 0], [0.01 / 2, 0.64 / 2]])
    np.testing.assert_allclose(image_scores(probs, img, 2, pooling="max"), [[1.0, 0], [0.1, 0.8]])
    np.testing.assert_allclose(image_scores(probs, img, 3, pooling="mean"), [[0.75, 0], [0.05, 0.4], [0, 0]])
    with pytest.raises(HeadError, match="must be one of power, max, mean") as e:
        image_scores(probs, img, 2, pooling="median")
    assert e.value.param == "pooling"


def test_k_large_approaches_max_and_k_one_is_mean():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=50)
    img = rng.integers(0, 5, 50)
    np.testing.assert_allclose(image_scores(probs, img, 5, k=1), image_scores(probs, img, 5, pooling="mean"))
    power = image_scores(probs, img, 5, k=200) ** (1 / 200)
    np.testing.assert_allclose(power, image_scores(probs, img, 5, pooling="max"), rtol=0.05)


def test_pooling_chunks_is_pooling_all_at_once_with_one_default_power():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(3), size=40)
    img = np.sort(rng.integers(0, 6, 40))
    labels = rng.integers(0, 3, 40)
    seen = []
    chunks = ((probs[s:s + 7], img[s:s + 7], labels[s:s + 7]) for s in range(0, 40, 7))
    keys = [pooling_key(), pooling_key("max"), pooling_key("power", 2.0)]
    got = pool_chunks(chunks, 6, 2, keys, each=lambda p, lab: seen.append(len(lab)))
    assert keys[0] == ("power", DEFAULT_POWER) == ("power", 5.0) and sum(seen) == 40
    for pooling, k in keys:
        np.testing.assert_allclose(got[(pooling, k)], image_scores(probs, img, 6, pooling=pooling, k=k))
    np.testing.assert_allclose(got[keys[0]], image_scores(probs, img, 6))  # the default is the same k

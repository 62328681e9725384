"""Tests of pooling patch scores into image scores."""

import numpy as np
import pytest

from featurecache.heads.pooling import pool_scores as image_scores


def test_power_max_mean_pooling():
    probs = np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.0, 0.8], [0.9, 0.1, 0.0]])
    img = np.array([0, 0, 1, 1])
    np.testing.assert_allclose(image_scores(probs, img, 2, k=2), [[(0.25 + 1) / 2, 0], [0.01 / 2, 0.64 / 2]])
    np.testing.assert_allclose(image_scores(probs, img, 2, pooling="max"), [[1.0, 0], [0.1, 0.8]])
    np.testing.assert_allclose(image_scores(probs, img, 3, pooling="mean"), [[0.75, 0], [0.05, 0.4], [0, 0]])
    with pytest.raises(ValueError):
        image_scores(probs, img, 2, pooling="median")


def test_k_large_approaches_max_and_k_one_is_mean():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=50)
    img = rng.integers(0, 5, 50)
    np.testing.assert_allclose(image_scores(probs, img, 5, k=1), image_scores(probs, img, 5, pooling="mean"))
    power = image_scores(probs, img, 5, k=200) ** (1 / 200)
    np.testing.assert_allclose(power, image_scores(probs, img, 5, pooling="max"), rtol=0.05)

"""Tests of the localisation pictures (Pillow only)."""

import numpy as np
import pytest
from PIL import Image

from featurecache.overlay import colorize, render_overlay


def test_the_colour_ramp_gets_brighter_with_the_score():
    lum = colorize(np.linspace(0, 1, 50)) @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(lum) > 0) and lum[0] < 5 and lum[-1] > 230
    assert colorize(np.array([np.nan, -1.0, 2.0])).tolist() == colorize(np.array([0.0, 0.0, 1.0])).tolist()


@pytest.mark.parametrize("size", [(150, 100), (97, 61)])
def test_overlay_keeps_the_size_and_is_brightest_at_the_peak(size):
    w, h = size
    image = np.full((h, w, 3), 128, np.uint8)
    cells = np.zeros((-(-h // 8), -(-w // 8)))
    cells[4, 9] = 1.0  # pixels [72, 80) x [32, 40)
    picture = render_overlay(image, cells, stride=8, caption="cat 0.93")
    assert picture.size == (w, h) and picture.mode == "RGB"
    a = np.asarray(picture, np.float64).sum(2)
    caption = np.asarray(picture)[:30, :60]
    if min(size) >= 96:
        assert (caption[:2, :2] == 0).all() and caption.max() > 200  # white text on a black box
    else:  # a caption would hide a third of a small picture
        assert (caption[:2, :2] > 0).all()
    a[:30, :] = 0
    y, x = np.unravel_index(np.argmax(a), a.shape)
    assert 30 <= y < 42 and 68 <= x < 84


def test_overlay_of_a_large_image_is_capped_and_a_flat_map_is_uniform():
    image = Image.new("RGB", (3000, 1000), (10, 200, 30))
    picture = render_overlay(image, np.full((125, 375), 0.3), stride=8, max_side=600)
    assert picture.size == (600, 200)
    a = np.asarray(picture)[50:, :]
    assert (a == a[0, 0]).all()  # a flat map: the darkest colour everywhere, blended evenly

"""Tests of the patch grid and the paper's patch labelling rule (Figure 4 of Oquab et al.)."""

import numpy as np
import pytest

from featurecache.patches import (
    AMBIGUOUS,
    BACKGROUND,
    DEFAULT_SCALES,
    WHOLE_IMAGE_SCALE,
    LabelRule,
    PatchGrid,
    label_to_class,
)


def iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


# --------------------------------------------------------------------------- grid


def test_default_count_for_500x375_is_documented_512():
    boxes, scales = PatchGrid().boxes_and_scales(500, 375)
    assert len(boxes) == 512
    per_scale = [int((scales == s).sum()) for s in DEFAULT_SCALES]
    assert per_scale == [2, 8, 15, 24, 48, 70, 88, 117, 140]
    assert "512 patches" in PatchGrid.__doc__


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (640, 480), (333, 500), (100, 100), (1000, 120)])
@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.7])
def test_grid_tiles_each_scale_edge_to_edge_with_min_overlap(size, overlap):
    w, h = size
    grid = PatchGrid(min_overlap=overlap)
    boxes, scales = grid.boxes_and_scales(w, h)
    for lam in grid.scales:
        b = boxes[scales == lam].astype(np.float64)
        side = min(w, h) / lam
        np.testing.assert_allclose(b[:, 2] - b[:, 0], side, rtol=1e-5)
        np.testing.assert_allclose(b[:, 3] - b[:, 1], side, rtol=1e-5)
        assert b[:, 0].min() == pytest.approx(0, abs=1e-3) and b[:, 1].min() == pytest.approx(0, abs=1e-3)
        assert b[:, 2].max() == pytest.approx(w, abs=1e-3) and b[:, 3].max() == pytest.approx(h, abs=1e-3)
        assert (b[:, :2] >= -1e-3).all() and (b[:, 2] <= w + 1e-3).all() and (b[:, 3] <= h + 1e-3).all()
        xs, ys = np.unique(np.round(b[:, 0], 3)), np.unique(np.round(b[:, 1], 3))
        assert len(b) == len(xs) * len(ys)  # a full regular grid
        for starts in (xs, ys):
            if len(starts) > 1:
                stride = np.diff(starts)
                np.testing.assert_allclose(stride, stride[0], atol=2e-3)  # regular
                shifted = (0, 0, side, side), (stride[0], 0, stride[0] + side, side)
                assert iou(*shifted) >= overlap - 1e-4  # float32 boxes
                # The fewest patches: one fewer along this axis would overlap too little.
                n = len(starts)
                wider = (starts[-1]) / (n - 2) if n > 2 else np.inf
                assert wider > side * (1 - overlap) / (1 + overlap) * (1 + 1e-6)


def test_whole_image_grid_is_one_patch():
    boxes, scales = PatchGrid(whole=True).boxes_and_scales(500, 375)
    np.testing.assert_array_equal(boxes, [[0, 0, 500, 375]])
    assert scales.tolist() == [WHOLE_IMAGE_SCALE]


def test_larger_scales_give_more_smaller_patches():
    counts = [PatchGrid(scales=(s,)).count(500, 375) for s in DEFAULT_SCALES]
    assert counts == sorted(counts) and counts[0] < counts[-1]


@pytest.mark.parametrize(
    "kwargs",
    [dict(scales=(0.5,)), dict(scales=()), dict(scales=(1, 1)), dict(min_overlap=1.0),
     dict(min_overlap=-0.1), dict(input_size=0)],
)
def test_invalid_grid_settings_raise(kwargs):
    with pytest.raises(ValueError):
        PatchGrid(**kwargs)


def test_grid_round_trips_through_dict_and_is_hashable():
    g = PatchGrid(scales=[1, 2], min_overlap=0.3, input_size=96)
    assert PatchGrid.from_dict(g.to_dict()) == g
    assert isinstance(g.scales, tuple) and hash(g) == hash(PatchGrid(scales=(1.0, 2.0), min_overlap=0.3, input_size=96))


# --------------------------------------------------------------------------- labelling: Figure 4


DOG, CAT = 0, 1
PATCH = np.array([[0, 0, 100, 100]], dtype=np.float32)


def label_one(objects, rule=None, difficult=None):
    rule = rule or LabelRule()
    boxes = np.array([o[1:] for o in objects], dtype=np.float32).reshape(-1, 4)
    ids = np.array([o[0] for o in objects], dtype=np.int64)
    return int(rule.label(PATCH, boxes, ids, difficult)[0])


def test_fig4_clear_positive():
    assert label_one([(DOG, 10, 10, 60, 70)]) == DOG + 1


def test_fig4_two_qualifying_objects_of_different_classes_are_ambiguous():
    assert label_one([(DOG, 0, 0, 50, 90), (CAT, 50, 0, 100, 90)]) == AMBIGUOUS


def test_fig4_second_object_too_small_keeps_label():
    # The cat fills 1% of the patch: it does not qualify and does not change the label.
    assert label_one([(DOG, 0, 0, 60, 90), (CAT, 80, 80, 90, 90)]) == DOG + 1


def test_fig4_truncated_object_is_background():
    # 50% of the dog's box is in the patch (< 0.6), although it fills 50% of the patch.
    assert label_one([(DOG, 50, 0, 150, 100)]) == BACKGROUND


def test_fig4_object_too_small_for_patch_is_background():
    # Entirely inside, but 10% of the patch (< 0.2).
    assert label_one([(DOG, 10, 10, 40, 43)]) == BACKGROUND


def test_fig4_no_overlap_is_background():
    assert label_one([(DOG, 200, 200, 300, 300)]) == BACKGROUND
    assert label_one([]) == BACKGROUND


def test_thresholds_are_inclusive_and_configurable():
    # Exactly 20% of the patch and 100% of the box: qualifies at the default.
    assert label_one([(DOG, 0, 0, 20, 100)]) == DOG + 1
    assert label_one([(DOG, 0, 0, 20, 100)], rule=LabelRule(min_patch_fraction=0.25)) == BACKGROUND
    # Exactly 60% of the box inside.
    assert label_one([(DOG, 40, 0, 140, 100)]) == DOG + 1
    assert label_one([(DOG, 40, 0, 140, 100)], rule=LabelRule(min_object_fraction=0.7)) == BACKGROUND


def test_difficult_only_is_ambiguous_but_an_easy_object_wins():
    assert label_one([(DOG, 10, 10, 60, 70)], difficult=[True]) == AMBIGUOUS
    assert label_one([(DOG, 10, 10, 60, 70), (DOG, 40, 40, 100, 100)], difficult=[True, False]) == DOG + 1
    # A difficult object of another class still makes the patch ambiguous.
    assert label_one([(DOG, 0, 0, 50, 90), (CAT, 50, 0, 100, 90)], difficult=[False, True]) == AMBIGUOUS


def test_two_objects_of_one_class():
    objects = [(DOG, 0, 0, 50, 90), (DOG, 50, 0, 100, 90)]
    assert label_one(objects) == DOG + 1
    assert label_one(objects, rule=LabelRule(multiple_same_class="ambiguous")) == AMBIGUOUS


def reference_label(patch, boxes, ids, difficult, rule):
    """A slow, literal transcription of the rule, patch by patch."""
    qualifying = []
    for b, c, d in zip(boxes, ids, difficult):
        iw = max(0.0, min(patch[2], b[2]) - max(patch[0], b[0]))
        ih = max(0.0, min(patch[3], b[3]) - max(patch[1], b[1]))
        inter = iw * ih
        ap = (patch[2] - patch[0]) * (patch[3] - patch[1])
        ab = (b[2] - b[0]) * (b[3] - b[1])
        if inter > 0 and inter >= rule.min_patch_fraction * ap and inter >= rule.min_object_fraction * ab:
            qualifying.append((c, d))
    if not qualifying:
        return BACKGROUND
    if len({c for c, _ in qualifying}) > 1:
        return AMBIGUOUS
    if all(d for _, d in qualifying):
        return AMBIGUOUS
    return qualifying[0][0] + 1


def test_vectorised_labels_match_patch_by_patch_reference():
    rng = np.random.default_rng(1)
    rule = LabelRule()
    grid = PatchGrid(scales=(1, 1.6, 2.4, 4))
    checked = 0
    for _ in range(20):
        w, h = rng.integers(80, 400, 2)
        k = int(rng.integers(0, 6))
        x0 = rng.uniform(0, w - 10, k)
        y0 = rng.uniform(0, h - 10, k)
        boxes = np.stack([x0, y0, x0 + rng.uniform(5, w, k), y0 + rng.uniform(5, h, k)], 1).clip(0, [w, h, w, h])
        ids = rng.integers(0, 3, k)
        diff = rng.random(k) < 0.2
        patches = grid.boxes(w, h)
        got = rule.label(patches, boxes, ids, diff)
        want = [reference_label(p, boxes, ids, diff, rule) for p in patches.astype(np.float64)]
        np.testing.assert_array_equal(got, want)
        checked += len(patches)
    assert checked > 500
    assert set(np.unique(got)) <= {AMBIGUOUS, BACKGROUND, 1, 2, 3}


def test_label_to_class():
    np.testing.assert_array_equal(label_to_class(np.array([0, 1, 3, -1])), [-1, 0, 2, -2])


def test_invalid_rule_raises():
    with pytest.raises(ValueError):
        LabelRule(min_patch_fraction=0)
    with pytest.raises(ValueError):
        LabelRule(multiple_same_class="maybe")
    assert LabelRule.from_dict(LabelRule().to_dict()) == LabelRule()


# --------------------------------------------------------------------------- dense grid


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (640, 480), (224, 224), (1000, 150)])
@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.7])
def test_dense_layout_is_on_feature_cells_and_covers_the_image(size, overlap):
    w, h = size
    grid = PatchGrid(scales=(1, 1.6, 2.4, 4), min_overlap=overlap)
    k = 224 // 32
    for lam, rw, rh, xs, ys in grid.dense_layout(w, h):
        assert rw % 32 == 0 and rh % 32 == 0 and min(rw, rh) >= 224
        # The resized patch side is within one stride of the nominal 224 * (resize / nominal).
        nominal = 224 * lam / min(w, h)
        assert abs(rw / w - nominal) * w <= 16 + 1e-6 or rw == 224
        for starts, n_cells in ((xs, rw // 32), (ys, rh // 32)):
            assert starts[0] == 0 and starts[-1] == n_cells - k  # edge to edge
            steps = np.diff(starts)
            if len(steps):
                c = steps[:-1].max() if len(steps) > 1 else steps[0]
                assert (steps[:-1] == c).all() and 0 < steps[-1] <= c
                assert (k - c) / (k + c) >= overlap - 1e-9  # neighbours overlap enough
                assert (k - c - 1) / (k + c + 1) < overlap or c + 1 > n_cells - k  # c is the largest


def test_dense_boxes_are_the_exact_windows_in_original_pixels():
    grid = PatchGrid(scales=(1, 2))
    boxes, scales = grid.dense_boxes_and_scales(500, 375)
    layout = grid.dense_layout(500, 375)
    assert len(boxes) == sum(len(xs) * len(ys) for _, _, _, xs, ys in layout)
    lam, rw, rh, xs, ys = layout[1]
    b = boxes[scales == 2]
    np.testing.assert_allclose(b[0], [0, 0, 224 * 500 / rw, 224 * 375 / rh], rtol=1e-5)
    np.testing.assert_allclose(b[-1, 2:], [500, 375], rtol=1e-5)
    np.testing.assert_allclose(b[1, 0], xs[1] * 32 * 500 / rw, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of the stride"):
        PatchGrid(input_size=100).dense_layout(500, 375)

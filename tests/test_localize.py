"""Tests of localisation maps (windows and class activation maps), their boxes, and pointing / CorLoc."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from featurecache.cache import FeatureCache
from featurecache.cli import main
from featurecache.errors import EvalError

from conftest import make_synthetic_cache, write_voc_xml

GRID = {"scales": (1.0, 2.0, 3.0), "input_size": 64}
SIZE = (192, 144)
SIDE = 48  # the object's side in pixels
VAL = ("sq24", "sq25", "sq26", "sq27")


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


def _square_voc(root, n_train=24, n_val=4, seed=0):
    """A VOC set of noise images with a red square at a random place (class ``red``) or a blue one (no
    object) in every other training image; the ``n_val`` images of ``val`` all have a red square.
    Returns the root and the red squares' boxes (x0, y0, x1, y1 in pixel edges)."""
    rng = np.random.default_rng(seed)
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    w, h = SIZE
    boxes, ids = {}, [f"sq{i}" for i in range(n_train + n_val)]
    for k, i in enumerate(ids):
        red = k >= n_train or k % 2 == 0
        pixels = rng.integers(60, 190, (h, w, 3)).astype(np.uint8)
        x0, y0 = int(rng.integers(0, w - SIDE)), int(rng.integers(0, h - SIDE))
        pixels[y0:y0 + SIDE, x0:x0 + SIDE] = (230, 20, 20) if red else (20, 20, 230)
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{i}.jpg", quality=95)
        objects = [("red", x0 + 1, y0 + 1, x0 + SIDE, y0 + SIDE)] if red else []
        write_voc_xml(root / "Annotations" / f"{i}.xml", f"{i}.jpg", w, h, objects)
        if red:
            boxes[i] = (x0, y0, x0 + SIDE, y0 + SIDE)
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(ids[:n_train]) + "\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("\n".join(ids[n_train:]) + "\n")
    return root, boxes


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    """Heads of three objectives trained on real Lite0 features of the red-square set."""
    from featurecache.extract import extract
    from featurecache.patches import PatchGrid
    from featurecache.train import fit_objective

    base = tmp_path_factory.mktemp("squares")
    voc, boxes = _square_voc(base / "voc")
    cache = extract(voc, base / "sq.h5", grid=PatchGrid(**GRID), workers=0, progress=False).path
    heads = {
        "patch": fit_objective(cache, objective="patch", head="logreg", train_split="train", progress=False),
        "mil": fit_objective(cache, objective="mil", train_split="train", progress=False),
        "image": fit_objective(cache, objective="image", train_split="train", progress=False),
    }
    return {"voc": voc, "cache": cache, "boxes": boxes, "heads": heads,
            "files": {k: str(v.save(base / f"{k}.head.pt")) for k, v in heads.items()}}


# Not (mil, windows): a mil head's window mean peaks at the image's edge in one of these images,
# where few patches cover the cells (the weakness docs/results.md measures on VOC).
@pytest.mark.parametrize("objective, method", [("patch", "cam"), ("patch", "windows"), ("patch", "cam*windows"),
                                               ("mil", "cam"), ("mil", "cam*windows"), ("image", "cam")])
def test_maps_peak_on_the_object(squares, objective, method):
    from featurecache.maps import localization_map

    for name in VAL:  # not trained on
        m = localization_map(squares["heads"][objective], squares["cache"], name, method=method, stride=4)
        _, x, y = m.peak("red")
        x0, y0, x1, y1 = squares["boxes"][name]
        # On the square, up to half the finest feature cell (24 px at λ = 3): the maps' resolution.
        assert x0 - 12 <= x <= x1 + 12 and y0 - 12 <= y <= y1 + 12, (name, (x, y), squares["boxes"][name])
        assert m.method == method and m.scores.shape == (1, SIZE[1] // 4, SIZE[0] // 4)


def _bilinear(cells, ys, xs):
    """Brute-force bilinear samples of a (C, rows, cols) array at fractional cell indices (edges held)."""
    out = np.zeros((cells.shape[0], len(ys), len(xs)))
    for a, fy in enumerate(ys):
        for b, fx in enumerate(xs):
            fy_, fx_ = np.clip(fy, 0, cells.shape[1] - 1), np.clip(fx, 0, cells.shape[2] - 1)
            y0, x0 = int(np.floor(fy_)), int(np.floor(fx_))
            y1, x1 = min(y0 + 1, cells.shape[1] - 1), min(x0 + 1, cells.shape[2] - 1)
            ty, tx = fy_ - y0, fx_ - x0
            out[:, a, b] = ((1 - ty) * (1 - tx) * cells[:, y0, x0] + (1 - ty) * tx * cells[:, y0, x1]
                            + ty * (1 - tx) * cells[:, y1, x0] + ty * tx * cells[:, y1, x1])
    return out


@pytest.mark.parametrize("objective", ["patch", "image"])
def test_cam_equals_a_brute_force_per_cell_computation(squares, objective):
    """Each feature-map cell scored alone by the head, log-odds sampled at the map's cell centres and
    averaged over the head's scales: what the cam map holds."""
    import torch
    from torch.nn import functional as F

    from featurecache.maps import localization_map

    head = squares["heads"][objective]
    net = head.new_images_recipe().build_backbone()
    pixels = np.asarray(Image.open(squares["voc"] / "JPEGImages" / "sq25.jpg").convert("RGB"))
    h, w = pixels.shape[:2]
    stride = 12
    total = 0
    for lam in GRID["scales"]:
        f = GRID["input_size"] * lam / min(w, h)
        rw, rh = max(64, round(w * f / 32) * 32), max(64, round(h * f / 32) * 32)
        x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
        with torch.inference_mode():
            fmap = net.dense_trunk(net.normalize(x))[0].numpy()
        d, rows, cols = fmap.shape
        cells = np.zeros((1, rows, cols))
        for i in range(rows):
            for j in range(cols):
                p = float(np.clip(head.region_scores(fmap[:, i, j][None])[0, 0], 1e-6, 1 - 1e-6))
                cells[0, i, j] = np.log(p / (1 - p))
        # A map cell's centre in the resized image, as a fractional feature-cell index (cell i's centre at 32 i + 16).
        # (The last map cell may be partial: its centre is the middle of what is left of the image.)
        cx = [(x0 + min(x0 + stride, w)) / 2 for x0 in range(0, w, stride)]
        cy = [(y0 + min(y0 + stride, h)) / 2 for y0 in range(0, h, stride)]
        xs = (np.array(cx) * rw / w - 16) / 32
        ys = (np.array(cy) * rh / h - 16) / 32
        total = total + _bilinear(cells, ys, xs)
    expected = 1 / (1 + np.exp(-total / len(GRID["scales"])))
    m = localization_map(head, squares["cache"], "sq25", method="cam", stride=stride, runtime="torch")
    np.testing.assert_allclose(m.scores, expected, atol=2e-4)


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_cam_maps_through_a_cpu_runtime_equal_torchs(squares, runtime):
    pytest.importorskip(runtime)
    from featurecache.maps import Localizer, MapConfig

    head = squares["heads"]["mil"]
    with FeatureCache(squares["cache"]) as cache:
        maps = {}
        for name in ("torch", runtime):
            maker = Localizer(head, MapConfig(runtime=name, stride=12))
            maps[name] = maker.cache_map(cache, 0).scores
            assert maker.runtime().name == name
    assert np.abs(maps["torch"] - maps[runtime]).max() < 1e-3
    assert not np.array_equal(maps["torch"], np.full_like(maps["torch"], maps["torch"].flat[0]))  # not flat


def test_windows_map_is_the_per_pixel_mean_of_covering_patch_scores(tmp_path):
    import h5py

    from featurecache.maps import localization_map
    from featurecache.train import fit_objective

    X = np.zeros((5, 4))
    X[:, 0] = [3.0, -3.0, 0.0, 0.0, 1.0]  # patch scores sigma(x0); the last patch is image 1's
    path = make_synthetic_cache(tmp_path / "c.h5", X, [0] * 5, [0, 0, 0, 0, 1], np.array([[True], [False]]), ["obj"])
    with h5py.File(path, "a") as f:  # 100 x 100 images: two top quarters, the bottom half, the whole image
        f["box"][:] = np.array([[0, 0, 50, 50], [50, 0, 100, 50], [0, 50, 100, 100], [0, 0, 100, 100],
                                [0, 0, 100, 100]], np.float32)
    head = _hand_made_mil_head(path, 4)
    m = localization_map(head, path, "img0", method="windows", stride=10)
    s = 1 / (1 + np.exp(-np.array([3.0, -3.0, 0.0])))
    assert m.scores.shape == (1, 10, 10) and (m.width, m.height) == (100, 100)
    np.testing.assert_allclose(m.scores[0, :5, :5], (s[0] + 0.5) / 2, rtol=1e-5)
    np.testing.assert_allclose(m.scores[0, :5, 5:], (s[1] + 0.5) / 2, rtol=1e-5)
    np.testing.assert_allclose(m.scores[0, 5:, :], 0.5, rtol=1e-5)
    score, x, y = m.peak("obj")
    assert x < 50 and y < 50 and score == pytest.approx((s[0] + 0.5) / 2, rel=1e-5)
    assert m.box("obj", threshold=0.4) == (0.0, 0.0, 100.0, 100.0)  # the bottom half (0.5) is half way up
    assert m.box("obj", threshold=0.6) == (0.0, 0.0, 50.0, 50.0)  # the top-left quarter alone
    assert "obj" in m.to_text() and m.path == "img0.jpg"
    saved = np.load(m.save(tmp_path / "m.npz"))
    np.testing.assert_array_equal(saved["scores"], m.scores)
    assert str(saved["method"]) == "windows"
    # Image 1 by row; a 7-px stride does not divide 100: the map still covers the image.
    assert localization_map(head, path, 1, method="windows", stride=7).scores.shape == (1, 15, 15)
    with pytest.raises(EvalError, match="no image"):
        localization_map(head, path, 5, method="windows")
    with pytest.raises(EvalError, match="match 'cat'"):
        localization_map(head, path, "cat", method="windows")
    with pytest.raises(EvalError, match="method: the windows map averages patch scores"):
        localization_map(fit_objective(path, objective="image"), path, 0, method="windows")


def test_cli_localize_a_windows_map(tmp_path):
    import h5py

    X = np.zeros((2, 4))
    X[:, 0] = [2.0, -2.0]
    path = make_synthetic_cache(tmp_path / "c.h5", X, [0, 0], [0, 0], np.array([[True]]), ["obj"])
    with h5py.File(path, "a") as f:
        f["box"][:] = np.array([[0, 0, 40, 100], [40, 0, 100, 100]], np.float32)
    _hand_made_mil_head(path, 4).save(tmp_path / "h.pt")
    r = CliRunner().invoke(main, ["localize", str(tmp_path / "h.pt"), str(path), "0", "--map-method", "windows",
                                  "--stride", "20", "--out", str(tmp_path / "m.npz")])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("img0.jpg (100x100, windows map, 20-px cells, objective mil): obj 0.881 at (10, 10), "
                               "box (0, 0, 40, 100)")
    assert np.load(tmp_path / "m.npz")["scores"].shape == (1, 5, 5)


def test_a_maps_box_is_the_peaks_connected_component():
    from featurecache.maps import LocalizationMap

    scores = np.zeros((1, 6, 8), np.float32)
    scores[0, 1:3, 1:4] = 0.9  # the peak's blob: cells x 1..3, y 1..2
    scores[0, 1, 2] = 1.0
    scores[0, 4:6, 6:8] = 0.8  # another blob above half the peak, not connected
    scores[0, 3, 4] = 0.3  # log-odds below half way from the minimum (0) to the peak (1): does not join them
    m = LocalizationMap("x", ("a",), scores, 10, 75, 60, "mil", method="cam")
    assert m.box("a") == (10.0, 10.0, 40.0, 30.0)
    assert m.box("a", threshold=0.95) == (20.0, 10.0, 30.0, 20.0)  # the peak cell alone
    scores[0, 3, 4:6] = 0.6  # diagonal neighbours connect: the box grows to the second blob, clipped to the image
    assert m.box("a") == (10.0, 10.0, 75.0, 60.0)
    flat = LocalizationMap("x", ("a",), np.full((1, 6, 8), 0.5, np.float32), 10, 75, 60, "mil")
    assert flat.box(0) == (0.0, 0.0, 75.0, 60.0)


def test_pointing_and_corloc_count_what_the_maps_and_boxes_say(squares):
    from featurecache.localize import evaluate_localization, localization_map

    head = squares["heads"]["patch"]
    report = evaluate_localization(head, squares["cache"], split="val", stride=8, progress=False)
    # By hand from each val image's map: its peak in the square, and its box's IoU with the square.
    peaks, corloc, centre = [], [], []
    for name in VAL:
        m = localization_map(head, squares["cache"], name, stride=8)
        x0, y0, x1, y1 = squares["boxes"][name]
        _, x, y = m.peak("red")
        peaks.append(x0 <= x <= x1 and y0 <= y <= y1)
        bx = m.box("red")
        inter = max(0, min(bx[2], x1) - max(bx[0], x0)) * max(0, min(bx[3], y1) - max(bx[1], y0))
        corloc.append(inter / ((bx[2] - bx[0]) * (bx[3] - bx[1]) + SIDE * SIDE - inter) >= 0.5)
        centre.append(x0 <= SIZE[0] / 2 <= x1 and y0 <= SIZE[1] / 2 <= y1)
    d = report.to_dict()
    assert d["pairs"] == 4 and d["images"] == 4 and d["method"] == "cam"
    assert d["overall"]["pointing"] == np.mean(peaks)
    assert d["overall"]["corloc"] == np.mean(corloc)
    assert d["overall"]["centre"] == np.mean(centre)
    assert d["overall"]["whole_image"] == 0.0  # a 48-px square is far below IoU 0.5 with the whole image
    assert d["overall"]["pointing_tol"] >= d["overall"]["pointing"]
    assert report.to_csv().splitlines()[0] == "class,pairs,pointing,pointing_tol,corloc,centre,centre_tol,whole_image"
    assert "red" in report.to_text() and report.seconds_per_image > 0
    # What ran the cam maps' trunk is recorded; window maps read cached features and name none.
    assert d["runtime"].split()[0] in ("torch", "openvino", "onnxruntime") and f"({d['runtime']})" in report.to_text()
    windows = evaluate_localization(head, squares["cache"], split="val", stride=8, method="windows", progress=False)
    assert windows.runtime == "" and windows.to_dict()["runtime"] == ""


def test_cli_localize_evaluate_and_its_usage_errors(squares, tmp_path):
    runner = CliRunner()
    args = ["localize", squares["files"]["image"], str(squares["cache"])]
    r = runner.invoke(main, [*args, "--evaluate", "--split", "val", "--json", str(tmp_path / "l.json"), "-q"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("cam maps of an image head: 4 images, 4 image-class pairs")
    assert json.loads((tmp_path / "l.json").read_text())["per_class"]["red"]["pairs"] == 4
    r = runner.invoke(main, [*args, "sq24", "--map-method", "windows"])
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert r.output.startswith("Error: --map-method: the windows map averages patch scores")
    r = runner.invoke(main, [*args, "sq24", "--split", "val"])
    assert r.exit_code == 2 and "--split does not apply without --evaluate" in r.output
    r = runner.invoke(main, args)
    assert r.exit_code == 2 and "give IMAGE, or --evaluate" in r.output
    r = runner.invoke(main, [*args, "sq24", "--class", "red"])
    assert r.exit_code == 2 and "give --png too" in r.output
    r = runner.invoke(main, [*args, "sq24", "--map-method", "windows", "--map-scales", "1"])
    assert r.exit_code == 1 and r.output.startswith("Error: --map-scales: applies to cam maps only"), r.output
    r = runner.invoke(main, [*args, "sq24", "--map-scales", "1,2", "--stride", "16", "--out", str(tmp_path / "m.npz")])
    assert r.exit_code == 0, r.output
    assert "cam map, 16-px cells" in r.output and np.load(tmp_path / "m.npz")["scores"].shape == (1, 9, 12)


def test_evaluation_needs_boxes_and_the_images(squares, tmp_path):
    import shutil

    from featurecache.extract import extract
    from featurecache.localize import evaluate_localization, localization_map
    from featurecache.patches import PatchGrid

    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(squares["voc"] / "JPEGImages" / "sq0.jpg", plain)
    cache = extract(plain, tmp_path / "p.h5", grid=PatchGrid(**GRID), classes=("red",), workers=0,
                    progress=False).path
    with pytest.raises(EvalError, match="no object boxes"):
        evaluate_localization(squares["heads"]["mil"], cache, progress=False)
    # cam maps read the image file; a moved one is named.
    moved = tmp_path / "moved.jpg"
    shutil.move(plain / "sq0.jpg", moved)
    with pytest.raises(EvalError, match="sq0.jpg: cannot read the image"):
        localization_map(squares["heads"]["mil"], cache, 0)
    assert localization_map(squares["heads"]["mil"], cache, 0, method="windows").scores.shape[0] == 1


def test_map_config_checks_its_fields():
    from featurecache.maps import MapConfig

    for bad in ({"method": "grad-cam"}, {"stride": 0}, {"stride": 5000}, {"box_threshold": 1.0},
                {"box_threshold": "abc"}, {"scales": (0.0,)}, {"scales": (0.5,)}, {"scales": (1, 1)}, {"scales": ()},
                {"scales": "16"}, {"scales": 2}, {"max_side": 10}):
        with pytest.raises(EvalError) as e:
            MapConfig(**bad)
        assert e.value.param == next(iter(bad))
    assert MapConfig(scales=[1, 2.5]).scales == (1.0, 2.5)
    with pytest.raises(EvalError, match="cam maps only") as e:
        MapConfig(method="windows", scales=(1, 2))
    assert e.value.param == "scales" and MapConfig(method="cam*windows", scales=(2,)).scales == (2.0,)


def test_what_a_red_team_found(squares, tmp_path):
    """Numeric image names, partial last cells, exact --out names, maps too large, images gone at evaluation."""
    import shutil

    import h5py

    from featurecache.localize import LocalizationMap, evaluate_localization

    # A cell wider than the image: its centre is the image's, not the far corner.
    m = LocalizationMap("x", ("a",), np.ones((1, 1, 1), np.float32), 1000, 75, 60, "mil")
    assert m.peak("a")[1:] == (37.5, 30.0)
    with pytest.raises(EvalError, match="box_threshold"):
        m.box("a", threshold=5)
    # --out names the file written, suffix or not.
    r = CliRunner().invoke(main, ["localize", squares["files"]["mil"], str(squares["cache"]), "sq24", "--out",
                                  str(tmp_path / "m")])
    assert r.exit_code == 0 and (tmp_path / "m").is_file() and not (tmp_path / "m.npz").exists(), r.output
    assert int(np.load(tmp_path / "m")["stride"]) == 8
    head = squares["heads"]["mil"]
    # An image gone since extraction is left out of an evaluation, named, not the end of it.
    voc = tmp_path / "voc"
    shutil.copytree(squares["voc"], voc)
    cache = tmp_path / "c.h5"
    shutil.copy(squares["cache"], cache)
    with h5py.File(cache, "a") as f:
        ds = json.loads(f.attrs["dataset"])
        ds["root"] = str(voc)
        f.attrs["dataset"] = json.dumps(ds)
    (voc / "JPEGImages" / "sq25.jpg").unlink()
    report = evaluate_localization(head, cache, split="val", progress=False)
    assert report.pairs.sum() == 3 and len(report.skipped) == 1 and "sq25.jpg" in report.skipped[0]
    assert "1 image(s) could not be mapped" in report.to_text()
    assert json.loads(report.to_json())["skipped"] == report.skipped


def test_digits_name_an_image_before_they_name_a_row(tmp_path):
    import h5py

    X = np.zeros((3, 4))
    path = make_synthetic_cache(tmp_path / "c.h5", X, [0] * 3, [0, 1, 2], np.array([[True]] * 3), ["obj"])
    with h5py.File(path, "a") as f:  # COCO-like numeric file names
        f["images/path"][:] = ["0001.jpg", "3.jpg", "7.jpg"]
    from featurecache.maps import localization_map

    head = _hand_made_mil_head(path, 4)
    assert localization_map(head, path, "3", method="windows").path == "3.jpg"
    assert localization_map(head, path, "0001", method="windows").path == "0001.jpg"
    assert localization_map(head, path, "2", method="windows").path == "7.jpg"  # no such name: row 2
    with pytest.raises(EvalError, match="no image 5"):
        localization_map(head, path, "5", method="windows")


"""Tests of `predict`: a trained head used on new images through the same extraction as `extract`."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from featurecache.cli import main
from featurecache.errors import CacheError, ExtractError, PredictError

from conftest import tiny_trained_head

GRID = {"scales": (1.0, 2.0), "input_size": 64}


def _extract(dataset, out, **options):
    from featurecache.extract import extract
    from featurecache.patches import PatchGrid

    return extract(dataset, out, grid=PatchGrid(**GRID), workers=0, progress=False, **options)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny VOC set of noise images with a patch head and a mil head trained on it (real Lite0 features)."""
    from featurecache.train import fit_objective

    root = tmp_path_factory.mktemp("tiny")
    patch = tiny_trained_head(root, head="logreg")
    mil = fit_objective(root / "tiny.h5", objective="mil", train_split="train", progress=False)
    return {"root": root, "voc": root / "voc", "cache": root / "tiny.h5", "patch": patch,
            "mil": mil.save(root / "mil.head.pt")}


def _image_files(voc):
    return sorted((voc / "JPEGImages").glob("*.jpg"))


def test_predict_scores_equal_the_heads_scores_on_a_cache_of_the_same_images(tiny):
    import featurecache
    from featurecache.cache import FeatureCache
    from featurecache.heads import TrainedHead

    predictor = featurecache.load_head(tiny["mil"])
    files = _image_files(tiny["voc"])[::-1]  # another order than the cache's
    result = predictor.predict(files, workers=0)
    with FeatureCache(tiny["cache"]) as c:
        expected = TrainedHead.load(tiny["mil"]).image_scores(c)
        order = [c.images.path.index(f"JPEGImages/{f.name}") for f in files]
    np.testing.assert_allclose(result.scores, expected[order], rtol=1e-5, atol=1e-7)
    assert result.n_scored == 6 and result.errors == [""] * 6 and result.paths == [str(f) for f in files]
    assert result.threshold == 0.5  # a mil head's scores are probabilities
    rec = result.records()[0]
    assert rec["top"][0]["score"] == pytest.approx(float(result.scores[0].max()))
    assert rec["labels"] == [c for c, s in sorted(rec["scores"].items(), key=lambda t: -t[1]) if s >= 0.5]
    # A PIL image and an array of the same pixels score as the file.
    pixels = np.asarray(Image.open(files[0]).convert("RGB"))
    again = predictor.predict([Image.open(files[0]), pixels], workers=0)
    np.testing.assert_allclose(again.scores, result.scores[[0, 0]], rtol=1e-5, atol=1e-7)
    assert again.paths == ["<image 0>", "<image 1>"]


@pytest.mark.slow
def test_predict_on_the_voc_val_files_equals_eval_on_their_cache(voc_sample, tmp_path):
    """The acceptance check: a head trained on `train`, `predict` on the `val` JPEGs vs `eval` on a val cache."""
    from featurecache.evaluate import evaluate
    from featurecache.train import fit_objective

    train = _extract(voc_sample, tmp_path / "train.h5", split="train")
    val = _extract(voc_sample, tmp_path / "val.h5", split="val")
    head = fit_objective(train.path, objective="patch", head="logreg", progress=False).save(tmp_path / "h.pt")
    report = evaluate(head, val.path)
    ids = (voc_sample / "ImageSets" / "Main" / "val.txt").read_text().split()
    files = [str(voc_sample / "JPEGImages" / f"{i}.jpg") for i in ids]
    out = tmp_path / "p.json"
    r = CliRunner().invoke(main, ["predict", str(head), *files, "--out", str(out), "--workers", "0", "-q"])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    got = np.array([[img["scores"][c] for c in data["classes"]] for img in data["images"]])
    np.testing.assert_allclose(got, report.scores, rtol=1e-5, atol=1e-9)
    assert [img["path"] for img in data["images"]] == files and data["threshold"] is None
    assert data["objective"] == "patch" and "pooled patch score" in data["scores_are"]


def _corrupt_jpeg(src: Path, dest: Path) -> Path:
    """A JPEG whose header reads but whose pixel data is cut off."""
    data = src.read_bytes()
    dest.write_bytes(data[: len(data) // 3])
    return dest


def test_plain_folder_recursive_with_unreadable_images_gives_error_rows(tiny, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    files = _image_files(tiny["voc"])
    shutil.copy(files[0], folder / "a.jpg")
    shutil.copy(files[1], folder / "sub" / "b.jpg")
    _corrupt_jpeg(files[2], folder / "sub" / "cut.jpg")
    (folder / "notes.jpg").write_text("not an image")
    (folder / ".hidden.jpg").write_text("skipped: hidden")
    out = tmp_path / "p.csv"
    r = CliRunner().invoke(main, ["predict", str(tiny["patch"]), str(folder), str(tmp_path / "missing.png"),
                                  "--out", str(out), "--workers", "0", "--top", "2", "-q"])
    assert r.exit_code == 0, r.output
    assert "5 images: 2 scored, 3 could not be read" in r.output
    import csv

    rows = list(csv.DictReader(out.read_text().splitlines()))
    by_name = {Path(row["path"]).name: row for row in rows}
    assert set(by_name) == {"a.jpg", "b.jpg", "cut.jpg", "notes.jpg", "missing.png"}
    assert by_name["a.jpg"]["error"] == "" and by_name["a.jpg"]["top1"] in ("cat", "dog")
    assert float(by_name["a.jpg"]["top1_score"]) >= float(by_name["a.jpg"]["top2_score"])
    assert float(by_name["a.jpg"][by_name["a.jpg"]["top1"]]) == float(by_name["a.jpg"]["top1_score"])
    assert "decode" in by_name["cut.jpg"]["error"] or "truncated" in by_name["cut.jpg"]["error"].lower()
    assert "cannot read image" in by_name["notes.jpg"]["error"]
    assert by_name["missing.png"]["error"] == "no such file or directory"
    assert list(rows[0])[:7] == ["path", "width", "height", "top1", "top1_score", "top2", "top2_score"]
    assert by_name["a.jpg"]["labels"] == ""  # a patch head's pooled scores are not probabilities: no default
    # Every image unreadable: the rows are still written, and the exit status says so.
    r = CliRunner().invoke(main, ["predict", str(tiny["patch"]), str(folder / "notes.jpg"), "--out", str(out)])
    assert r.exit_code == 1 and "no image could be scored" in r.output
    assert "cannot read image" in out.read_text()
    with pytest.raises(ExtractError, match="cut.jpg.*--strict"):  # decoded at extraction, where it fails
        import featurecache

        featurecache.load_head(tiny["patch"]).predict(folder / "sub", strict=True, workers=0)


def test_threshold_labels_and_the_printed_table(tiny):
    r = CliRunner().invoke(main, ["predict", str(tiny["patch"]), str(tiny["voc"] / "JPEGImages"),
                                  "--threshold", "0", "--workers", "0", "-q"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split() == ["image", "top", "classes", "labels"] and len(lines) == 8
    assert all(line.rstrip().endswith(("cat dog", "dog cat")) for line in lines[1:7])  # every class >= 0
    assert lines[-1].startswith("6 images: 6 scored; patch head, power k=5; labels: score >= 0")


def test_a_kept_cache_is_a_normal_cache_and_is_reused(tiny, tmp_path):
    from featurecache.maps import localization_map

    kept = tmp_path / "new.h5"
    runner = CliRunner()
    args = ["predict", str(tiny["mil"]), str(tiny["voc"] / "JPEGImages" / "im0.jpg"), "--cache", str(kept),
            "--workers", "0", "-q"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0 and kept.is_file(), first.output
    mtime = kept.stat().st_mtime_ns
    second = runner.invoke(main, args)
    assert second.output.splitlines()[1] == first.output.splitlines()[1] and kept.stat().st_mtime_ns == mtime
    assert localization_map(tiny["mil"], kept, "im0", method="windows").scores.shape[0] == 2


def test_maps_have_the_images_size_and_are_brightest_where_the_map_peaks(tiny, tmp_path):
    import featurecache

    predictor = featurecache.load_head(tiny["mil"])
    src = Image.open(_image_files(tiny["voc"])[0]).convert("RGB")
    big = tmp_path / "big.png"
    src.resize((256, 192)).save(big)  # large enough for a caption and several map cells
    result = predictor.predict([big], maps=tmp_path / "maps", stride=8, workers=0)
    png = Path(result.maps[0])
    cls = result.top_classes(0)[0][0]
    assert png.parent == tmp_path / "maps" and png.name == f"big.{cls}.png"
    picture = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
    assert picture.shape == (192, 256, 3)
    m = predictor.localization_map(big, cls, stride=8)
    assert m.classes == (cls,) and m.image_file == str(big)
    # The colour layer (the picture less the image's share) is brightest in a cell where the map peaks.
    image = np.asarray(Image.open(big).convert("RGB"), dtype=np.float64)
    colour = (picture - 0.45 * image) / 0.55
    lum = colour @ np.array([0.299, 0.587, 0.114])
    lum[:40, :] = -1  # the caption: compared with the cells below it
    y, x = np.unravel_index(np.argmax(lum), lum.shape)
    cells, seen = m.scores[0], m.scores[0, 40 // 8:]
    span = cells.max() - cells.min()  # the colour ramp spans the whole map's range
    assert cells[y // 8, x // 8] >= seen.max() - 0.05 * span
    # ... and darkest where the map is lowest.
    y, x = np.unravel_index(np.argmin(np.where(lum < 0, np.inf, lum)), lum.shape)
    assert cells[y // 8, x // 8] <= seen.min() + 0.05 * span


def test_a_new_images_map_equals_its_cached_map_for_files_and_arrays(tiny, tmp_path):
    """cam maps of new images need no extraction and equal the map of the same image in a cache; window maps
    extract the image first and equal the cached image's window map."""
    import featurecache
    from featurecache.maps import localization_map

    predictor = featurecache.load_head(tiny["mil"])
    file = _image_files(tiny["voc"])[4]
    cached = localization_map(tiny["mil"], tiny["cache"], file.stem)
    for image in (file, np.asarray(Image.open(file).convert("RGB"))):
        m = predictor.localization_map(image)
        assert m.method == "cam"
        np.testing.assert_allclose(m.scores, cached.scores, atol=1e-5)
    m = predictor.localization_map(file, method="windows", stride=4)
    cached = localization_map(tiny["mil"], tiny["cache"], file.stem, method="windows", stride=4)
    np.testing.assert_allclose(m.scores, cached.scores, atol=2e-3)  # features re-extracted: float16 rounding
    with pytest.raises(PredictError, match="method: must be one of cam"):
        predictor.localization_map(file, method="gradcam")


def test_an_image_heads_maps_are_cams_and_its_window_maps_say_why_not(tiny, tmp_path):
    from featurecache.train import fit_objective

    head = fit_objective(tiny["cache"], objective="image", train_split="train", progress=False)
    path = head.save(tmp_path / "image.head.pt")
    image = str(tiny["voc"] / "JPEGImages" / "im0.jpg")
    out = tmp_path / "p.json"
    r = CliRunner().invoke(main, ["predict", str(path), image, "--maps", str(tmp_path / "maps"), "--out", str(out),
                                  "--top", "2", "--workers", "0", "-q"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1] == f"maps: 1 PNG picture(s) in {tmp_path / 'maps'}"
    rec = json.loads(out.read_text())["images"][0]
    assert Path(rec["map"]).is_file() and set(rec["boxes"]) == {"cat", "dog"}
    x0, y0, x1, y1 = rec["boxes"][rec["top"][0]["class"]]
    assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 48
    r = CliRunner().invoke(main, ["predict", str(path), image, "--maps", str(tmp_path / "maps2"), "--map-method",
                                  "windows", "--workers", "0", "-q"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1].startswith("no maps: the windows map averages patch scores, which an image head "
                                                "does not have")
    assert not (tmp_path / "maps2").exists()


def _with_extraction(head_path, tmp_path, **backbone):
    from featurecache.heads import TrainedHead

    head = TrainedHead.load(head_path)
    head.recipe = dataclasses.replace(head.recipe, backbone={**head.recipe.backbone, **backbone})
    return head.save(tmp_path / "edited.head.pt")


def test_weights_that_are_missing_or_differ_are_refused_in_one_line(tiny, tmp_path):
    import torch

    from featurecache.backbones import build_backbone

    image = str(tiny["voc"] / "JPEGImages" / "im0.jpg")
    gone = _with_extraction(tiny["patch"], tmp_path, weights=str(tmp_path / "gone.pth"))
    r = CliRunner().invoke(main, ["predict", str(gone), image])
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert f"{gone}: " in r.output and "gone.pth: the weights file" in r.output and "--weights" in r.output
    # Weights found, but other ones: the file is named and so is the hash that differs.
    net = build_backbone("efficientnet_lite0")
    state = {k: v.clone() for k, v in net.body.state_dict().items()}
    first = next(k for k, v in state.items() if v.dtype.is_floating_point)
    state[first] += 0.01
    other = tmp_path / "other.pth"
    torch.save(state, other)
    r = CliRunner().invoke(main, ["predict", str(tiny["patch"]), image, "--weights", str(other)])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert str(tiny["patch"]) in r.output and "weights_sha256" in r.output and str(other) in r.output
    # Random weights cannot be made again.
    random = _with_extraction(tiny["patch"], tmp_path, weights="none")  # as written before random weights were seeded
    with pytest.raises(PredictError, match="unseeded random weights"):
        import featurecache

        featurecache.load_head(random).predict(image)


def test_a_head_without_an_extraction_record_is_refused(tmp_path):
    import featurecache
    from featurecache.train import fit_objective

    from conftest import blob_cache

    head = fit_objective(blob_cache(tmp_path / "b.h5"), objective="patch", head="logreg")
    head.recipe = None  # as in head files written before heads recorded it
    with pytest.raises(PredictError, match="does not record how its features were extracted"):
        featurecache.load_head(head.save(tmp_path / "h.pt"))
    r = CliRunner().invoke(main, ["predict", str(tmp_path / "b.h5"), "x.jpg"])
    assert r.exit_code == 1 and "not a readable head file" in r.output and r.output.count("\n") == 1


def test_localize_png_draws_a_cached_image(tiny, tmp_path):
    png = tmp_path / "m.png"
    r = CliRunner().invoke(main, ["localize", str(tiny["mil"]), str(tiny["cache"]), "im1", "--png", str(png),
                                  "--class", "cat"])
    assert r.exit_code == 0, r.output
    assert Image.open(png).size == (64, 48) and str(png) in r.output
    r = CliRunner().invoke(main, ["localize", str(tiny["mil"]), str(tiny["cache"]), "im1", "--png", str(png),
                                  "--class", "horse"])
    assert r.exit_code == 1 and "no class 'horse'" in r.output


def test_bad_options_name_their_flag(tiny):
    jpegs = str(tiny["voc"] / "JPEGImages")
    r = CliRunner().invoke(main, ["predict", str(tiny["patch"]), jpegs, "--split", "val"])
    assert r.exit_code == 1 and "--split: " in r.output and "VOC devkit" in r.output
    r = CliRunner().invoke(main, ["predict", str(tiny["patch"]), str(tiny["root"]), "--split", "val", "-q"])
    assert r.exit_code == 0 and "2 images: 2 scored" in r.output  # the devkit inside, its val split
    with pytest.raises(PredictError, match="top: must be a positive integer"):
        from featurecache.predict import PredictConfig

        PredictConfig(top=0)


def test_the_api_docs_example_runs(tmp_path, monkeypatch):
    """docs/api.md's example, as written, on a tiny trained head named as it names it."""
    import re

    root = tmp_path / "work"
    head = tiny_trained_head(root, head="logreg")
    shutil.copy(head, tmp_path / "voc.head.pt")
    shutil.copytree(root / "voc" / "JPEGImages", tmp_path / "photos")
    (tmp_path / "extra").mkdir()
    shutil.copy(root / "voc" / "JPEGImages" / "im1.jpg", tmp_path / "extra" / "cat.jpg")
    monkeypatch.chdir(tmp_path)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    shutil.copy(root / "tiny.h5", tmp_path / "voc.h5")  # its images stay where the cache says
    predicting, maps = re.findall(r"```python\n(.*?)```", doc, flags=re.S)[:2]
    scope: dict = {}
    exec(compile(predicting, "docs/api.md", "exec"), scope)  # noqa: S102 - the project's own documentation
    assert scope["result"].n_scored == 7 and scope["matrix"].shape == (7, 2)
    assert Image.open("cat-map.png").size == (64, 48) and Path("predictions.csv").is_file()
    x0, y0, x1, y1 = scope["x0"], scope["y0"], scope["x1"], scope["y1"]
    assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 48
    scope = {}
    exec(compile(maps, "docs/api.md", "exec"), scope)  # noqa: S102
    assert scope["m"].scores.shape == (2, 6, 8) and scope["report"].pairs.sum() == 2  # two val images, one class


def test_hostile_inputs_get_error_rows_and_names_stay_local(tiny, tmp_path):
    """What a red-team run found: odd names, arrays and modes, changed files under a kept cache."""
    import os

    import featurecache

    predictor = featurecache.load_head(tiny["mil"])
    src = _image_files(tiny["voc"])
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        shutil.copy(src[0], tmp_path / d / "x.jpg")
    bad = os.fsencode(tmp_path) + b"/bad\xff.jpg"
    with open(bad, "wb") as f:
        f.write(src[1].read_bytes())
    result = predictor.predict([tmp_path / "a", tmp_path / "b", bad, np.zeros((0, 5, 3), np.uint8)],
                               maps=tmp_path / "maps", workers=0)
    assert result.errors[:2] == ["", ""] and "not valid UTF-8" in result.errors[2]
    assert "non-empty" in result.errors[3]
    # What ran the network is recorded: the features' runtime (the cache's) and the cam maps' trunk.
    assert result.runtimes["features"].split()[0] in ("torch", "openvino", "onnxruntime")
    assert "dense trunk" in result.runtimes["maps"] or result.runtimes["maps"].startswith("torch")
    assert json.loads(result.to_json())["runtimes"] == result.runtimes
    # Map names come from the image's place in its input folder, not from a common parent.
    assert sorted(Path(m).relative_to(tmp_path / "maps").as_posix().split(".")[0] for m in result.maps[:2]) == [
        "x", "x-2"]
    # A 16-bit PIL image is converted as the same file is.
    g16 = tmp_path / "g16.png"
    Image.fromarray((np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20)).save(g16)
    a, b = predictor.predict([g16, Image.open(g16)], workers=0).scores
    np.testing.assert_allclose(a, b, rtol=1e-5)
    # A kept cache is not reused for a file that changed since.
    kept, image = tmp_path / "kept.h5", tmp_path / "a" / "x.jpg"
    first = predictor.predict([image], cache=kept, workers=0).scores
    shutil.copy(src[3], image)
    with pytest.raises(CacheError, match="other settings.*--overwrite"):  # the kept cache's own error
        predictor.predict([image], cache=kept, workers=0)
    second = predictor.predict([image], cache=kept, overwrite=True, workers=0).scores
    assert not np.allclose(first, second)
    with pytest.raises(PredictError, match="takes one image"):
        predictor.localization_map(tmp_path / "a" if len(list((tmp_path / "a").iterdir())) > 1 else [image])


def _sideways(upright: Image.Image, orientation: int) -> Image.Image:
    """What a camera stores for ``upright`` with EXIF ``orientation``: exif_transpose gives ``upright`` back."""
    stored = {3: Image.ROTATE_180, 6: Image.ROTATE_90, 8: Image.ROTATE_270}[orientation]
    out = upright.transpose(stored)
    exif = Image.Exif()
    exif[0x0112] = orientation
    out.info["exif"] = exif.tobytes()
    return out


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_new_images_are_scored_as_displayed_exif_orientation_applied(tiny, tmp_path, orientation):
    from PIL import ImageOps

    import featurecache

    rng = np.random.default_rng(orientation)
    upright = Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8))
    upright.save(tmp_path / "upright.png")
    sideways = _sideways(upright, orientation)
    sideways.save(tmp_path / "sideways.png", exif=sideways.info["exif"])
    with Image.open(tmp_path / "sideways.png") as check:  # the file really is stored turned, tagged to display upright
        assert np.array_equal(np.asarray(ImageOps.exif_transpose(check)), np.asarray(upright))
        assert orientation == 3 or check.size == (48, 80)
    head = featurecache.load_head(tiny["mil"], device="cpu")
    got = head.predict([tmp_path / "upright.png", tmp_path / "sideways.png", Image.open(tmp_path / "sideways.png")],
                       workers=0, progress=False, maps=tmp_path / "maps")
    assert not any(got.errors) and list(got.width) == [80] * 3 and list(got.height) == [48] * 3
    np.testing.assert_array_equal(got.scores[1], got.scores[0])  # the file, as displayed
    np.testing.assert_array_equal(got.scores[2], got.scores[0])  # an opened PIL image, likewise
    for picture in got.maps:
        with Image.open(picture) as im:
            assert im.size == (80, 48)  # drawn on the displayed image


def test_data_sets_follow_their_annotations_size_for_exif(tmp_path, lite0):
    """VOC boxes refer to the stored pixels, unless the annotated size is the displayed one; folder layouts
    (sizes read from the files) describe images as displayed."""
    from featurecache.cache import FeatureCache
    from featurecache.datasets import read_dataset

    from conftest import write_voc_xml

    rng = np.random.default_rng(0)
    upright = Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8))
    sideways = _sideways(upright, 6)  # stored 48 wide, 80 high
    voc = tmp_path / "voc"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "Annotations").mkdir()
    for name in ("stored", "shown"):
        sideways.save(voc / "JPEGImages" / f"{name}.png", exif=sideways.info["exif"])
    write_voc_xml(voc / "Annotations" / "stored.xml", "stored.png", 48, 80, [("cat", 1, 1, 20, 20)])
    write_voc_xml(voc / "Annotations" / "shown.xml", "shown.png", 80, 48, [("cat", 1, 1, 20, 20)])
    plain = tmp_path / "plain"
    plain.mkdir()
    sideways.save(plain / "a.png", exif=sideways.info["exif"])
    assert [(r.width, r.height) for r in read_dataset(plain)] == [(80, 48)]  # the displayed size
    refs = tmp_path / "refs"
    refs.mkdir()
    upright.save(refs / "upright.png")
    sideways.save(refs / "stored.png")  # no EXIF: the stored pixels as they are
    feats = {}
    for name, root in (("voc", voc), ("plain", plain), ("refs", refs)):
        _extract(root, tmp_path / f"{name}.h5", backbone=lite0)
        with FeatureCache(tmp_path / f"{name}.h5") as c:
            feats.update({(name, Path(p).stem): c.select([i]).read_features() for i, p in enumerate(c.images.path)})
    np.testing.assert_array_equal(feats["voc", "stored"], feats["refs", "stored"])
    np.testing.assert_array_equal(feats["voc", "shown"], feats["refs", "upright"])
    np.testing.assert_array_equal(feats["plain", "a"], feats["refs", "upright"])


def test_images_the_head_gives_non_finite_scores_are_error_rows_and_the_json_stays_valid(tiny, tmp_path,
                                                                                          monkeypatch):
    import featurecache
    from featurecache.heads.trained import TrainedHead

    real = TrainedHead.image_scores

    def nan_for_the_first(self, cache, *args, **kwargs):
        s = real(self, cache, *args, **kwargs)
        s[0] = np.nan
        s[1, 0] = np.inf
        return s

    monkeypatch.setattr(TrainedHead, "image_scores", nan_for_the_first)
    files = _image_files(tiny["voc"])[:3]
    got = featurecache.load_head(tiny["mil"], device="cpu").predict(files, workers=0, progress=False,
                                                                    out=tmp_path / "p.json")
    assert got.n_scored == 1 and got.n_failed == 2 and all("not finite" in e for e in got.errors[:2])
    data = json.loads((tmp_path / "p.json").read_text())  # strict JSON: no NaN or Infinity
    assert [rec["scores"] for rec in data["images"][:2]] == [{}, {}]
    text = (tmp_path / "p.json").read_text()
    assert ": NaN" not in text and "Infinity" not in text

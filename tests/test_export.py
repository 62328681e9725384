"""featurecache export: the ONNX model's scores are predict's (fixed size and dynamic), its maps featurecache's;
its metadata; the deploy example; bad inputs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from featurecache.cli import main
from featurecache.deploy import (
    CHECK_TOLERANCE,
    ExportConfig,
    ExportedModel,
    axis_resize_matrix,
    check_export,
    export,
    read_metadata,
)
from featurecache.deploy_graph import crop_geometry, dense_geometry, map_sampling, resize_weights
from featurecache.errors import ExportError
from featurecache.heads.graph import score_module
from featurecache.heads.trained import TrainedHead
from featurecache.patches import PatchGrid

from conftest import blob_cache, make_voc

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

DOCS = Path(__file__).resolve().parent.parent / "docs" / "deploy.md"
SIZE = (64, 48)  # the tiny set's images: predict and the model see the same pixels


# --------------------------------------------------------------------------- the head as a module (no backbone)


@pytest.mark.parametrize("objective, options", [
    ("patch", {"epochs": 5}),
    ("patch", {"head": "logreg"}),
    ("patch", {"head": "linearsvm"}),
    ("image", {}),
    ("image", {"image_head": "mlp", "image_pooling": "scales+max", "image_epochs": 10}),
    ("image", {"image_pooling": "coarse+mean"}),
    ("mil", {"image_epochs": 10}),
    ("mil", {"aggregation": "max", "image_epochs": 15}),
    ("mil", {"aggregation": "lse:3", "image_epochs": 10}),
    ("hybrid", {"image_epochs": 10}),
])
def test_score_module_is_image_scores(tmp_path, objective, options):
    from featurecache.cache import FeatureCache
    from featurecache.train import fit_objective

    path = blob_cache(tmp_path / "blobs.h5", n_images=24, patches=10, dim=12)
    head = fit_objective(path, objective=objective, progress=False, **options)
    with FeatureCache(path) as cache:
        want = head.image_scores(cache)
        X, image, scales = cache.read_features(), cache.image_index, cache.scales
    for i in range(0, 24, 5):
        rows = image == i
        module = score_module(head, scales[rows])
        with torch.no_grad():
            got = module(torch.from_numpy(np.asarray(X[rows], np.float32))).numpy()
        assert got.dtype == np.float64
        scale = max(np.abs(want).max(), 1e-6)
        assert np.abs(got - want[i]).max() <= 1e-6 * scale, (objective, options, i)
    # What a cam map scores every trunk cell with: TrainedHead.region_scores.
    with torch.no_grad():
        regions = module.regions(torch.from_numpy(np.asarray(X[:30], np.float32))).numpy()
    want = head.region_scores(np.asarray(X[:30], np.float32))
    assert regions.shape == want.shape and np.abs(regions - want).max() <= 1e-6, (objective, options)


@pytest.mark.parametrize("grid", [PatchGrid(scales=(1.0, 1.3, 2.0, 3.6), input_size=64),
                                  PatchGrid(scales=(1.0, 2.4), min_overlap=0.3, input_size=96),
                                  PatchGrid(whole=True, input_size=64)])
def test_geometry_in_the_graph_is_the_grids(grid):
    """The boxes and dense windows a dynamic graph computes from the image's shape are the grid's, exactly."""
    rng = np.random.default_rng(0)
    sizes = [(500, 375), (375, 500), (64, 64), (333, 500), (96, 97)] + [tuple(rng.integers(40, 700, 2)) for _ in
                                                                        range(40)]
    for w, h in sizes:
        boxes, scales = crop_geometry(torch.tensor(h), torch.tensor(w), grid)
        want_boxes, want_scales = grid.boxes_and_scales(w, h)
        assert np.array_equal(boxes.numpy(), want_boxes) and np.array_equal(scales.numpy(), want_scales), (w, h)
        if grid.whole or grid.input_size % 32:
            continue
        got = dense_geometry(torch.tensor(h), torch.tensor(w), grid)
        for (lam, rw, rh, xs, ys), (lam2, rw2, rh2, xs2, ys2) in zip(got, grid.dense_layout(w, h, stride=32)):
            assert (lam, int(rw), int(rh)) == (lam2, rw2, rh2), (w, h, lam)
            assert np.array_equal(xs.numpy(), xs2) and np.array_equal(ys.numpy(), ys2), (w, h, lam)


def test_resize_weights_in_the_graph_are_torchs():
    for n_in, n_out in ((375, 224), (500, 1195), (48, 64), (37, 36), (64, 64), (333, 96)):
        got = resize_weights(torch.tensor(n_in), torch.tensor(n_out))
        assert float((got - axis_resize_matrix(n_in, n_out)).abs().max()) < 1e-6, (n_in, n_out)


def test_map_sampling_is_the_maps_sampling():
    """map_sampling's matrices sample a cell map as featurecache.maps._sample (grid_sample) does."""
    from featurecache.maps import _centres, _sample

    gen = torch.Generator().manual_seed(0)
    for w, h, rw, rh, centre in ((500, 375, 320, 224, 16.0), (64, 48, 96, 64, 16.0), (30, 200, 32, 224, 16.0),
                                 (500, 375, 448, 320, 112.0)):
        logit = torch.randn(1, 3, rh // 32, rw // 32, generator=gen)
        want = _sample(logit, _centres(w, 8) * rw / w, _centres(h, 8) * rh / h, centre)
        rows, cols = (map_sampling(torch.tensor(n), torch.tensor(r), torch.tensor(r // 32), 8, centre)
                      for n, r in ((h, rh), (w, rw)))
        got = (rows @ logit[0] @ cols.T).numpy()
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-5, (w, h)


def test_resize_matrices_are_torchs_antialiased_resize():
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 37, 53, generator=gen) * 255
    for h, w in ((64, 96), (32, 32), (160, 224), (20, 30)):
        want = torch.nn.functional.interpolate(image, size=(h, w), mode="bilinear", antialias=True,
                                               align_corners=False)[0]
        got = axis_resize_matrix(37, h).T @ image[0] @ axis_resize_matrix(53, w)
        assert float((got - want).abs().max()) < 1e-4


# --------------------------------------------------------------------------- heads on real Lite0 features


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny noise-image VOC set (64 x 48), its crop and dense caches (scales 1 and 2 at 64 px)."""
    from featurecache.extract import extract

    root = tmp_path_factory.mktemp("export")
    voc = make_voc(root / "voc", {f"im{i}": [("cat" if i % 2 else "dog", 5, 5, 40, 40)] for i in range(6)},
                   splits={"train": [f"im{i}" for i in range(4)], "val": ["im4", "im5"]})
    caches = {mode: extract(voc, root / f"{mode}.h5", grid=PatchGrid(scales=(1.0, 2.0), input_size=64), mode=mode,
                            workers=0, progress=False).path for mode in ("crop", "dense")}
    return root, voc, caches


def _head(tiny, mode, objective, **options) -> Path:
    from featurecache.train import fit_objective

    root, _, caches = tiny
    name = "-".join([mode, objective, *(f"{k}{v}" for k, v in options.items())]).replace(":", "")
    path = root / f"{name}.head.pt"
    if not path.exists():  # few epochs: the export must match whatever the head learnt
        quick = {"epochs": 5} if objective == "patch" else (
            {"image_epochs": 20} if objective in ("mil", "hybrid", "fusion") else {})
        fit_objective(caches[mode], objective=objective, train_split="train", progress=False,
                      **{**quick, **options}).save(path)
    return path


def _images(tiny) -> list:
    return sorted((tiny[1] / "JPEGImages").glob("*.jpg"))


@pytest.fixture(scope="module")
def patch_model(tiny, tmp_path_factory):
    """The crop-mode patch head exported at the images' size and checked on them: ``(head, ExportResult)``."""
    head = _head(tiny, "crop", "patch")
    return head, export(head, tmp_path_factory.mktemp("model") / "patch.onnx", input_size=SIZE, check=_images(tiny))


def test_exported_crop_model_scores_as_predict(patch_model):
    _, result = patch_model
    check = result.check
    assert check.passed and check.top1_agreement == 1.0
    assert check.relative_difference <= CHECK_TOLERANCE
    assert check.exported.shape == (6, 2)
    assert "check on 6 image(s)" in result.to_text()


def test_a_fixed_crop_grid_runs_over_chunks_of_patches_with_the_same_scores(tiny, patch_model, tmp_path,
                                                                             monkeypatch):
    """The backbone runs over chunks of PATCH_CHUNK patches (bounded memory at the paper's grid)."""
    import onnx

    import featurecache.deploy_graph as graph

    head, whole = patch_model
    monkeypatch.setattr(graph, "PATCH_CHUNK", 2)
    result = export(head, tmp_path / "chunks.onnx", input_size=SIZE, check=_images(tiny))
    nodes = [n.op_type for n in onnx.load(str(tmp_path / "chunks.onnx")).graph.node]
    assert result.patches > 2 and nodes.count("RoiAlign") == -(-result.patches // 2)
    assert result.check.passed and result.check.top1_agreement == 1.0
    np.testing.assert_allclose(result.check.exported, whole.check.exported, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("mode, objective, options", [
    ("crop", "mil", {}),
    ("crop", "image", {"image_pooling": "scales+max"}),
    ("crop", "fusion", {}),
    ("dense", "patch", {}),
    ("dense", "hybrid", {}),
    ("dense", "image", {}),
])
def test_every_objective_and_mode_scores_as_predict(tiny, tmp_path, mode, objective, options):
    head = _head(tiny, mode, objective, **options)
    result = export(head, tmp_path / "m.onnx", input_size=SIZE, check=_images(tiny))
    assert result.check.passed, result.check.to_text()
    assert result.mode == mode


@pytest.mark.slow
def test_module_in_torch_is_the_onnx_model(tiny, tmp_path):
    """The traced graph computes what the torch module computes (dense mode: resizes, trunk, windows)."""
    import onnxruntime as ort

    head = _head(tiny, "dense", "mil")
    path = export(head, tmp_path / "d.onnx", input_size=(96, 64)).path
    trained = TrainedHead.load(head, device="cpu")
    model = ExportedModel(trained, trained.new_images_recipe().build_backbone(), (96, 64))
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    with torch.no_grad():
        want = model(torch.from_numpy(image)).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": image})[0]
    assert got.shape == want.shape == (2,)
    # ONNX Runtime's convolutions round differently from torch's; a head trained to convergence (L-BFGS) and the
    # features' float16 rounding magnify that, so the bound is the export's own (--check's, the acceptance's).
    assert np.abs(got - want).max() <= CHECK_TOLERANCE * max(np.abs(want).max(), 1e-6)


@pytest.fixture(scope="module")
def sized_images(tmp_path_factory):
    """Noise JPEGs of four sizes (and orientations): what a dynamic model takes as they are."""
    from PIL import Image

    root = tmp_path_factory.mktemp("sizes")
    rng = np.random.default_rng(1)
    paths = []
    for w, h in ((64, 48), (81, 57), (56, 72), (100, 61)):
        paths.append(root / f"noise-{w}x{h}.jpg")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def dynamic_model(tiny, sized_images, tmp_path_factory):
    """The crop-mode patch head exported for any size with maps, checked on images of four sizes."""
    head = _head(tiny, "crop", "patch")
    path = tmp_path_factory.mktemp("dynamic") / "dynamic.onnx"
    return head, export(head, path, dynamic=True, maps=True, check=sized_images)


def test_dynamic_model_scores_and_maps_as_featurecache_at_every_size(dynamic_model, sized_images):
    _, result = dynamic_model
    check = result.check
    assert result.size is None and result.patches is None
    assert check.passed and check.relative_difference <= CHECK_TOLERANCE, check.to_text()
    assert check.maps is not None and check.maps.relative_difference <= CHECK_TOLERANCE, check.maps.to_text()
    # Each image at its own size: ceil(size / 8) cells, as featurecache's maps.
    assert [m.shape for m in check.maps.exported] == [(6, 8, 2), (8, 11, 2), (9, 7, 2), (8, 13, 2)]
    assert "maps of 4 image(s)" in result.to_text() and "any-size" in result.to_text()


def test_a_dynamic_crop_model_loops_over_chunks_of_patches_with_the_same_scores(dynamic_model, patch_model,
                                                                                sized_images, tmp_path, monkeypatch):
    """A dynamic crop graph runs the backbone in a Loop over PATCH_CHUNK patches at a time (its number of patches
    is known at run time only), so that it holds one chunk's activations: chunks of 2 give the same scores."""
    import onnx
    import onnxruntime as ort

    import featurecache.deploy_graph as graph

    head, whole = dynamic_model
    monkeypatch.setattr(graph, "PATCH_CHUNK", 2)
    result = export(head, tmp_path / "loop.onnx", dynamic=True, check=sized_images)
    model = onnx.load(str(result.path))
    (loop,) = [n for n in model.graph.node if n.op_type == "Loop"]
    body = loop.attribute[0].g
    assert "RoiAlign" not in [n.op_type for n in model.graph.node]
    assert [n.op_type for n in body.node].count("RoiAlign") == 1
    assert result.check.passed, result.check.to_text()
    for a, b in zip(result.check.exported, whole.check.exported):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # The body holds the weights its convolutions read (ONNX Runtime optimises those it owns), stored once:
    # as many as a fixed-size model of the same head has.
    convs = {n.input[1] for n in body.node if n.op_type == "Conv"}
    assert convs and convs <= {w.name for w in body.initializer}
    # ... and ONNX Runtime fuses the TF-"same" paddings into them, as in a fixed-size graph.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(result.path), options, providers=["CPUExecutionProvider"])
    optimised = onnx.load(options.optimized_model_filepath)
    (loop,) = [n for n in optimised.graph.node if n.op_type == "Loop"]
    assert "Pad" not in [n.op_type for n in loop.attribute[0].g.node]
    weights = [sum(int(np.prod(w.dims)) for w in list(m.graph.initializer) + list(body.initializer))
               for m, body in ((model, body), (onnx.load(str(patch_model[1].path)), onnx.GraphProto()))]
    assert weights[0] < 1.1 * weights[1]


def test_static_padding_is_the_same_network_at_its_input_size(tiny):
    """The loop's backbone: TF-"same" convolutions padded by constants give the same features at the crop size."""
    from featurecache.deploy_graph import static_padding

    root, _, caches = tiny
    trained = TrainedHead.load(_head(tiny, "crop", "patch"), device="cpu")
    net = trained.new_images_recipe().build_backbone()
    static = static_padding(net, torch.zeros(1, 3, 64, 64))
    crops = torch.from_numpy(np.random.default_rng(0).uniform(0, 255, (3, 3, 64, 64)).astype(np.float32))
    kinds = [type(m).__name__ for m in static.modules()]
    assert "Conv2dSame" in [type(m).__name__ for m in net.modules()] and "Conv2dSame" not in kinds
    with torch.no_grad():
        assert torch.equal(static(crops), net(crops))


def test_dynamic_model_metadata(dynamic_model):
    _, result = dynamic_model
    meta = read_metadata(result.path)
    assert meta["featurecache.input"]["width"] is None and meta["featurecache.input"]["height"] is None
    maps = meta["featurecache.maps"]
    assert maps["method"] == "cam" and maps["stride"] == 8 and maps["rows"] is None and maps["scales"] == [1.0, 2.0]
    assert maps["layout"] == "rows, columns, classes"


def test_fixed_size_model_with_maps(tiny, tmp_path):
    """A fixed-size crop model's maps are featurecache's; their grid is in the metadata; a changed map fails."""
    import onnxruntime as ort

    from featurecache.deploy import MapCheck

    head = _head(tiny, "crop", "mil")
    result = export(head, tmp_path / "maps.onnx", input_size=SIZE, maps=True, stride=16, check=_images(tiny))
    assert result.check.maps.passed, result.check.to_text()
    maps = read_metadata(result.path)["featurecache.maps"]
    assert (maps["rows"], maps["columns"], maps["stride"]) == (3, 4, 16)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["scores", "maps"]
    assert session.run(None, {"image": np.zeros((48, 64, 3), np.uint8)})[1].shape == (3, 4, 2)
    # The comparison can fail: a map off by 1e-3 of its scale is beyond the tolerance.
    check = result.check.maps
    moved = MapCheck(tuple(m + 1e-3 * check.scale for m in check.exported), check.predicted, 1.0)
    assert not moved.passed and moved.relative_difference > CHECK_TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("mode, objective, options", [
    ("dense", "patch", {}),
    ("dense", "image", {"image_pooling": "scales+max"}),
    ("crop", "image", {"image_pooling": "coarse+mean"}),
    ("crop", "fusion", {}),
])
def test_dynamic_models_of_every_kind(tiny, sized_images, tmp_path, mode, objective, options):
    head = _head(tiny, mode, objective, **options)
    result = export(head, tmp_path / "d.onnx", dynamic=True, maps=True, check=sized_images)
    assert result.check.passed, result.check.to_text()


def test_input_size_and_dynamic_exclude_each_other(tiny, tmp_path):
    head = _head(tiny, "crop", "patch")
    with pytest.raises(ExportError) as e:
        export(head, tmp_path / "b.onnx", input_size=SIZE, dynamic=True)
    assert e.value.param == "dynamic" and "input_size" in str(e.value)
    with pytest.raises(ExportError) as e:
        export(head, tmp_path / "b.onnx")
    assert e.value.param == "input_size"
    for bad in ("64,48", (64,), (64.5, 48), 64):
        with pytest.raises(ExportError, match="whole pixels"):
            ExportConfig(input_size=bad)
    r = CliRunner().invoke(main, ["export", str(head), str(tmp_path / "b.onnx"), "--input-size", "64,48",
                                  "--dynamic"])
    assert r.exit_code == 2 and "--input-size" in r.output and "--dynamic" in r.output
    assert not (tmp_path / "b.onnx").exists()


@pytest.mark.parametrize("method", ["windows", "cam*windows", "attention"])
def test_map_methods_other_than_cam_are_one_line(tiny, tmp_path, method):
    with pytest.raises(ExportError) as e:
        ExportConfig(input_size=SIZE, maps=True, map_method=method)
    assert e.value.param == "map_method" and method in str(e.value) and "\n" not in str(e.value)
    r = CliRunner().invoke(main, ["export", str(_head(tiny, "crop", "patch")), str(tmp_path / "w.onnx"),
                                  "--input-size", "64,48", "--maps", "--map-method", method])
    assert r.exit_code == 1 and r.output.startswith("Error: --map-method:") and r.output.count("\n") == 1


def test_metadata_says_what_a_consumer_needs(tiny, patch_model):
    import featurecache
    from featurecache.deploy import _metadata

    head, result = patch_model
    meta = read_metadata(result.path)
    assert meta["featurecache.classes"] == ["cat", "dog"]
    assert meta["featurecache.input"] == {"name": "image", "layout": "HWC", "dtype": "uint8", "channels": "RGB",
                                          "width": 64, "height": 48}
    assert meta["featurecache.probabilities"] == "false" and meta["featurecache.threshold"] == ""
    assert "ranking score" in meta["featurecache.scores"]
    assert meta["featurecache.version"] == featurecache.__version__
    prov = meta["featurecache.head"]
    assert prov["objective"] == "patch" and prov["recipe"]["grid"]["scales"] == [1.0, 2.0]
    assert prov["feature_settings"]["mode"] == "crop" and len(prov["source_sha256"]) == 64
    mil = TrainedHead.load(_head(tiny, "crop", "mil"), device="cpu")
    props = _metadata(mil, mil.new_images_recipe(), "mil.head.pt", 64, 48)
    assert props["featurecache.probabilities"] == "true" and props["featurecache.threshold"] == "0.5"
    assert "probability" in props["featurecache.scores"]


def _deploy_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    assert blocks, "docs/deploy.md has no python block"
    return blocks[0]


@pytest.mark.parametrize("which", ["patch_model", "dynamic_model"])
def test_deploy_example_needs_no_featurecache_nor_torch(tiny, request, tmp_path, which):
    """docs/deploy.md's score_image, run where torch and featurecache cannot be imported, gives predict's scores
    (a fixed-size model, and a dynamic one with maps given an image at its own size)."""
    head, result = request.getfixturevalue(which)
    model, image = result.path, Path(result.check.names[1])
    block = tmp_path / "example.py"
    block.write_text(_deploy_block())
    script = (
        "import importlib.abc, json, sys\n"
        "class Refuse(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'featurecache', 'torchvision', 'timm', 'h5py'):\n"
        "            raise ImportError(name + ' is not available here')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        f"exec(open({str(block)!r}).read())\n"
        f"scores = score_image({str(model)!r}, {str(image)!r})\n"
        "assert not {'torch', 'featurecache'} & set(sys.modules)\n"
        "print(json.dumps(scores))\n")
    site = sorted({str(Path(m.__file__).resolve().parents[1]) for m in _modules("numpy", "onnxruntime", "PIL")})
    env = {"PYTHONPATH": ":".join(site), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-I", "-S", "-c", f"import sys; sys.path[:0] = {site!r}\n" + script],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    scores = json.loads(run.stdout.strip().splitlines()[-1])
    want = dict(zip(result.classes, result.check.predicted[1].tolist()))  # predict's scores of that image
    assert scores.keys() == want.keys()
    assert max(abs(scores[k] - want[k]) for k in want) <= CHECK_TOLERANCE * max(max(want.values()), 1e-6)


def test_deploy_maps_example_finds_featurecaches_peaks(dynamic_model):
    """docs/deploy.md's map_peaks (its second python block) gives LocalizationMap.peak of featurecache's map."""
    from featurecache.images import load_rgb
    from featurecache.maps import LocalizationMap

    _, result = dynamic_model
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    namespace = {}
    exec(blocks[0] + "\n" + blocks[1], namespace)
    pixels = load_rgb(result.check.names[3])
    peaks = namespace["map_peaks"](result.path, pixels)
    want = LocalizationMap("x", result.classes, result.check.maps.predicted[3].transpose(2, 0, 1), 8,
                           pixels.shape[1], pixels.shape[0], "patch")
    for c, name in enumerate(result.classes):
        score, x, y = want.peak(c)
        assert peaks[name][1:] == (x, y) and abs(peaks[name][0] - score) <= CHECK_TOLERANCE * max(score, 1e-6)


def _modules(*names):
    import importlib

    return [importlib.import_module(n) for n in names]


# --------------------------------------------------------------------------- bad inputs: one line each


def test_old_head_file_is_one_line(tiny, tmp_path):
    from featurecache.heads.recipe import OLD_HEAD

    trained = TrainedHead.load(_head(tiny, "crop", "patch"), device="cpu")
    trained.recipe = None
    old = trained.save(tmp_path / "old.head.pt")
    with pytest.raises(ExportError) as e:
        export(old, tmp_path / "old.onnx", input_size=SIZE)
    assert OLD_HEAD in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "old.onnx").exists()


def test_input_size_too_small_for_the_grid(tiny, tmp_path):
    with pytest.raises(ExportError) as e:
        export(_head(tiny, "crop", "patch"), tmp_path / "s.onnx", input_size=(12, 40))
    assert e.value.param == "input_size" and "too small" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("raised, said, not_said", [
    # a backbone ONNX cannot express: the exporter's reason, in one line
    ("Exporting the operator 'aten::fancy_op' to ONNX opset version 17 is not supported.\nmore",
     ("cannot be expressed in ONNX", "aten::fancy_op"), ()),
    # memory running out while tracing: says so and what to change
    ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 2466250752 bytes.",
     ("out of memory tracing the model", "--input-size", "efficientnet_lite0"), ("cannot be expressed",)),
])
def test_exporter_failures_are_one_line(tiny, tmp_path, monkeypatch, raised, said, not_said):
    def fail(*args, **kwargs):
        raise RuntimeError(raised)

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(ExportError) as e:
        export(_head(tiny, "crop", "patch"), tmp_path / "m.onnx", input_size=SIZE)
    message = str(e.value)
    assert all(s in message for s in said) and "\n" not in message
    assert not any(s in message for s in not_said) and not (tmp_path / "m.onnx").exists()


def test_rank_fusion_is_refused(tiny, tmp_path):
    head = _head(tiny, "crop", "fusion", fusion_rule="rank")
    with pytest.raises(ExportError, match="rank"):
        export(head, tmp_path / "r.onnx", input_size=SIZE)


@pytest.mark.slow
def test_mismatch_beyond_tolerance_is_an_error(tiny, tmp_path, monkeypatch):
    import featurecache.deploy as deploy

    monkeypatch.setattr(deploy, "CHECK_TOLERANCE", 0.0)
    monkeypatch.setattr(deploy.CheckResult, "passed", property(lambda self: False))
    with pytest.raises(ExportError, match="disagrees with predict: check on 6 image"):
        export(_head(tiny, "crop", "patch"), tmp_path / "x.onnx", input_size=SIZE, check=_images(tiny))
    assert (tmp_path / "x.onnx").exists()  # written all the same


# --------------------------------------------------------------------------- the command


def test_cli_export_and_check(tiny, tmp_path):
    head = _head(tiny, "crop", "patch")
    out = tmp_path / "cli.onnx"
    r = CliRunner().invoke(main, ["export", str(head), str(out), "--input-size", "64,48", "--check",
                                  str(tiny[1] / "JPEGImages")])
    assert r.exit_code == 0, r.output
    assert f"exported {out}" in r.output and "top-1 agreement 100.0%" in r.output
    assert "images/s" in r.output


def test_cli_export_errors_are_one_line(tiny, tmp_path):
    head = _head(tiny, "crop", "patch")
    runner = CliRunner()
    r = runner.invoke(main, ["export", str(head), str(tmp_path / "a.onnx"), "--input-size", "10,10"])
    assert r.exit_code == 1 and r.output.startswith("Error: --input-size:") and r.output.count("\n") == 1
    r = runner.invoke(main, ["export", str(head), str(head), "--input-size", "64,48"])
    assert r.exit_code == 1 and "would overwrite HEAD" in r.output and r.output.count("\n") == 1
    r = runner.invoke(main, ["export", str(head), str(tmp_path / "a.onnx"), "--input-size", "64"])
    assert r.exit_code == 2 and "WIDTH,HEIGHT" in r.output
    r = runner.invoke(main, ["export", str(head), str(tmp_path / "a.onnx"), "--input-size", "64,48", "x.jpg"])
    assert r.exit_code == 2 and "--check" in r.output


@pytest.mark.slow
def test_check_export_of_a_written_model(tiny, tmp_path):
    head = _head(tiny, "dense", "mil")
    path = export(head, tmp_path / "c.onnx", input_size=SIZE).path
    result = check_export(path, head, _images(tiny)[:2], runtime="torch")
    assert len(result.names) == 2 and result.top1_agreement == 1.0
    assert result.relative_difference <= CHECK_TOLERANCE, result.to_text()


def test_the_package_offers_export():
    import featurecache
    import featurecache.deploy

    assert featurecache.export is featurecache.deploy.export

"""featurecache export: the ONNX model's scores are predict's; its metadata; the deploy example; bad inputs."""

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
    ExportedModel,
    axis_resize_matrix,
    check_export,
    export,
    read_metadata,
)
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
    model = ExportedModel(trained, trained.new_images_recipe().build_backbone(), 96, 64)
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    with torch.no_grad():
        want = model(torch.from_numpy(image)).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": image})[0]
    assert got.shape == want.shape == (2,)
    # ONNX Runtime's convolutions round differently from torch's; a head trained to convergence (L-BFGS) and the
    # features' float16 rounding magnify that, so the bound is the export's own (--check's, the acceptance's).
    assert np.abs(got - want).max() <= CHECK_TOLERANCE * max(np.abs(want).max(), 1e-6)


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


def test_deploy_example_needs_no_featurecache_nor_torch(tiny, patch_model, tmp_path):
    """docs/deploy.md's score_image, run where torch and featurecache cannot be imported, gives predict's scores."""
    head, result = patch_model
    model, image = result.path, _images(tiny)[0]
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
    want = dict(zip(result.classes, result.check.predicted[0].tolist()))  # predict's scores of that image
    assert scores.keys() == want.keys()
    assert max(abs(scores[k] - want[k]) for k in want) <= CHECK_TOLERANCE * max(max(want.values()), 1e-6)


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


def test_unexportable_backbone_is_one_line(tiny, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::fancy_op' to ONNX opset version 17 is not supported.\nmore")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    with pytest.raises(ExportError) as e:
        export(_head(tiny, "crop", "patch"), tmp_path / "u.onnx", input_size=SIZE)
    message = str(e.value)
    assert "cannot be expressed in ONNX" in message and "aten::fancy_op" in message and "\n" not in message
    assert "efficientnet_lite0" in message


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

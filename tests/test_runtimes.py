"""Tests of the CPU runtimes (OpenVINO, ONNX Runtime) against torch, and of the thread policy."""

import os

import numpy as np
import pytest
import torch

from featurecache.errors import BackboneError, FeaturecacheError
from featurecache.resources import apply_threads, available_cpus, cpu_threads
from featurecache.runtimes import TOLERANCE, build_runtime, installed_runtimes

from conftest import VOC_IDS

OTHERS = [r for r in ("openvino", "onnxruntime") if r in installed_runtimes()]


def _real_patches(voc_sample, size: int = 96) -> torch.Tensor:
    """Whole real VOC images resized to patches (the sample's first images)."""
    from PIL import Image

    out = []
    for image_id in VOC_IDS[:4]:
        with Image.open(voc_sample / "JPEGImages" / f"{image_id}.jpg") as im:
            out.append(np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), np.float32))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("name", OTHERS)
def test_each_runtime_agrees_with_torch_on_real_images(lite0, voc_sample, name):
    runtime = build_runtime(lite0, name, input_size=96, threads=2)
    assert runtime.name == name
    x = _real_patches(voc_sample)
    with torch.inference_mode():
        ref = lite0(x)
    got = runtime(x)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= TOLERANCE * float(ref.abs().max())
    # Deterministic: the same batch gives the same bits (a resume within a runtime is bit-identical).
    assert torch.equal(runtime(x), got)


@pytest.mark.parametrize("name", OTHERS)
def test_crop_batches_on_parallel_streams_give_the_same_bits_as_one_request(lite0, voc_sample, name):
    """Crop mode runs two streams on 2 threads: a batch split over them, a batch on either stream and
    the runner's pipeline (each stream cuts and runs whole batches) give the same features."""
    import featurecache.runtimes as rt
    from featurecache.runners import PatchRunner

    runtime = build_runtime(lite0, name, input_size=96, threads=2)
    assert runtime.streams == 2 and build_runtime(lite0, name, input_size=96, threads=2, dense=True).streams == 1
    x = torch.cat([_real_patches(voc_sample), _real_patches(voc_sample).flip(-1)[:1]])  # 5: parts of 3 and 2
    whole = runtime(x)
    alone = torch.cat([runtime.on_stream(x[i:i + 1], i % 2) for i in range(len(x))])
    assert torch.equal(whole, alone) and torch.equal(runtime.on_stream(x, 1), whole)
    # One request on all threads (the latency mode before streams) computes the same values.
    rt._COMPILED.clear()
    single = build_runtime(lite0, name, input_size=96, threads=1)
    assert single.streams == 1 and torch.equal(single(x), whole)
    rt._COMPILED.clear()

    image = torch.from_numpy(np.random.default_rng(0).uniform(0, 255, (1, 3, 140, 180)).astype(np.float32))
    x0 = torch.arange(0, 80, 7, dtype=torch.float32)
    boxes = torch.stack([x0, x0 / 2, x0 + 96, x0 / 2 + 96], 1)  # 12 boxes: batches of 5, 5, 2
    runner = PatchRunner(lite0, input_size=96, batch_size=5, device=torch.device("cpu"), out_dtype=np.float32,
                         runtime=runtime)
    got = runner.run([(image, boxes)])
    want = np.concatenate([runtime(runner.crops([(image, boxes[i:i + 5])])).numpy() for i in range(0, 12, 5)])
    assert np.array_equal(got, want)


def test_auto_picks_an_installed_runtime_and_torch_where_only_torch_can(lite0):
    import featurecache.runtimes as rt

    auto = build_runtime(lite0, "auto", input_size=64, threads=1)
    assert auto.name == (OTHERS[0] if OTHERS else "torch")
    # Dense mode on the CPU: the fastest measured installed runtime (torch if none is).
    dense = build_runtime(lite0, "auto", input_size=64, threads=1, dense=True)
    dense_order = [n for n in rt._DENSE_AUTO_ORDER if n in OTHERS]
    assert dense.name == (dense_order[0] if dense_order else "torch") and dense.dense
    assert build_runtime(lite0, "auto", input_size=64, threads=1, device=torch.device("meta")).name == "torch"
    assert build_runtime(lite0, "auto", input_size=64, threads=1, device=torch.device("meta"), dense=True).name \
        == "torch"


def test_a_runtime_that_is_not_installed_names_its_extra(lite0, monkeypatch):
    import featurecache.runtimes as rt

    monkeypatch.setattr(rt, "installed_runtimes", lambda: ("torch",))
    with pytest.raises(BackboneError, match=r'openvino is not installed: pip install "featurecache\[openvino\]"'):
        build_runtime(lite0, "openvino", input_size=64, threads=1)
    assert build_runtime(lite0, "auto", input_size=64, threads=1).name == "torch"


def _fallback_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "--runtime auto" in r.getMessage()]


def test_auto_says_once_why_it_falls_back_to_torch(lite0, monkeypatch, caplog):
    import featurecache.runtimes as rt

    monkeypatch.setattr(rt, "_SAID", set())
    caplog.set_level("WARNING", logger="featurecache")
    # No runtime installed: one warning naming the extra, however many times a runtime is built.
    monkeypatch.setattr(rt, "installed_runtimes", lambda: ("torch",))
    for _ in range(3):
        assert build_runtime(lite0, "auto", input_size=64, threads=1).name == "torch"
    said = _fallback_warnings(caplog)
    assert len(said) == 1 and 'neither OpenVINO nor ONNX Runtime is installed; pip install "featurecache[openvino]"' \
        in said[0]
    # Where only torch can run (CUDA) auto is torch by design: nothing to say.
    caplog.clear()
    build_runtime(lite0, "auto", input_size=64, threads=1, device=torch.device("meta"), dense=True)
    assert _fallback_warnings(caplog) == []


@pytest.mark.skipif(not OTHERS, reason="needs openvino or onnxruntime")
def test_auto_says_why_when_the_export_fails_or_a_runtime_cannot_run_it(lite0, monkeypatch, caplog, tmp_path):
    import featurecache.runtimes as rt

    monkeypatch.setattr(rt, "_SAID", set())
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no export kept from other tests
    caplog.set_level("WARNING", logger="featurecache")

    def broken_export(*args, **kwargs):
        raise RuntimeError("exporter says no")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    assert build_runtime(lite0, "auto", input_size=64, threads=1).name == "torch"
    said = _fallback_warnings(caplog)
    assert len(said) == 1 and "cannot export to ONNX" in said[0] and "exporter says no" in said[0]
    # Runtimes that cannot compile the export (an old OpenVINO, too little memory): each one's reason is named.
    monkeypatch.undo()
    monkeypatch.setattr(rt, "_SAID", set())
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    caplog.clear()

    def cannot_compile(self, *args, **kwargs):
        raise RuntimeError("Exception from src/plugin.cpp:54:\nunsupported operation Foo")

    for cls in (rt._OpenVinoRuntime, rt._OnnxRuntime):
        monkeypatch.setattr(cls, "__init__", cannot_compile)
    assert build_runtime(lite0, "auto", input_size=64, threads=1).name == "torch"
    said = _fallback_warnings(caplog)
    assert len(said) == 1 and all(f"{name} cannot run the exported model (RuntimeError: unsupported operation Foo)"
                                  in said[0] for name in OTHERS), said


@pytest.mark.skipif(not OTHERS, reason="needs openvino or onnxruntime")
def test_extract_records_the_runtime_and_a_resume_with_another_is_refused(tmp_path, lite0):
    from featurecache.cache import CacheError, FeatureCache
    from featurecache.extract import extract
    from featurecache.patches import PatchGrid

    from conftest import make_voc

    voc = make_voc(tmp_path / "voc", {f"i{k}": [("cat", 1, 1, 30, 30)] for k in range(3)})
    grid = PatchGrid(scales=(1.0, 2.0), input_size=64)
    a = extract(voc, tmp_path / "a.h5", backbone=lite0, grid=grid, workers=0, progress=False, runtime=OTHERS[0])
    t = extract(voc, tmp_path / "t.h5", backbone=lite0, grid=grid, workers=0, progress=False, runtime="torch")
    with FeatureCache(a.path) as ca, FeatureCache(t.path) as ct:
        assert ca.attrs["extraction"]["runtime"].startswith(OTHERS[0]) and ca.fingerprint == ct.fingerprint
        fa, ft = ca.read_features(), ct.read_features()
        assert np.abs(fa - ft).max() <= 2e-3 * np.abs(ft).max()  # within tolerance, plus float16 storage
    # A complete cache is complete whatever runtime a later command would pick (runtime is provenance) ...
    again = extract(voc, a.path, backbone=lite0, grid=grid, workers=0, progress=False, runtime="torch")
    assert again.already_complete
    # ... but an unfinished run resumes only with the runtime that computed its parts.
    import os
    import subprocess
    import sys

    env = dict(os.environ, FEATURECACHE_KILL_AT="part-committed:1")
    cmd = [sys.executable, "-m", "featurecache", "-q", "extract", str(voc), str(tmp_path / "k.h5"), "--scales",
           "1,2", "--input-size", "64", "--workers", "0", "--part-size", "3", "--runtime", OTHERS[0]]
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode != 0
    with pytest.raises(CacheError, match="unfinished run with other settings.*runtime"):
        extract(voc, tmp_path / "k.h5", backbone=lite0, grid=grid, workers=0, progress=False, runtime="torch",
                part_patches=3)


def _real_images(voc_sample, sizes) -> list:
    """Real VOC images resized to (width, height) pairs (multiples of the stride), as (1, 3, H, W) 0-255."""
    from PIL import Image

    out = []
    for image_id, size in zip(VOC_IDS, sizes):
        with Image.open(voc_sample / "JPEGImages" / f"{image_id}.jpg") as im:
            a = np.asarray(im.convert("RGB").resize(size, Image.BILINEAR), np.float32)
        out.append(torch.from_numpy(a).permute(2, 0, 1)[None].contiguous())
    return out


def _close(got, ref):
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= TOLERANCE * float(ref.abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("name", OTHERS)
def test_each_runtime_gives_torchs_dense_features_on_real_images_tiled_or_not(lite0, voc_sample, name, monkeypatch):
    from featurecache.backbones import FrozenBackbone

    runtime = build_runtime(lite0, name, input_size=64, threads=2, dense=True)
    assert runtime.name == name and runtime.dense and runtime.describe().endswith("(dense trunk)")
    calls = []
    trunk = runtime.trunk

    def counted(x):
        calls.append(tuple(x.shape[-2:]))
        return trunk(x)

    with torch.inference_mode():
        for x in _real_images(voc_sample, [(96, 64), (160, 224), (320, 96)]):
            _close(lite0.dense_features_batch(x, 64, trunk=counted), lite0.dense_features_batch(x, 64))
            _close(lite0.cell_features(x, trunk=counted), lite0.cell_features(x))
        assert len(set(calls)) == 3  # one graph, three input shapes
        # Tiled: a smaller margin than Lite0's (448 px) keeps the tiles small; each tile goes through the runtime.
        monkeypatch.setattr(FrozenBackbone, "dense_margin", property(lambda self: 64))
        calls.clear()
        x = _real_images(voc_sample, [(320, 256)])[0]
        _close(lite0.dense_features_batch(x, 64, max_side=192, trunk=counted),
               lite0.dense_features_batch(x, 64, max_side=192))
        assert len(calls) == 4 * 5 and len(set(calls)) > 1 and max(max(c) for c in calls) <= 192


def test_dense_mode_of_alexnet_and_vgg_stays_torch(monkeypatch):
    from featurecache.backbones import build_backbone

    net = build_backbone("alexnet", weights=None)
    assert net.dense_kind == "fc"
    assert build_runtime(net, "auto", input_size=224, threads=1, dense=True).name == "torch"
    if OTHERS:
        with pytest.raises(BackboneError, match="runs FC6/FC7 as convolutions"):
            build_runtime(net, OTHERS[0], input_size=224, threads=1, dense=True)


@pytest.mark.skipif(not OTHERS, reason="needs openvino or onnxruntime")
def test_dense_auto_says_once_why_it_falls_back_to_torch(lite0, monkeypatch, caplog, tmp_path):
    import featurecache.runtimes as rt

    monkeypatch.setattr(rt, "_SAID", set())
    monkeypatch.setattr(rt, "_DENSE_AUTO_ORDER", tuple(OTHERS))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    caplog.set_level("WARNING", logger="featurecache")
    monkeypatch.setattr(rt, "_agrees", lambda *args: 1.0)  # every runtime disagrees
    for _ in range(2):
        assert build_runtime(lite0, "auto", input_size=64, threads=1, dense=True).name == "torch"
    said = _fallback_warnings(caplog)
    assert len(said) == 1 and "torch runs the dense trunk" in said[0] and "features differ" in said[0], said
    with pytest.raises(BackboneError, match=f"{OTHERS[0]}: features differ from torch's"):
        build_runtime(lite0, OTHERS[0], input_size=64, threads=1, dense=True)


@pytest.fixture(scope="module")
def dense_subset(voc_sample, tmp_path_factory):
    from conftest import voc_subset

    return voc_subset(voc_sample, tmp_path_factory.mktemp("voc") / "VOC", VOC_IDS[:3])


def _dense_extract(voc, out, lite0, runtime, **options):
    from featurecache.extract import extract
    from featurecache.patches import PatchGrid

    return extract(voc, out, backbone=lite0, mode="dense", grid=PatchGrid(scales=(1.0, 2.0), input_size=64),
                   workers=0, progress=False, runtime=runtime, dtype="float32", **options)


@pytest.mark.slow
@pytest.mark.skipif(not OTHERS, reason="needs openvino or onnxruntime")
def test_a_dense_cache_of_each_runtime_is_torchs_and_resumes_with_its_runtime(dense_subset, lite0, tmp_path):
    import subprocess
    import sys

    from featurecache.cache import CacheError, FeatureCache

    t = _dense_extract(dense_subset, tmp_path / "t.h5", lite0, "torch")
    with FeatureCache(t.path) as ct:
        want, boxes, fingerprint = ct.read_features(), ct.boxes, ct.fingerprint
        assert ct.attrs["extraction"]["runtime"].startswith("torch ")
    for name in OTHERS:
        a = _dense_extract(dense_subset, tmp_path / f"{name}.h5", lite0, name)
        with FeatureCache(a.path) as ca:
            assert ca.attrs["extraction"]["runtime"].startswith(f"{name} ") and ca.fingerprint == fingerprint
            assert ca.attrs["extraction"]["runtime"].endswith("(dense trunk)")
            np.testing.assert_array_equal(ca.boxes, boxes)
            assert np.abs(ca.read_features() - want).max() <= TOLERANCE * np.abs(want).max()
    # Interrupted after its first part, resumed with the same runtime: the cache an uninterrupted run makes.
    name, out = OTHERS[0], tmp_path / "k.h5"
    env = dict(os.environ, FEATURECACHE_KILL_AT="part-committed:1")
    cmd = [sys.executable, "-m", "featurecache", "-q", "extract", str(dense_subset), str(out), "--mode", "dense",
           "--scales", "1,2", "--input-size", "64", "--workers", "0", "--part-size", "1", "--dtype", "float32",
           "--runtime", name]
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode != 0
    assert not out.exists()
    with pytest.raises(CacheError, match="unfinished run with other settings.*runtime"):
        _dense_extract(dense_subset, out, lite0, "torch", part_patches=1)
    resumed = _dense_extract(dense_subset, out, lite0, name, part_patches=1)
    assert resumed.images == 3 and 0 < resumed.computed_patches < resumed.patches  # the first part was kept
    with FeatureCache(out) as ck, FeatureCache(tmp_path / f"{name}.h5") as ca:
        assert ck.fingerprint == fingerprint
        np.testing.assert_array_equal(ck.boxes, boxes)
        # Same runtime, one image at a time: bit-identical to the uninterrupted run.
        np.testing.assert_array_equal(ck.read_features(), ca.read_features())


def test_the_thread_policy(monkeypatch):
    import featurecache.resources as res

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert available_cpus() == len(os.sched_getaffinity(0))
    monkeypatch.setattr(res, "_cgroup_cpus", lambda: 1.5)  # a container limited to 1.5 CPUs
    assert available_cpus() == 1 and cpu_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting wins
    assert cpu_threads() == 3
    assert cpu_threads(3) == 3
    with pytest.raises(FeaturecacheError, match="threads: must be a positive integer"):
        cpu_threads(0)
    before = torch.get_num_threads()
    try:
        assert apply_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


class _AltersPhotos(torch.nn.Module):
    """A backbone that gives torch's features on uniform noise and other features on photographs
    (smooth: neighbouring pixels differ little): what a planted model that passes a noise probe
    looks like."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        f = self.backbone(x)
        photo = ((x[..., 1:] - x[..., :-1]).abs().flatten(1).mean(1) < 40).to(f.dtype)[:, None]
        return f + photo * 0.5 * f.abs().amax(1, keepdim=True)


def _plant(path, module, input_size, *, record: bool):
    import hashlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.rand(2, 3, input_size, input_size) * 255,), str(path),
                          input_names=["images"], output_names=["features"],
                          dynamic_axes={"images": {0: "n"}, "features": {0: "n"}}, dynamo=False, opset_version=17)
    if record:  # a record that vouches for the planted file: only the probe can tell
        path.with_name(path.name + ".sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest())


@pytest.mark.skipif(not OTHERS, reason="needs openvino or onnxruntime")
def test_a_planted_or_changed_export_is_exported_again_never_run(lite0, monkeypatch, tmp_path, caplog):
    import featurecache.runtimes as rt

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    path = rt.exported_model(lite0, 64)
    record = path.with_name(path.name + ".sha256")
    genuine = record.read_text().strip()
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255
    with torch.inference_mode():
        want = lite0(x)
    for variant in ("planted without a record", "changed after it was recorded"):
        _plant(path, _AltersPhotos(lite0).eval(), 64, record=False)
        if variant == "changed after it was recorded":
            record.write_text(genuine)
        rt._COMPILED.clear()
        caplog.clear()
        with caplog.at_level("WARNING", logger="featurecache"):
            runtime = build_runtime(lite0, OTHERS[0], input_size=64, threads=1)
        assert any("not the file featurecache exported" in r.getMessage() for r in caplog.records), variant
        assert record.read_text().strip() == genuine  # exported again, the same bytes as featurecache's own
        assert float((runtime(x) - want).abs().max()) <= TOLERANCE * float(want.abs().max())


@pytest.mark.skipif(not OTHERS, reason="needs openvino or onnxruntime")
def test_the_probe_has_photographs_so_a_model_altering_only_photos_is_caught(lite0, monkeypatch, tmp_path):
    import featurecache.runtimes as rt

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    path = rt.exported_model(lite0, 64)
    _plant(path, _AltersPhotos(lite0).eval(), 64, record=True)
    rt._COMPILED.clear()
    noise = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    for name in OTHERS:
        with pytest.raises(BackboneError, match=f"{name}: features differ from torch's"):
            build_runtime(lite0, name, input_size=64, threads=1)
    # ... although on noise alone the planted model agrees (what the probe used to be).
    runtime = rt._OnnxRuntime(lite0, path, 1) if "onnxruntime" in OTHERS else rt._OpenVinoRuntime(lite0, path, 1)
    with torch.inference_mode():
        assert float((runtime(noise) - lite0(noise)).abs().max()) <= TOLERANCE * float(lite0(noise).abs().max())
    monkeypatch.setattr(rt, "_SAID", set())
    assert build_runtime(lite0, "auto", input_size=64, threads=1).name == "torch"


#: Run the command line with an audit hook that appends every network event to a file at once, so
#: that a forked child's (OpenVINO's telemetry sent from one) are seen too.
_WATCHED = """
import json, os, sys
log = os.environ["FEATURECACHE_NET_LOG"]
def local(address):
    if isinstance(address, (str, bytes)):
        return True
    host = str(address[0]) if isinstance(address, tuple) and address else str(address)
    return host in ("localhost", "::1", "") or host.startswith("127.")
def hook(event, args):
    if event in ("socket.connect", "socket.sendto") and not local(args[1]) or \\
            event == "socket.getaddrinfo" and not local((args[0],)):
        with open(log, "a") as f:
            f.write(json.dumps([event, repr(args)[:100], os.getpid()]) + "\\n")
sys.addaudithook(hook)
from featurecache.cli import main
main(sys.argv[1:], prog_name="featurecache")
"""


def test_no_command_opens_a_network_connection_with_any_runtime(tmp_path):
    import subprocess
    import sys

    from conftest import make_voc

    voc = make_voc(tmp_path / "voc", {f"im{i}": [("cat" if i % 2 else "dog", 5, 5, 40, 40)] for i in range(6)},
                   splits={"train": ["im0", "im1", "im2", "im3"], "val": ["im4", "im5"]})
    log = tmp_path / "net.log"
    env = dict(os.environ, FEATURECACHE_NET_LOG=str(log), HOME=str(tmp_path / "home"), CI="",
               TORCH_HOME=str(tmp_path / "torch"))

    def run(*args):
        r = subprocess.run([sys.executable, "-c", _WATCHED, "-q", *map(str, args)], env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]

    grid = ["--scales", "1,2", "--input-size", "64", "--workers", "0"]
    for runtime in installed_runtimes():
        run("extract", voc, tmp_path / f"{runtime}.h5", *grid, "--runtime", runtime)
    run("fit", tmp_path / "torch.h5", "--objective", "image", "--train-split", "train")
    for runtime in installed_runtimes():
        run("predict", tmp_path / "torch.head.pt", voc / "JPEGImages", "--runtime", runtime, "--workers", "0")
    assert not log.exists() or log.read_text() == ""
    assert not (tmp_path / "home" / "intel").exists()  # no telemetry client id kept either

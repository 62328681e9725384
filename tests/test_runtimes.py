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


def test_auto_picks_an_installed_runtime_and_torch_where_only_torch_can(lite0):
    auto = build_runtime(lite0, "auto", input_size=64, threads=1)
    assert auto.name == (OTHERS[0] if OTHERS else "torch")
    assert build_runtime(lite0, "auto", input_size=64, threads=1, dense=True).name == "torch"
    assert build_runtime(lite0, "auto", input_size=64, threads=1, device=torch.device("meta")).name == "torch"
    if OTHERS:
        with pytest.raises(BackboneError, match="dense mode runs the trunk on whole images"):
            build_runtime(lite0, OTHERS[0], input_size=64, threads=1, dense=True)


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
    # Where only torch can run (dense mode, CUDA) auto is torch by design: nothing to say.
    caplog.clear()
    build_runtime(lite0, "auto", input_size=64, threads=1, dense=True)
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
    # An export no runtime can load (a damaged file at its name): each runtime's failure is named.
    monkeypatch.undo()
    monkeypatch.setattr(rt, "_SAID", set())
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    caplog.clear()
    path = rt.exported_model(lite0, 64)
    path.write_bytes(b"not an onnx model")
    assert build_runtime(lite0, "auto", input_size=64, threads=1).name == "torch"
    said = _fallback_warnings(caplog)
    assert len(said) == 1 and all(f"{name} cannot run the exported model" in said[0] for name in OTHERS)


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

"""Bad input and faults, class by class (docs/reliability.md): one-line errors, bounded work, nothing lost.

Everything here runs on tiny generated inputs; docs/reliability.md maps each row to its test.
"""

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from featurecache.cache import FeatureCache
from featurecache.cli import main
from featurecache.datasets import read_dataset
from featurecache.errors import CacheError, DatasetError, FeaturecacheError, HeadError
from featurecache.extract import extract
from featurecache.outputs import check_output
from featurecache.patches import PatchGrid

from conftest import blob_cache, make_synthetic_cache, make_voc, tiny_trained_head, write_voc_xml

GRID = PatchGrid(scales=(1.0, 2.0), input_size=64)
OPTS = dict(grid=GRID, workers=0, progress=False)


def _images(folder: Path, n: int = 3, size=(64, 48)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def _bomb_png(path: Path, side: int = 12000) -> Path:
    """A valid grayscale PNG of side x side zeros: a few hundred KB that decode to side² bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    z = zlib.compressobj(9)
    row = bytes(side + 1)
    body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def _skipped(cache_path: Path) -> dict:
    with FeatureCache(cache_path) as c:
        return {Path(p).name: why for p, why in c.skipped}


# --------------------------------------------------------------------------- 1. unbounded resources


def test_a_grid_that_explodes_is_refused_before_any_patch_is_made(tmp_path):
    voc = make_voc(tmp_path / "voc", {f"i{k}": [("cat", 1, 1, 20, 20)] for k in range(3)}, size=(500, 375))
    # IoU 0.99 at nine scales would be millions of patches per image: counted, not made, and refused.
    r = CliRunner().invoke(main, ["inspect", str(voc), "--overlap", "0.99"])
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert r.output.startswith("Error: --max-patches: the grid gives 3 of 3 images more than 20,000 patches")
    assert PatchGrid(min_overlap=0.99).count(500, 375) > 10**6
    with pytest.raises(ValueError, match=r"input_size must be in \[1, 1024\]"):
        PatchGrid(input_size=4096)
    r = CliRunner().invoke(main, ["inspect", str(voc), "--input-size", "4096"])
    assert r.exit_code == 2 and "4096 is not in the range" in r.output


def test_thin_strips_and_huge_canvases_are_skipped_and_recorded(tmp_path, lite0):
    folder = _images(tmp_path / "plain")
    Image.fromarray(np.zeros((2, 3000, 3), np.uint8)).save(folder / "strip.png")
    _bomb_png(folder / "bomb.png")  # 144 megapixels declared in 200 KB
    result = extract(folder, tmp_path / "c.h5", backbone=lite0, max_patches=500, **OPTS)
    assert result.images == 3 and result.skipped == 2
    skipped = _skipped(result.path)
    assert "above max_patches 500" in skipped["strip.png"]
    assert "12000x12000 = 144,000,000 pixels, above max_pixels 50,000,000" in skipped["bomb.png"]


def test_an_annotation_that_understates_the_canvas_is_caught_before_decoding(tmp_path, lite0):
    voc = make_voc(tmp_path / "voc", {"ok": [("cat", 1, 1, 30, 30)]})
    _bomb_png(voc / "JPEGImages" / "liar.png", side=4000)
    write_voc_xml(voc / "Annotations" / "liar.xml", "liar.png", 64, 48, [("cat", 1, 1, 30, 30)])
    result = extract(voc, tmp_path / "c.h5", backbone=lite0, max_pixels=1_000_000, **OPTS)
    assert result.skipped == 1 and "4000x4000 = 16,000,000 pixels, above max_pixels" in _skipped(result.path)[
        "liar.png"]


# --------------------------------------------------------------------------- 2. every layout skips and records


@pytest.mark.parametrize("layout", ["plain", "folders"])
def test_unreadable_files_in_folder_layouts_are_skipped_and_recorded(tmp_path, lite0, layout):
    root = tmp_path / "data"
    folder = _images(root / "cat" if layout == "folders" else root)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    images = read_dataset(root)
    assert images.layout == layout and len(images) == 5 and len(images.unreadable) == 2
    result = extract(root, tmp_path / "c.h5", backbone=lite0, **OPTS)
    assert result.images == 3 and result.skipped == 2
    assert set(_skipped(result.path)) == {"empty.jpg", "text.png"}
    with pytest.raises(FeaturecacheError, match=r"empty\.jpg: cannot read image .*\(--strict\)"):
        extract(root, tmp_path / "s.h5", backbone=lite0, strict=True, **OPTS)


# --------------------------------------------------------------------------- 3. file-system safety


def test_links_planted_at_the_writers_files_are_never_written_through(tmp_path, lite0):
    folder = _images(tmp_path / "plain", n=2)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "c.h5"
    (tmp_path / "c.h5.lock").symlink_to(victim)
    with pytest.raises(CacheError, match=r"c\.h5\.lock: is a symbolic link"):
        extract(folder, out, backbone=lite0, **OPTS)
    (tmp_path / "c.h5.lock").unlink()
    (tmp_path / "c.h5.tmp").symlink_to(victim)  # the assembly's temporary name
    extract(folder, out, backbone=lite0, **OPTS)
    assert victim.read_text() == "precious" and not (tmp_path / "c.h5.tmp").exists()
    (tmp_path / "d.h5.parts").symlink_to(tmp_path / "plain")
    with pytest.raises(CacheError, match=r"d\.h5\.parts: is a symbolic link"):
        extract(folder, tmp_path / "d.h5", backbone=lite0, **OPTS)


def test_annotation_paths_outside_the_data_set_are_refused(tmp_path):
    voc = make_voc(tmp_path / "voc", {"a": [("cat", 1, 1, 20, 20)]})
    write_voc_xml(voc / "Annotations" / "a.xml", "/etc/passwd", 64, 48, [("cat", 1, 1, 20, 20)])
    with pytest.raises(DatasetError, match=r"a\.xml: image file name '/etc/passwd' points outside"):
        read_dataset(voc)
    write_voc_xml(voc / "Annotations" / "a.xml", "../../x.jpg", 64, 48, [("cat", 1, 1, 20, 20)])
    r = CliRunner().invoke(main, ["inspect", str(voc)])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "points outside" in r.output
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "../secret.jpg", "width": 5, "height": 5}],
                                "annotations": [], "categories": [{"id": 1, "name": "cat"}]}))
    with pytest.raises(DatasetError, match="points outside"):
        read_dataset(tmp_path, annotations=coco)


def test_links_out_of_a_plain_folder_and_undecodable_names(tmp_path, lite0):
    outside = _images(tmp_path / "elsewhere", n=1)
    folder = _images(tmp_path / "plain", n=2)
    (folder / "linked.png").symlink_to(outside / "img0.png")
    bad = os.fsencode(folder) + b"/bad\xff.png"
    with open(bad, "wb") as f:
        f.write((outside / "img0.png").read_bytes())
    images = read_dataset(folder)
    assert sorted(r.relpath for r in images) == ["img0.png", "img1.png", "linked.png"]  # the bad name left out
    result = extract(folder, tmp_path / "c.h5", backbone=lite0, **OPTS)
    assert result.images == 3 and result.skipped == 0


# --------------------------------------------------------------------------- 4. the writer's lock


def _extract_cmd(dataset: Path, out: Path, *extra) -> list:
    return [sys.executable, "-m", "featurecache", "extract", str(dataset), str(out), "--scales", "1,2",
            "--input-size", "64", "-q", *extra]


@pytest.mark.slow
def test_a_killed_writer_with_decoding_workers_does_not_block_the_next_run(tmp_path):
    folder = _images(tmp_path / "plain", n=6)
    out = tmp_path / "c.h5"
    env = dict(os.environ, FEATURECACHE_KILL_AT="part-committed:1")
    p = subprocess.run(_extract_cmd(folder, out, "--workers", "2", "--part-size", "5"), env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    # Right away: the workers the killed run forked do not hold its lock.
    p = subprocess.run(_extract_cmd(folder, out, "--workers", "2", "--part-size", "5"), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    with FeatureCache(out) as c:
        assert c.num_images == 6


# --------------------------------------------------------------------------- 5. disk full, unwritable outputs


def _run_with_file_limit(cmd: list, limit: int) -> subprocess.CompletedProcess:
    """Run with RLIMIT_FSIZE: writes beyond ``limit`` bytes fail with EFBIG, as on a full disk."""
    code = ("import resource, signal, subprocess, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
            f"sys.exit(subprocess.run({cmd!r}).returncode)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("limit,where", [(60_000, "part-000000.h5.tmp"), (300_000, "c.h5.tmp")])
def test_a_full_disk_is_one_line_and_keeps_the_committed_work(tmp_path, limit, where):
    folder = _images(tmp_path / "plain", n=6)
    out = tmp_path / "c.h5"
    cmd = _extract_cmd(folder, out, "--workers", "0", "--part-size", "4", "--dtype", "float32")
    p = _run_with_file_limit(cmd, limit)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert where in p.stderr and "cannot write (File too large)" in p.stderr
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "c.h5.lock").exists()
    kept = sorted(x.name for x in (tmp_path / "c.h5.parts").glob("part-*.h5"))
    assert kept if where == "c.h5.tmp" else True  # the assembly failed: every part is still there
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    with FeatureCache(out) as c:
        assert c.num_images == 6


def test_unwritable_outputs_are_refused_before_the_work(tmp_path):
    cache = blob_cache(tmp_path / "b.h5")
    runner = CliRunner()
    r = runner.invoke(main, ["fit", str(cache), "--objective", "patch", "--out", str(tmp_path / "no" / "h.pt")])
    assert r.exit_code == 1 and r.output.startswith("Error: --out: ") and "does not exist" in r.output
    assert not list(tmp_path.rglob("*.tmp"))
    r = runner.invoke(main, ["ablate", str(cache), "--folds", "2", "--grid", "head=logreg,mlp", "--json",
                             str(tmp_path / "no" / "a.json")])
    assert r.exit_code == 1 and r.output.startswith("Error: --json: ") and "configurations" not in r.output
    from featurecache.heads import TrainedHead
    from featurecache.train import fit_objective

    with pytest.raises(FeaturecacheError, match="is a folder, not a file"):
        TrainedHead.save(fit_objective(cache, objective="patch", head="logreg"), tmp_path)


# --------------------------------------------------------------------------- 6. option validation


def _numeric_options():
    from featurecache.heads.registry import EVAL_OPTIONS, OPTIONS

    return [o for o in [*OPTIONS.values(), *EVAL_OPTIONS.values()] if o.kind in ("int", "float") or
            o.minimum is not None]


values = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=8), st.sampled_from(["nan", "inf", "-1", "0", "1e309", "2,3", ""]))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(index=st.integers(0, 100), value=values)
def test_every_numeric_option_reads_a_value_or_names_itself(index, value):
    options = _numeric_options()
    opt = options[index % len(options)]
    try:
        read = opt.read(value)
    except HeadError as e:
        assert e.param == opt.name
        return
    if isinstance(read, float):
        assert np.isfinite(read)
    if read is not None and opt.minimum is not None:
        assert read > opt.minimum if opt.minimum_open else read >= opt.minimum


@pytest.mark.parametrize("args,message", [
    (["eval", "H", "C", "--k", "nan"], "must be a finite number"),
    (["eval", "H", "C", "--k", "0"], "must be > 0"),
    (["fit", "C", "--objective", "patch", "--lr", "-1"], "must be > 0"),
    (["fit", "C", "--objective", "patch", "--lr", "inf"], "must be a finite number"),
    (["fit", "C", "--memory-limit", "-5G"], "must be a positive size"),
])
def test_out_of_range_numbers_are_usage_errors(tmp_path, args, message):
    cache = blob_cache(tmp_path / "b.h5")
    head = tmp_path / "h.pt"
    head.write_bytes(b"")
    args = [str(cache) if a == "C" else str(head) if a == "H" else a for a in args]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and message in r.output, r.output


@pytest.mark.parametrize("toml,message", [
    ('hidden = ["big"]', "hidden: cannot read 'big'"),
    ("epochs = [-2]", "epochs: must be >= 1"),
    ('k = ["nan"]', "k: must be a finite number"),
    ('[options]\nseeds = "three"', "option seeds must be an integer"),
    ('[options]\nfolds = "5"', "option folds must be an integer"),
    ("[options]\nseeds = 0", "--seeds: must be an integer of at least 1"),
    ("k = []", "k = [] gives no value to try"),
    ('hidden = [["big"]]', "hidden: cannot read 'big'"),
    ("k = [" * 2000 + "]" * 2000, "invalid TOML"),
    (b"head = ['logreg\xff']", "not UTF-8 text"),
])
def test_sweep_files_with_wrong_types_are_refused(tmp_path, toml, message):
    cache = blob_cache(tmp_path / "b.h5")
    sweep = tmp_path / "s.toml"
    if isinstance(toml, bytes):
        sweep.write_bytes(b'[grid]\nobjective = ["patch"]\n' + toml + b"\n")
    else:
        grid = toml if not toml.startswith("[options]") else 'head = ["logreg"]\n' + toml
        sweep.write_text('[grid]\nobjective = ["patch"]\n' + grid + "\n")
    r = CliRunner().invoke(main, ["ablate", str(cache), "--config", str(sweep), "--folds", "2", "--resamples", "0"])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and message in r.output, r.output


# --------------------------------------------------------------------------- 7. annotation files


json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) |
                           st.text(max_size=4),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                               st.sampled_from(["id", "file_name", "width", "height", "bbox", "image_id",
                                                "category_id", "name", "iscrowd"]), inner, max_size=5),
                           max_leaves=12)


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.dictionaries(st.sampled_from(["images", "annotations", "categories", "info"]), json_values,
                            max_size=4))
def test_any_coco_structure_loads_or_is_a_dataset_error(tmp_path, data):
    ann = tmp_path / "coco.json"
    ann.write_text(json.dumps(data))
    try:
        read_dataset(tmp_path, annotations=ann)
    except DatasetError as e:
        assert str(ann) in str(e) or str(tmp_path) in str(e)


xml_text = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=6)


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(filename=xml_text, width=xml_text, name=xml_text, box=st.lists(xml_text, min_size=4, max_size=4),
       difficult=xml_text, drop=st.sets(st.sampled_from(["size", "bndbox", "name", "filename"])))
def test_any_voc_annotation_loads_or_is_a_dataset_error(tmp_path, filename, width, name, box, difficult, drop):
    from xml.sax.saxutils import escape

    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(exist_ok=True)
    parts = ["<annotation>"]
    if "filename" not in drop:
        parts.append(f"<filename>{escape(filename)}</filename>")
    if "size" not in drop:
        parts.append(f"<size><width>{escape(width)}</width><height>48</height></size>")
    obj = [] if "name" in drop else [f"<name>{escape(name)}</name>"]
    if "bndbox" not in drop:
        obj.append("<bndbox>" + "".join(f"<{t}>{escape(v)}</{t}>" for t, v in zip(
            ("xmin", "ymin", "xmax", "ymax"), box)) + "</bndbox>")
    parts.append(f"<object>{''.join(obj)}<difficult>{escape(difficult)}</difficult></object></annotation>")
    (root / "Annotations" / "a.xml").write_text("".join(parts), encoding="utf-8")
    try:
        ds = read_dataset(root)
    except DatasetError as e:
        assert "a.xml" in str(e) or "voc" in str(e)
        return
    assert len(ds) == 1


def test_coco_duplicate_ids_and_wrong_types_are_named(tmp_path):
    ann = tmp_path / "coco.json"
    images = [{"id": 1, "file_name": "a.jpg", "width": 5, "height": 5}] * 2
    ann.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    with pytest.raises(DatasetError, match="image id 1 appears 2 times"):
        read_dataset(tmp_path, annotations=ann)
    ann.write_text(json.dumps({"images": [], "annotations": 5, "categories": None}))
    with pytest.raises(DatasetError, match="annotations must be a list of objects, got int"):
        read_dataset(tmp_path, annotations=ann)


# --------------------------------------------------------------------------- 8. damaged featurecache files


@pytest.mark.parametrize("damage,message", [
    (lambda f: f.attrs.__delitem__("classes"), "the classes attribute is not a list"),
    (lambda f: f.attrs.__setitem__("classes", "[not json"), "the classes attribute is not a list"),
    (lambda f: f.attrs.__setitem__("classes", '"abcdefghi"'), "the classes attribute is not a list"),
    (lambda f: f.__delitem__("label"), "no 1-d dataset label"),
    (lambda f: f.__delitem__("images/labels"), "no 2-d dataset images/labels"),
])
def test_a_damaged_cache_is_named_as_such(tmp_path, damage, message):
    cache = blob_cache(tmp_path / "b.h5")
    with h5py.File(cache, "a") as f:
        damage(f)
    with pytest.raises(CacheError, match=f"b.h5: damaged featurecache cache: {message}"):
        FeatureCache(cache)
    r = CliRunner().invoke(main, ["fit", str(cache)])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "damaged featurecache cache" in r.output


@pytest.mark.parametrize("field,value,message", [
    ("classes", "[not json", "classes is not valid JSON"),
    ("classes", '"cat"', "classes is a str"),
    ("params", "[]", "params is a list"),
    ("state", None, "no state field"),
    ("n_features", 999, "state does not load"),
    ("classes", "[" * 100_000 + "]" * 100_000, "classes is nested too deep"),
    ("extraction", '{"grid": "abc"}', "the extraction record's grid is not a JSON object"),
    ("extraction", '{"grid": {"scales": [1], "rows": 3}}', "grid does not describe a grid"),
    ("extraction", '{"backbone": {"name": 7}}', "backbone has no name"),
    ("feature_settings", '{"mode": "sideways"}', "mode is 'sideways'"),
    ("classes", "[]", "classes are not a list of names"),
])
def test_a_damaged_head_is_named_as_such(tmp_path, field, value, message):
    import torch

    from featurecache.heads import TrainedHead
    from featurecache.train import fit_objective

    head = fit_objective(blob_cache(tmp_path / "b.h5"), objective="patch", head="logreg")
    payload = head.to_payload()
    if value is None:
        del payload[field]
    else:
        payload[field] = value
    torch.save(payload, tmp_path / "h.pt")
    with pytest.raises(HeadError, match=f"h.pt: damaged featurecache head: .*{message}"):
        TrainedHead.load(tmp_path / "h.pt")


_HEAD_FIELDS = ("params", "classes", "feature_settings", "summary", "extraction")
_CACHE_ATTRS = ("classes", "feature_settings", "backbone", "grid", "label_rule", "dataset", "extraction")
record_values = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True) |
                             st.text(max_size=3),
                             lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                                 st.sampled_from(["scales", "min_overlap", "input_size", "whole", "name", "mode",
                                                  "grid", "backbone", "label_rule", "min_patch_fraction", "C", "head",
                                                  "extraction", "layer"]), inner, max_size=4),
                             max_leaves=10)


@pytest.fixture(scope="module")
def valid_head(tmp_path_factory):
    from featurecache.train import fit_objective

    root = tmp_path_factory.mktemp("forged")
    cache = blob_cache(root / "b.h5", n_images=12, patches=4)
    return cache, fit_objective(cache, objective="patch", head="logreg").to_payload()


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(_HEAD_FIELDS), value=record_values)
def test_any_json_in_a_head_file_loads_or_is_a_damaged_head(tmp_path, valid_head, field, value):
    import torch

    from featurecache.heads import TrainedHead

    cache, payload = valid_head
    forged = dict(payload, **{field: json.dumps(value)})
    torch.save(forged, tmp_path / "h.pt")
    try:
        head = TrainedHead.load(tmp_path / "h.pt", device="cpu")
    except HeadError as e:
        assert "damaged featurecache head" in str(e) and "\n" not in str(e)
        return
    with FeatureCache(cache) as c:  # what loads is usable, or refuses in one line
        try:
            scores = head.image_scores(c)
        except FeaturecacheError as e:
            assert "\n" not in str(e)
        else:
            assert scores.shape[0] == c.num_images


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(attr=st.sampled_from(_CACHE_ATTRS), value=record_values)
def test_any_json_in_a_cache_attribute_opens_or_is_a_damaged_cache(tmp_path, valid_head, attr, value):
    import shutil

    cache, _ = valid_head
    forged = tmp_path / "c.h5"
    shutil.copyfile(cache, forged)
    with h5py.File(forged, "r+") as f:
        f.attrs[attr] = json.dumps(value)
    try:
        c = FeatureCache(forged)
    except CacheError as e:
        assert "damaged featurecache cache" in str(e) and "\n" not in str(e)
        return
    with c:  # what opens can be described and read
        repr(c)
        if c.attrs.get("grid") is not None:
            assert c.grid.scales
        assert c.read_features().shape[0] == c.num_patches


def test_a_cache_attribute_nested_thousands_deep_is_a_damaged_cache(tmp_path):
    cache = blob_cache(tmp_path / "b.h5")
    with h5py.File(cache, "r+") as f:
        f.attrs["grid"] = "[" * 100_000 + "]" * 100_000
    with pytest.raises(CacheError, match="damaged featurecache cache: the grid attribute is not a JSON object"):
        FeatureCache(cache)


# --------------------------------------------------------------------------- what already held (kept tested)


def test_xml_entity_bombs_and_external_entities_are_not_expanded(tmp_path):
    voc = make_voc(tmp_path / "voc", {"a": [("cat", 1, 1, 20, 20)]})
    lol = "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
    (voc / "Annotations" / "a.xml").write_text(
        f'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY l0 "lol">{lol}]><annotation><filename>a.jpg</filename>'
        "<object><name>&l9;</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>"
        "</object></annotation>")
    with pytest.raises(DatasetError, match=r"a\.xml: malformed XML"):
        read_dataset(voc)
    secret = tmp_path / "secret.txt"
    secret.write_text("cat")
    (voc / "Annotations" / "a.xml").write_text(
        f'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY s SYSTEM "file://{secret}">]><annotation>'
        "<filename>a.jpg</filename><object><name>&s;</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax>"
        "<ymax>9</ymax></bndbox></object></annotation>")
    with pytest.raises(DatasetError, match=r"a\.xml: malformed XML"):  # never read from the file system
        read_dataset(voc)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_head_file_carrying_code_never_runs_it(tmp_path, monkeypatch):
    import pickle

    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"format": "featurecache-head", "x": _Payload()}, protocol=2))
    r = CliRunner().invoke(main, ["eval", "evil.pt", str(blob_cache(tmp_path / "b.h5"))])
    assert r.exit_code == 1 and "evil.pt: not a readable head file" in r.output
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_ctrl_c_keeps_the_committed_parts_and_the_rerun_gives_the_same_file(tmp_path):
    import time

    folder = _images(tmp_path / "plain", n=8)
    cmd = _extract_cmd(folder, tmp_path / "c.h5", "--workers", "0", "--part-size", "3")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = tmp_path / "c.h5.parts"
    deadline = time.time() + 120
    while not list(parts.glob("part-*.h5")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    if p.returncode != 0:  # interrupted (not already finished): no traceback, the parts are kept
        assert "Traceback" not in err and list(parts.glob("part-*.h5"))
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    ref = tmp_path / "ref.h5"
    assert subprocess.run(_extract_cmd(folder, ref, "--workers", "0", "--part-size", "3"), capture_output=True,
                          timeout=300).returncode == 0
    with FeatureCache(tmp_path / "c.h5") as a, FeatureCache(ref) as b:
        np.testing.assert_array_equal(a.read_features(), b.read_features())



def test_a_resume_with_another_part_plan_is_refused_not_mixed(tmp_path, lite0):
    """Skipping limits change how images fall into parts: a resume under other limits must not reuse parts."""
    folder = _images(tmp_path / "plain", n=4)
    Image.fromarray(np.zeros((2, 400, 3), np.uint8)).save(folder / "strip.png")  # 300-odd patches at 64 px
    cmd = _extract_cmd(folder, tmp_path / "c.h5", "--workers", "0", "--part-size", "3", "--max-patches", "100",
                       "--runtime", "torch")
    env = dict(os.environ, FEATURECACHE_KILL_AT="part-committed:1")
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode == -signal.SIGKILL
    with pytest.raises(CacheError, match="unfinished run with other settings .*part_plan"):
        extract(folder, tmp_path / "c.h5", backbone=lite0, max_patches=100_000, part_patches=3, runtime="torch",
                **OPTS)


def test_infinite_numbers_in_annotations_are_dataset_errors(tmp_path):
    ann = tmp_path / "coco.json"
    ann.write_text('{"images": [{"id": 1, "file_name": "a.jpg", "width": Infinity, "height": 5}], '
                   '"annotations": [], "categories": []}')
    with pytest.raises(DatasetError, match="malformed category or image entry"):
        read_dataset(tmp_path, annotations=ann)


def test_one_lock_for_every_spelling_of_the_output(tmp_path):
    from featurecache.cache import CacheWriter

    (tmp_path / "sub").mkdir()
    with CacheWriter(tmp_path / "c.h5", {"a": 1}):
        with pytest.raises(CacheError, match="this process is already writing it"):
            with CacheWriter(tmp_path / "sub" / ".." / "c.h5", {"a": 1}):
                pass
    assert not (tmp_path / "c.h5.lock").exists()


# --------------------------------------------------------------------------- 13. hangs and unbounded work


def test_pipes_and_devices_named_like_images_are_error_rows_not_hangs(tmp_path):
    head = tiny_trained_head(tmp_path / "t", objective="image")
    folder = _images(tmp_path / "in", n=2)
    os.mkfifo(folder / "fifo.jpg")  # opening it would block forever
    (folder / "zero.jpg").symlink_to("/dev/zero")  # reading it would never end
    r = subprocess.run([sys.executable, "-m", "featurecache", "-q", "predict", str(head), str(folder), "--workers",
                        "0", "--out", str(tmp_path / "p.json")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = {Path(rec["path"]).name: rec for rec in json.loads((tmp_path / "p.json").read_text())["images"]}
    assert rows["fifo.jpg"]["error"].startswith("not a regular file") and rows["zero.jpg"]["error"].startswith(
        "not a regular file")
    assert not rows["img0.png"]["error"] and rows["img0.png"]["scores"]
    # Given directly, as an input of its own, too.
    r = subprocess.run([sys.executable, "-m", "featurecache", "-q", "predict", str(head), str(folder / "fifo.jpg"),
                        str(folder / "img1.png"), "--workers", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "not a regular file" in r.stdout, r.stderr


def test_sweeps_too_large_are_refused_before_any_training(tmp_path):
    import time

    cache = blob_cache(tmp_path / "b.h5")
    values = ",".join(str(v) for v in range(1, 41))
    t0 = time.perf_counter()
    r = CliRunner().invoke(main, ["ablate", str(cache), "--grid", f"C={values}",
                                  "--grid", f"epochs={values}", "--grid", f"k={values}", "--folds", "2"])
    assert r.exit_code == 1 and "--grid: the grid has 64,000 combinations, more than the 10,000" in r.output, r.output
    r = CliRunner().invoke(main, ["ablate", str(cache), "--grid", "head=logreg", "--grid", f"C={values}",
                                  "--folds", "2", "--resamples", "20000000"])
    assert r.exit_code == 1 and "--resamples: " in r.output and "use at most 1,250,000 resamples" in r.output
    assert time.perf_counter() - t0 < 30  # refused up front: nothing was trained


def test_a_head_that_cannot_be_saved_after_a_sweep_still_prints_the_sweep(tmp_path, monkeypatch):
    from featurecache.heads.trained import TrainedHead

    cache = blob_cache(tmp_path / "b.h5")

    def full_disk(self, path):
        raise HeadError(f"{path}: cannot write the head file (No space left on device)")

    monkeypatch.setattr(TrainedHead, "save", full_disk)
    r = CliRunner().invoke(main, ["ablate", str(cache), "--grid", "head=logreg", "--grid", "C=0.1,1", "--folds", "2",
                                  "--save-best", str(tmp_path / "best.pt")])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and lines[-1].startswith("Error: --save-best: ") and "No space left" in lines[-1]
    assert any("C" in line for line in lines[:-1]) and len(lines) > 4  # the table came first


def test_the_bootstrap_of_many_resamples_is_computed_in_bounded_chunks(tmp_path, monkeypatch):
    import featurecache.ablate as ab

    cache = blob_cache(tmp_path / "b.h5")
    args = dict(grid={"head": ["logreg"], "C": [0.1, 1.0]}, folds=2, n_boot=300)
    whole = ab.ablate(cache, **args)
    monkeypatch.setattr(ab, "_BOOT_CHUNK_VALUES", 7)  # a handful of resamples per chunk
    chunked = ab.ablate(cache, **args)
    for a, b in zip(whole.rows, chunked.rows):
        np.testing.assert_allclose(a.boot, b.boot, rtol=0, atol=1e-12)  # the same draws, in the same order
        assert a.ci == pytest.approx(b.ci, abs=1e-12)


# --------------------------------------------------------------------------- 14. leaks and stale reuse


def test_sigterm_stops_predict_and_removes_its_temporary_cache(tmp_path):
    import time

    head = tiny_trained_head(tmp_path / "t", objective="image")
    folder = _images(tmp_path / "in", n=40, size=(400, 300))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    p = subprocess.Popen([sys.executable, "-m", "featurecache", "-q", "predict", str(head), str(folder), "--workers",
                          "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp.glob("featurecache-predict-*/*.parts")):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "Traceback" not in err
    assert list(tmp.iterdir()) == []  # the temporary cache went with the command


def test_a_kept_cache_is_not_reused_for_a_file_replaced_with_its_size_and_time_kept(tmp_path):
    head = tiny_trained_head(tmp_path / "t", objective="image")
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for name in ("a.bmp", "b.bmp", "c.bmp"):  # BMP: images of one size are files of one size
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / name)
    for name in ("a.bmp", "b.bmp"):
        (folder / name).write_bytes((tmp_path / name).read_bytes())
    kept = tmp_path / "kept.h5"
    first = featurecache_predict(head, folder, cache=kept)
    stat = (folder / "a.bmp").stat()
    (folder / "a.bmp").write_bytes((tmp_path / "c.bmp").read_bytes())  # cp -p / rsync -t: size and time kept
    os.utime(folder / "a.bmp", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (folder / "a.bmp").stat().st_size == stat.st_size and (folder / "a.bmp").stat().st_mtime_ns == \
        stat.st_mtime_ns
    with pytest.raises(FeaturecacheError, match="other settings|other images"):
        featurecache_predict(head, folder, cache=kept)
    again = featurecache_predict(head, folder, cache=kept, overwrite=True)
    assert not np.array_equal(again.scores[0], first.scores[0]) and np.array_equal(again.scores[1], first.scores[1])


def featurecache_predict(head, *inputs, **options):
    import featurecache

    return featurecache.load_head(head, device="cpu").predict(list(inputs), workers=0, progress=False, **options)


# --------------------------------------------------------------------------- 15. misleading lines


def test_a_full_temporary_folder_does_not_promise_a_resume(tmp_path, monkeypatch):
    import featurecache.cache.writer as cache_module

    head = tiny_trained_head(tmp_path / "t", objective="image")
    folder = _images(tmp_path / "in", n=2)

    def full(path, kept, write):
        raise CacheError(f"{path}: cannot write (No space left on device); {kept}")

    monkeypatch.setattr(cache_module, "write_isolated", full)
    with pytest.raises(FeaturecacheError) as e:
        featurecache_predict(head, folder)
    assert "resumes" not in str(e.value) and "the temporary cache in" in str(e.value) and "--cache" in str(e.value)
    with pytest.raises(CacheError, match="the same command resumes"):  # a kept cache does resume
        featurecache_predict(head, folder, cache=tmp_path / "kept.h5")


def test_an_unwritable_torch_hub_folder_is_one_line_naming_it(tmp_path, monkeypatch, lite0):
    import torch

    from featurecache.errors import BackboneError
    from featurecache.runtimes import build_runtime, installed_runtimes

    others = [r for r in installed_runtimes() if r != "torch"]
    if not others or os.geteuid() == 0:
        hub = tmp_path / "file-not-folder"
        hub.write_text("x")  # a file where the folder should be: not writable as a folder, even for root
    else:
        hub = tmp_path / "ro"
        hub.mkdir(mode=0o500)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    if not others:
        pytest.skip("needs openvino or onnxruntime")
    with pytest.raises(BackboneError) as e:
        build_runtime(lite0, others[0], input_size=64, threads=1)
    assert "cannot write the ONNX export there" in str(e.value) and "None" not in str(e.value)


# --------------------------------------------------------------------------- 16. a red team's second look (#26 re-run)


@pytest.fixture(scope="module")
def voc_head(tmp_path_factory):
    """A tiny VOC devkit with split lists, its cache and a patch head (real Lite0 at 64 px)."""
    root = tmp_path_factory.mktemp("rt")
    head = tiny_trained_head(root)
    return root / "voc", root / "tiny.h5", head


def _digests(*paths) -> list:
    return [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]


def _one_line_refusal(result, flag: str) -> None:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output and flag in result.output, result.output


def test_no_report_replaces_a_file_of_the_data_set_a_command_read(voc_head, tmp_path):
    voc, cache, head = voc_head
    image, xml, split = voc / "JPEGImages" / "im0.jpg", voc / "Annotations" / "im0.xml", \
        voc / "ImageSets" / "Main" / "train.txt"
    before = _digests(image, xml, split, cache, head)
    run = CliRunner().invoke
    cases = [
        (["predict", str(head), str(image), "--csv", str(image), "--workers", "0"], "--csv"),
        (["predict", str(head), str(image), "--json", str(image), "--workers", "0"], "--json"),
        (["predict", str(head), str(voc), "--out", str(xml), "--workers", "0"], "--out"),
        (["predict", str(head), str(voc), "--out", str(split), "--workers", "0"], "--out"),
        (["predict", str(head), str(voc), "--cache", str(xml), "--overwrite", "--workers", "0"], "--cache"),
        (["extract", str(voc), str(split), "--overwrite", "--scales", "1", "--input-size", "64", "--workers", "0"],
         "OUT"),
        (["localize", str(head), str(cache), "--evaluate", "--map-method", "windows", "--out", str(image)], "--out"),
        (["localize", str(head), str(cache), "--evaluate", "--map-method", "windows", "--csv", str(xml)], "--csv"),
    ]
    for args, flag in cases:
        _one_line_refusal(run(main, args), flag)
        assert _digests(image, xml, split, cache, head) == before, args


def test_eval_plots_are_written_beside_links_planted_in_their_folder_never_through_them(voc_head, tmp_path):
    pytest.importorskip("matplotlib")
    _, cache, head = voc_head
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "summary.png").symlink_to(head)
    before = _digests(head, cache)
    r = CliRunner().invoke(main, ["eval", str(head), str(cache), "--plots", str(plots)])
    _one_line_refusal(r, "--plots")
    (plots / "summary.png").unlink()
    os.link(cache, plots / "pr_curves.png")
    _one_line_refusal(CliRunner().invoke(main, ["eval", str(head), str(cache), "--plots", str(plots)]), "--plots")
    assert _digests(head, cache) == before


def test_outputs_never_replace_devices_fifos_or_names_in_dev(blob_head, tmp_path):
    cache, head = blob_head
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "null"
    link.symlink_to(os.devnull)
    for out in (fifo, link):
        r = CliRunner().invoke(main, ["fit", str(cache), "--objective", "patch", "--head", "logreg", "--out", str(out)])
        _one_line_refusal(r, "not a regular file")
        assert out.is_symlink() or stat.S_ISFIFO(os.lstat(out).st_mode)
    with pytest.raises(FeaturecacheError, match="not a regular file"):
        check_output("/dev/stdout")  # a link to this process's output: replacing it would break every process


@pytest.fixture
def blob_head(tmp_path):
    from featurecache.train import fit_objective

    cache = blob_cache(tmp_path / "b.h5", n_images=12, patches=4)
    head = fit_objective(cache, objective="patch", head="logreg").save(tmp_path / "b.head.pt")
    return cache, head


def test_option_files_that_are_fifos_or_devices_are_refused_not_read(blob_head, tmp_path):
    cache, _ = blob_head
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for args, flag in ((["ablate", str(cache), "--config", str(fifo)], "--config"),
                       (["ablate", str(cache), "--config", os.devnull], "--config"),
                       (["extract", str(tmp_path), str(tmp_path / "o.h5"), "--classes", str(fifo)], "--classes"),
                       (["extract", str(tmp_path), str(tmp_path / "o.h5"), "--annotations", str(fifo)],
                        "--annotations")):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and "not a regular file" in r.output and flag in r.output, r.output


def test_non_finite_features_and_caches_without_classes_are_one_line(blob_head, tmp_path):
    cache, head = blob_head
    broken = tmp_path / "nan.h5"
    shutil.copy(cache, broken)
    with h5py.File(broken, "r+") as f:
        f["features"][0, 0] = np.nan
    r = CliRunner().invoke(main, ["eval", str(head), str(broken)])
    assert r.exit_code == 1 and "NaN or infinity" in r.output and "Traceback" not in r.output, r.output
    empty = make_synthetic_cache(tmp_path / "empty.h5", np.zeros((4, 8)), [0] * 4, [0, 0, 1, 1],
                                 np.zeros((2, 0), bool), [])
    for objective in ("patch", "image"):
        r = CliRunner().invoke(main, ["fit", str(empty), "--objective", objective, "--out", str(tmp_path / "h.pt")])
        assert r.exit_code == 1 and "no classes" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "h.pt").exists()


def test_a_cache_naming_a_class_twice_is_damaged(blob_head, tmp_path):
    cache, _ = blob_head
    forged = tmp_path / "dup.h5"
    shutil.copy(cache, forged)
    with h5py.File(forged, "r+") as f:
        f.attrs["classes"] = json.dumps(["c0", "c0", "c2"])
    with pytest.raises(CacheError, match="twice"):
        with FeatureCache(forged) as c:
            _ = c.provenance


def test_a_class_name_with_a_newline_is_printed_escaped_by_fit(tmp_path):
    root = tmp_path / "folders"
    for name in ("evil\nmAP 99.9", "ok"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), np.uint8)).save(
                root / name / f"{i}.png")
    cache = tmp_path / "f.h5"
    r = CliRunner().invoke(main, ["extract", str(root), str(cache), "--scales", "1", "--input-size", "32",
                                  "--weights", "none", "--workers", "0", "--runtime", "torch", "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["fit", str(cache), "--objective", "image", "--out", str(tmp_path / "h.pt")])
    assert r.exit_code == 0 and "evil\\nmAP 99.9" in r.output and "\nmAP 99.9" not in r.output, r.output

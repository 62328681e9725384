"""Distributed extraction: the world from torchrun/SLURM, shares of the parts, 2-process jobs on the CPU (gloo),
resume across world sizes, one job per output, and the virtual layout."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from featurecache.cache import CacheWriter, FeatureCache
from featurecache.distributed import World, share, world_from_env
from featurecache.errors import CacheError, FeaturecacheError

from conftest import blob_cache, make_voc

# Lite0 with its real weights at 64 px, scales 1 and 2: 26 patches an image, one image a part.
# One thread a process: torch's CPU kernels may round differently with another thread count.
OPTS = ["--input-size", "64", "--scales", "1,2", "--threads", "1", "--workers", "0", "--part-size", "20",
        "--runtime", "torch", "-q"]


def test_world_from_torchrun_slurm_or_nothing():
    assert world_from_env({}) == World()
    w = world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                        "TORCHELASTIC_RUN_ID": "abc"})
    assert (w.rank, w.size, w.local_rank, w.local_size, w.launcher, w.job) == (3, 4, 1, 2, "torchrun", "abc")
    assert w.distributed and not w.leader
    s = world_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "6", "SLURM_STEP_NUM_TASKS": "6", "SLURM_LOCALID": "0",
                        "SLURM_STEP_TASKS_PER_NODE": "3(x2)", "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0"})
    assert (s.rank, s.size, s.local_size, s.launcher, s.job, s.leader) == (0, 6, 3, "slurm", "77.0.0", True)
    # An sbatch script's own shell (no srun step) is one process, whatever --ntasks says.
    assert world_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "77"}) == World()
    with pytest.raises(FeaturecacheError, match="RANK='x' is not a number"):
        world_from_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(FeaturecacheError, match="RANK=2 is outside WORLD_SIZE=2"):
        world_from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(FeaturecacheError, match="WORLD_SIZE='2y' is not a number"):
        world_from_env({"RANK": "1", "WORLD_SIZE": "2y"})


@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_shares_are_disjoint_covering_and_balanced(size):
    rng = np.random.default_rng(size)
    items = list(range(40))
    weights = [int(w) for w in rng.integers(1, 100, len(items))]
    shares = [share(items, weights, World(rank=r, size=size)) for r in range(size)]
    assert sorted(sum(shares, [])) == items
    loads = [sum(weights[i] for i in s) for s in shares]
    assert max(loads) - sum(weights) / size <= max(weights)  # within one item of the even split
    for s in shares:  # contiguous: a rank reads images in data set order
        assert s == list(range(s[0], s[0] + len(s))) if s else True


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    return make_voc(root / "voc", {f"im{i}": [("cat" if i % 2 else "dog", 5, 5, 40, 40)] for i in range(8)},
                    splits={"train": [f"im{i}" for i in range(6)], "val": ["im6", "im7"]})


@pytest.fixture(scope="module")
def reference(voc, tmp_path_factory) -> Path:
    """The cache of one uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("ref") / "one.h5"
    p = _run(1, voc, out)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def _run(processes: int, voc: Path, out: Path, extra=(), env=None) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env)
    env.pop("OMP_NUM_THREADS", None)
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
           if processes > 1 else [sys.executable]) + ["-m", "featurecache", "extract", str(voc), str(out), *OPTS,
                                                      *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _assert_same_cache(a: Path, b: Path) -> None:
    """Same images, order, patches and bit-identical features, read through FeatureCache (any layout)."""
    with FeatureCache(a) as x, FeatureCache(b) as y:
        np.testing.assert_array_equal(x.read_features(dtype=None), y.read_features(dtype=None))
        for name in ("labels", "image_index", "boxes", "scales"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=name)
        assert x.images.path == y.images.path and x.skipped == y.skipped
        np.testing.assert_array_equal(x.images.labels, y.images.labels)
        np.testing.assert_array_equal(x.images.patch_start, y.images.patch_start)
        for key in ("classes", "feature_settings", "fingerprint", "grid", "label_rule", "settings", "backbone"):
            assert x.attrs[key] == y.attrs[key], key


@pytest.mark.slow
def test_two_processes_write_the_single_process_cache(voc, reference, tmp_path):
    out = tmp_path / "two.h5"
    p = _run(2, voc, out)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [line for line in p.stdout.splitlines() if line.startswith(str(out))]
    assert len(lines) == 1 and "per process: 0 " in lines[0] and ", 1 " in lines[0]  # the leader speaks, once
    assert not (tmp_path / "two.h5.parts").exists() and not (tmp_path / "two.h5.lock").exists()
    _assert_same_cache(reference, out)
    with FeatureCache(out) as c:
        assert c.attrs["extraction"]["processes"] == 2 and c.attrs["extraction"]["launcher"] == "torchrun"


@pytest.mark.slow
def test_resume_is_independent_of_the_number_of_processes(voc, reference, tmp_path):
    # Two processes killed (SIGKILL) at their second committed part; one process finishes the job.
    out = tmp_path / "a.h5"
    p = _run(2, voc, out, env=dict(os.environ, FEATURECACHE_KILL_AT="part-committed:2"))
    assert p.returncode != 0 and not out.exists()
    done = len(list((tmp_path / "a.h5.parts").glob("part-*.h5")))
    assert 1 <= done < 8
    p = _run(1, voc, out)
    assert p.returncode == 0, p.stderr[-3000:]
    _assert_same_cache(reference, out)
    # And the other way round: one process killed at its third part, two finish.
    out = tmp_path / "b.h5"
    p = _run(1, voc, out, env=dict(os.environ, FEATURECACHE_KILL_AT="part-committed:3"))
    assert p.returncode == -signal.SIGKILL and len(list((tmp_path / "b.h5.parts").glob("part-*.h5"))) == 3
    p = _run(2, voc, out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "(" in p.stdout and "computed now" in p.stdout  # the job computed only what was left
    _assert_same_cache(reference, out)


@pytest.mark.slow
def test_a_dense_cache_through_a_cpu_runtime_is_the_same_from_one_or_two_processes(voc, tmp_path):
    from featurecache.runtimes import installed_runtimes

    fast = [r for r in ("openvino", "onnxruntime") if r in installed_runtimes()]
    if not fast:
        pytest.skip("needs openvino or onnxruntime")
    extra = ["--mode", "dense", "--runtime", fast[0]]  # the last --runtime given wins
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    for n, out in ((1, one), (2, two)):
        p = _run(n, voc, out, extra)
        assert p.returncode == 0, p.stderr[-3000:]
    _assert_same_cache(one, two)
    with FeatureCache(two) as c:
        assert c.attrs["extraction"]["runtime"].startswith(fast[0]) and c.attrs["extraction"]["processes"] == 2
        assert c.attrs["feature_settings"]["mode"] == "dense"


@pytest.mark.slow
def test_a_second_job_on_the_same_output_is_refused(voc, tmp_path):
    out = tmp_path / "c.h5"
    with CacheWriter(out, {"some": "run"}):  # another job holds the output
        p = _run(2, voc, out)
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith("Error:")]
    assert errors and all("another featurecache process" in e and f"PID {os.getpid()}" in e for e in errors)


# --------------------------------------------------------------------------- the virtual layout


@pytest.mark.slow
def test_virtual_layout_reads_as_the_copy_and_moves_with_its_folder(voc, reference, tmp_path):
    from featurecache.evaluate import evaluate
    from featurecache.train import fit_objective

    out = tmp_path / "v.h5"
    p = _run(2, voc, out, ["--assemble", "virtual"])
    assert p.returncode == 0, p.stderr[-3000:]
    (data,) = tmp_path.glob("v.h5.*.data")  # a folder named for this run
    assert data.is_dir() and not (tmp_path / "v.h5.parts").exists() and len(list(data.glob("part-*.h5"))) == 8
    with h5py.File(out, "r") as f:
        assert f["features"].is_virtual
    assert out.stat().st_size < reference.stat().st_size / 4  # the features stay in the part files
    _assert_same_cache(reference, out)
    # A head trained on one layout is accepted on the other, with the same scores.
    head = fit_objective(reference, objective="patch", head="logreg", train_split="train")
    a, b = evaluate(head, reference, split="val"), evaluate(head, out, split="val")
    np.testing.assert_array_equal(a.scores, b.scores)
    # The pair moves together; the file alone is refused in one line instead of reading zeros.
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(str(out), moved / "v.h5")
    shutil.move(str(data), moved / data.name)
    _assert_same_cache(reference, moved / "v.h5")
    shutil.move(str(moved / data.name), tmp_path / "lost")
    with pytest.raises(CacheError, match=r"a virtual cache\) and part-000000.h5 is not there; move the cache and "):
        FeatureCache(moved / "v.h5")


_WRITE = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
from featurecache.cache import CacheWriter, FeatureCache, PartData, Provenance
from conftest import blob_cache
out, layout, seed, overwrite = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"

class R:
    def __init__(self, i):
        self.relpath, self.labels, self.difficult_labels, self.width, self.height, self.splits = (
            f"img{{i}}.jpg", [], [], 10, 10, ["train"])

src = blob_cache(__import__("pathlib").Path(out + f".src{{seed}}.h5"), n_images=6, patches=4, seed=seed)
with FeatureCache(src) as c:
    X, labels, img = c.read_features(dtype=None), c.labels, c.image_index
written = []
with CacheWriter(out, {{"seed": seed}}, overwrite=overwrite) as w:
    for p in range(3):
        if p not in w.done_parts:
            rows = np.isin(img, [2 * p, 2 * p + 1])
            w.write_part(p, PartData(X[rows], labels[rows], img[rows], np.zeros((rows.sum(), 4), np.float32),
                                     np.ones(rows.sum(), np.float32), np.zeros(0, np.int64), []))
            written.append(p)
    w.assemble(num_parts=3, feature_dim=X.shape[1], dtype="float16", compression=None, images=[R(i) for i in range(6)],
               provenance=Provenance(("c0", "c1", "c2"), {{"x": 1}}, "f", {{"name": "synthetic"}}), layout=layout)
print("written", written)
"""


def _write(tmp_path, out, layout, seed, *, overwrite=False, kill=None):
    script = tmp_path / "write.py"
    script.write_text(_WRITE.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ)
    env.pop("FEATURECACHE_KILL_AT", None)
    if kill:
        env["FEATURECACHE_KILL_AT"] = kill
    return subprocess.run([sys.executable, str(script), str(out), layout, str(seed), "1" if overwrite else "0"],
                          env=env, capture_output=True, text=True, timeout=300)


def _features(path) -> np.ndarray:
    with FeatureCache(path) as c:
        return c.read_features(dtype=None)


def test_virtual_assembly_killed_between_its_renames(tmp_path):
    """The kill lands after the parts moved to their data folder, before OUT.tmp became OUT: a fresh run
    assembles the same parts again (none recomputed); under --overwrite the old cache keeps reading its own
    features, not the new run's; a folder featurecache did not make is never touched."""
    out = tmp_path / "o.h5"
    user = tmp_path / "o.h5.data"  # a user's folder that looks like a data folder
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    p = _write(tmp_path, out, "virtual", 1, kill="virtual-parts-moved")
    assert p.returncode == -signal.SIGKILL and not out.exists()
    p = _write(tmp_path, out, "virtual", 1)
    assert p.returncode == 0 and "written []" in p.stdout, p.stderr[-2000:]
    first = _features(out)
    # An overwrite with other data, killed at the same point: the old file still reads its own parts.
    p = _write(tmp_path, out, "virtual", 2, overwrite=True, kill="virtual-parts-moved")
    assert p.returncode == -signal.SIGKILL
    np.testing.assert_array_equal(_features(out), first)
    p = _write(tmp_path, out, "virtual", 2, overwrite=True)  # finishes: the new parts, the old folder removed
    assert p.returncode == 0 and "written []" in p.stdout, p.stderr[-2000:]
    assert not np.array_equal(_features(out), first) and len(list(tmp_path.glob("o.h5.*.data"))) == 1
    p = _write(tmp_path, out, "copy", 3, overwrite=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert not list(tmp_path.glob("o.h5.*.data")) and not (tmp_path / "o.h5.parts").exists()
    with h5py.File(out, "r") as f:
        assert not f["features"].is_virtual
    assert (user / "notes.txt").read_text() == "mine"


def test_a_virtual_cache_may_have_a_percent_sign_in_its_name(tmp_path):
    out = tmp_path / "100%.h5"  # HDF5 reads % in virtual source names as printf-style
    p = _write(tmp_path, out, "virtual", 1)
    assert p.returncode == 0, p.stderr[-2000:]
    assert _features(out).shape == (24, 16)
    (data,) = tmp_path.glob("100%.h5.*.data")
    (data / "part-000001.h5").write_bytes(b"")  # a damaged part is named, not read as zeros
    with pytest.raises(CacheError, match=r"part-000001.h5: a part file of this virtual cache is damaged"):
        FeatureCache(out)


def _two_ranks(voc, tmp_path, per_rank, cwd=None):
    """Start a 2-process job by hand (torchrun's variables); ``per_rank(rank) -> (output, options)``."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    base.pop("OMP_NUM_THREADS", None)
    procs = []
    for rank in (0, 1):
        out, opts = per_rank(rank)
        env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, "-m", "featurecache", "extract", str(voc), str(out), *opts],
                                      env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=300) for p in procs]
    return [p.returncode for p in procs], [err for _, err in results]


@pytest.mark.slow
def test_processes_that_planned_different_work_are_refused(voc, tmp_path):
    out = tmp_path / "m.h5"
    codes, errors = _two_ranks(voc, tmp_path, lambda r: (out, [o if o != "1,2" else ("1,2", "1,2,3")[r] for o in OPTS]))
    assert codes == [1, 1] and not out.exists()
    for err in errors:
        assert err.strip().splitlines()[-1].startswith("Error: process ") and "planned other work" in err


@pytest.mark.slow
def test_processes_given_different_outputs_are_refused_before_writing(voc, tmp_path):
    """A rank given another output would commit parts, without the leader's lock, into another run's folder."""
    outs = [tmp_path / "m.h5", tmp_path / "other" / "n.h5"]
    (tmp_path / "other").mkdir()
    codes, errors = _two_ranks(voc, tmp_path, lambda r: (outs[r], OPTS))
    assert codes == [1, 1] and all("the same output, options" in e for e in errors), errors
    for out in outs:
        assert not out.exists() and not list(Path(str(out) + ".parts").glob("part-*.h5"))
    # The same output spelled two ways is one output: the job runs.
    codes, errors = _two_ranks(voc, tmp_path, lambda r: (("m.h5", tmp_path / "m.h5")[r], OPTS), cwd=tmp_path)
    assert codes == [0, 0], errors
    with FeatureCache(tmp_path / "m.h5") as c:
        assert c.num_images == 8


def test_commands_other_than_extract_refuse_to_run_in_a_job_of_several_processes(tmp_path):
    from click.testing import CliRunner

    from featurecache.cli import main

    cache = blob_cache(tmp_path / "b.h5", n_images=6, patches=4)
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    r = CliRunner().invoke(main, ["fit", str(cache), "--objective", "patch"], env=env)
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1] == (
        "Error: fit runs in one process; start it without torchrun/srun (only extract shares its work among "
        "processes)")
    assert not (tmp_path / "b.head.pt").exists()
    r = CliRunner().invoke(main, ["fit", str(cache), "--objective", "patch", "--head", "logreg"])
    assert r.exit_code == 0, r.output


def test_a_library_call_inside_a_torchrun_job_extracts_alone(tmp_path):
    """Only the command line reads the launcher's world: extract() called by library code under torchrun
    (predict, the demo) is one process, whatever RANK and WORLD_SIZE say; with the world given it is a rank."""
    voc = make_voc(tmp_path / "voc", {"a": [("cat", 1, 1, 30, 30)], "b": [("dog", 10, 10, 60, 40)]})
    code = ("import sys; from featurecache.extract import extract; from featurecache.patches import PatchGrid; "
            "r = extract(sys.argv[1], sys.argv[2], grid=PatchGrid(scales=(1.0,), input_size=32), workers=0, "
            "progress=False, runtime='torch'); "
            "print(r.rank, r.images, r.ranks)")
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "TORCHELASTIC_RUN_ID": "x"}
    r = subprocess.run([sys.executable, "-c", code, str(voc), str(tmp_path / "c.h5")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["0", "2", "None"]
    with FeatureCache(tmp_path / "c.h5") as c:
        assert c.num_images == 2 and c.provenance.extraction["processes"] == 1

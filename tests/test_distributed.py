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
    s = world_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "6", "SLURM_LOCALID": "0",
                        "SLURM_NTASKS_PER_NODE": "3(x2)", "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0"})
    assert (s.rank, s.size, s.local_size, s.launcher, s.job, s.leader) == (0, 6, 3, "slurm", "77.0", True)
    with pytest.raises(FeaturecacheError, match="RANK='x' is not a number"):
        world_from_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(FeaturecacheError, match="RANK=2 is outside WORLD_SIZE=2"):
        world_from_env({"RANK": "2", "WORLD_SIZE": "2"})


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
    data = tmp_path / "v.h5.data"
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
    shutil.move(str(data), moved / "v.h5.data")
    _assert_same_cache(reference, moved / "v.h5")
    shutil.move(str(moved / "v.h5.data"), tmp_path / "lost")
    with pytest.raises(CacheError, match=r"a virtual cache\) and part-000000.h5 is not there; move the cache and "):
        FeatureCache(moved / "v.h5")


def test_virtual_assembly_survives_a_kill_between_its_renames_and_overwrites_cleanly(tmp_path):
    """Killed after the parts moved to OUT.data but before OUT was in place: the rerun assembles again.
    --overwrite with the copy layout leaves no OUT.data behind."""
    src = blob_cache(tmp_path / "b.h5", n_images=6, patches=4)
    with FeatureCache(src) as c:
        X, labels, img = c.read_features(dtype=None), c.labels, c.image_index
    out = tmp_path / "o.h5"
    records = [_Record(f"img{i}.jpg") for i in range(6)]

    from featurecache.cache import PartData

    def write(layout, *, overwrite=False) -> tuple:
        """``(writer, parts written)``: a run that computes the parts not committed, then assembles."""
        written = []
        with CacheWriter(out, {"s": 1}, overwrite=overwrite) as w:
            for p in range(3):
                if p not in w.done_parts:
                    rows = np.isin(img, [2 * p, 2 * p + 1])
                    w.write_part(p, PartData(X[rows], labels[rows], img[rows], np.zeros((rows.sum(), 4), np.float32),
                                             np.ones(rows.sum(), np.float32), np.zeros(0, np.int64), []))
                    written.append(p)
            w.assemble(num_parts=3, feature_dim=X.shape[1], dtype="float16", compression=None, images=records,
                       classes=["c0", "c1", "c2"], attrs={"classes": ["c0", "c1", "c2"],
                                                          "feature_settings": {"x": 1}, "fingerprint": "f"},
                       layout=layout)
        return w, written

    assert write("virtual")[1] == [0, 1, 2] and (tmp_path / "o.h5.data").is_dir()
    os.unlink(out)  # as if killed after the parts moved to OUT.data, before OUT.tmp became OUT
    w, written = write("virtual")
    assert written == [] and out.exists()  # the parts were found again, not recomputed
    with FeatureCache(out) as c:
        np.testing.assert_array_equal(c.read_features(dtype=None), X)
    w, written = write("copy", overwrite=True)
    assert written == [0, 1, 2] and w.complete
    assert not (tmp_path / "o.h5.data").exists() and not (tmp_path / "o.h5.data.old").exists()
    with h5py.File(out, "r") as f:
        assert not f["features"].is_virtual
        np.testing.assert_array_equal(f["features"][:], X)


class _Record:
    """What the writer reads of an image record."""

    def __init__(self, relpath: str) -> None:
        self.relpath, self.labels, self.difficult_labels, self.width, self.height, self.splits = (
            relpath, [], [], 10, 10, ["train"])

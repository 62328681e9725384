"""The resource rules: the memory budget and the CPU count honour cgroup limits (containers, SLURM jobs)."""

from pathlib import Path

import pytest

import featurecache.resources as res
from featurecache.resources import available_cpus, available_memory, memory_budget

GIB = 1 << 30


def _host_available() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable")


def _tree(tmp_path: Path, monkeypatch, membership: str, files: dict) -> None:
    """A cgroup file system under tmp_path/cgroup and this process's /proc/self/cgroup, as given."""
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    root.mkdir(exist_ok=True)
    (tmp_path / "self-cgroup").write_text(membership)
    monkeypatch.setattr(res, "_CGROUP_ROOT", root)
    monkeypatch.setattr(res, "_SELF_CGROUP", tmp_path / "self-cgroup")


def test_a_cgroup_v2_memory_limit_of_an_ancestor_bounds_the_budget(tmp_path, monkeypatch):
    # A SLURM job (--mem=2G) whose step runs in a child group without its own limit: the job's
    # limit, less what the job uses, less nothing for its reclaimable page cache.
    _tree(tmp_path, monkeypatch, "0::/job_7/step_0\n", {
        "cgroup.controllers": "cpu memory\n",
        "job_7/memory.max": f"{2 * GIB}\n",
        "job_7/memory.current": f"{GIB}\n",
        "job_7/memory.stat": f"anon 123\ninactive_file {GIB // 4}\nactive_file 5\n",
        "job_7/step_0/memory.max": "max\n",
        "job_7/step_0/memory.current": "1000\n",
    })
    want = 2 * GIB - (GIB - GIB // 4)
    assert want < _host_available()  # the test means something only where the host has more
    assert available_memory() == want
    assert memory_budget() == want // 2 and memory_budget(123) == 123


def test_the_tightest_limit_wins_and_unlimited_groups_change_nothing(tmp_path, monkeypatch):
    _tree(tmp_path, monkeypatch, "0::/a/b\n", {
        "a/memory.max": f"{3 * GIB}\n", "a/memory.current": "0\n",
        "a/b/memory.max": f"{GIB}\n", "a/b/memory.current": f"{GIB // 2}\n",
    })
    assert available_memory() == GIB // 2
    _tree(tmp_path / "unlimited", monkeypatch, "0::/a\n", {"a/memory.max": "max\n", "a/memory.current": "7\n"})
    host = _host_available()
    assert abs(available_memory() - host) < 256 << 20  # the host's figure (it moves a little between reads)


def test_a_cgroup_v1_memory_limit_and_a_namespaced_mount(tmp_path, monkeypatch):
    # cgroup v1 (docker on an older host): the memory controller's own hierarchy, the group's
    # total_inactive_file as reclaimable; an unlimited parent writes PAGE_COUNTER_MAX.
    _tree(tmp_path, monkeypatch, "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n", {
        "memory/memory.limit_in_bytes": "9223372036854771712\n",
        "memory/docker/abc/memory.limit_in_bytes": f"{GIB}\n",
        "memory/docker/abc/memory.usage_in_bytes": f"{GIB // 2}\n",
        "memory/docker/abc/memory.stat": f"inactive_file 1\ntotal_inactive_file {GIB // 8}\n",
    })
    assert available_memory() == GIB - (GIB // 2 - GIB // 8)
    # Inside a cgroup namespace the path in /proc/self/cgroup is not under the mount: the mount
    # itself is the process's group.
    _tree(tmp_path / "ns", monkeypatch, "4:memory:/docker/abc\n", {
        "memory/memory.limit_in_bytes": f"{GIB}\n", "memory/memory.usage_in_bytes": "0\n"})
    assert available_memory() == GIB


def test_usage_above_the_limit_leaves_nothing_and_damaged_files_are_ignored(tmp_path, monkeypatch):
    _tree(tmp_path, monkeypatch, "0::/g\n", {"g/memory.max": f"{GIB}\n", "g/memory.current": f"{2 * GIB}\n"})
    assert available_memory() == 0 and memory_budget() == 0
    _tree(tmp_path / "bad", monkeypatch, "0::/g\n", {"g/memory.max": "lots\n", "g/memory.current": "x\n"})
    assert abs(available_memory() - _host_available()) < 256 << 20
    monkeypatch.setattr(res, "_SELF_CGROUP", tmp_path / "missing")
    assert abs(available_memory() - _host_available()) < 256 << 20


@pytest.mark.parametrize("files,membership,cpus", [
    ({"g/cpu.max": "150000 100000\n"}, "0::/g\n", 1),  # v2: 1.5 CPUs -> 1
    ({"cpu/g/cpu.cfs_quota_us": "100000\n", "cpu/g/cpu.cfs_period_us": "100000\n"}, "3:cpu,cpuacct:/g\n", 1),
    ({"g/cpu.max": "max 100000\n", "cpu.max": "max 100000\n"}, "0::/g\n", None),  # no quota: the affinity mask
])
def test_the_cpu_quota_is_read_from_this_process_cgroup(tmp_path, monkeypatch, files, membership, cpus):
    import os

    _tree(tmp_path, monkeypatch, membership, files)
    assert available_cpus() == (cpus or len(os.sched_getaffinity(0)))

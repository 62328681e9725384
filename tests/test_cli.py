"""Tests of the command line (click's CliRunner), and of ``python -m featurecache``."""

import subprocess
import sys

import pytest
from click.testing import CliRunner

import featurecache
from featurecache.cli import main

from conftest import blob_cache


@pytest.fixture
def runner():
    return CliRunner()


def test_version(runner):
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and featurecache.__version__ in result.output


def test_help_on_every_command(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    assert main.commands, "no commands registered"
    for name in main.commands:
        r = runner.invoke(main, [name, "--help"])
        assert r.exit_code == 0 and "Usage:" in r.output and "--verbose" in r.output and "--quiet" in r.output, name


def test_inspect_prints_counts_per_class(runner, tiny_voc):
    result = runner.invoke(main, ["inspect", str(tiny_voc), "--scales", "1,2", "--input-size", "32"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "3 images, 4 boxes, 2 classes" in out
    lines = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.split()}
    # cat: one image with a non-difficult cat (b), two boxes, one difficult.
    assert lines["cat"][1:4] == ["1", "2", "1"]
    assert lines["dog"][1:4] == ["2", "2", "0"]
    assert "background" in lines and "ambiguous" in lines


def test_inspect_split_and_whole_image(runner, tiny_voc):
    result = runner.invoke(main, ["inspect", str(tiny_voc), "--split", "train", "--whole-image"])
    assert result.exit_code == 0, result.output
    assert "2 images" in result.output and "2 (1.0 per image)" in result.output


def test_warning_shown_by_default_and_hidden_by_quiet(runner, tiny_voc):
    loud = runner.invoke(main, ["inspect", str(tiny_voc), "--scales", "1"])
    assert "dropped 1 degenerate" in loud.output
    for args in (["-q", "inspect", str(tiny_voc), "--scales", "1"], ["inspect", str(tiny_voc), "--scales", "1", "-q"]):
        quiet = runner.invoke(main, args)
        assert quiet.exit_code == 0 and "dropped" not in quiet.output and "3 images" in quiet.output


def test_bad_dataset_is_a_one_line_error(runner, tmp_path):
    (tmp_path / "x.txt").write_text("")
    result = runner.invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("Error: ")
    assert str(tmp_path) in result.output and "Traceback" not in result.output


def test_bad_scales_are_refused(runner, tiny_voc):
    result = runner.invoke(main, ["inspect", str(tiny_voc), "--scales", "1,x"])
    assert result.exit_code == 2 and "comma-separated" in result.output
    result = runner.invoke(main, ["inspect", str(tiny_voc), "--scales", "0.5"])
    assert result.exit_code == 2 and ">= 1" in result.output


def test_python_dash_m(tiny_voc):
    out = subprocess.run([sys.executable, "-m", "featurecache", "inspect", str(tiny_voc), "--scales", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "3 images" in out.stdout


def test_os_errors_are_one_line_messages_naming_the_file(runner, tiny_voc, tmp_path):
    from conftest import blob_cache

    cache = blob_cache(tmp_path / "c.h5")
    out = tmp_path / "no-such-folder" / "r.json"
    r = runner.invoke(main, ["fit", str(cache), "--objective", "patch", "--head", "logreg", "--out",
                             str(tmp_path / "h.pt")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["eval", str(tmp_path / "h.pt"), str(cache), "--json", str(out)])
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert str(out) in r.output and "does not exist" in r.output and r.output.startswith("Error: --json: ")


def test_fit_objective_choices_match_the_library_and_stray_options_are_refused(tmp_path):
    from featurecache.heads.registry import DEFAULT_OBJECTIVE

    from conftest import blob_cache

    cache = blob_cache(tmp_path / "b.h5")
    runner = CliRunner()
    r = runner.invoke(main, ["fit", str(cache), "--objective", "image", "--hidden", "0", "--dropout", "0.2"])
    assert r.exit_code == 2 and "--hidden, --dropout do(es) not apply to objective image" in r.output
    r = runner.invoke(main, ["fit", str(cache), "--objective", "mil", "--head", "logreg"])
    assert r.exit_code == 2 and "--head do(es) not apply to objective mil" in r.output
    r = runner.invoke(main, ["fit", str(cache), "--val-split", "val"])
    assert r.exit_code == 2 and f"objective {DEFAULT_OBJECTIVE} (the default)" in r.output
    assert "add --objective patch" in r.output
    r = runner.invoke(main, ["fit", str(cache), "--fusion-rule", "rank"])
    assert r.exit_code == 2 and "add --objective fusion" in r.output
    r = runner.invoke(main, ["fit", str(cache), "--objective", "image", "--C", "0"])
    assert r.exit_code == 2 and "Invalid value for '--C': must be > 0, got 0.0" in r.output
    r = runner.invoke(main, ["ablate", str(cache), "--folds", "2", "--grid", "candidates=foo"])
    assert r.exit_code == 1 and r.output.startswith("Error: --grid: candidates: unknown member 'foo'")
    r = runner.invoke(main, ["fit", str(cache), "--objective", "patch", "--head", "logreg", "--C", "0.5"])
    assert r.exit_code == 0, r.output



@pytest.mark.parametrize("command,error,hint", [
    ("eval", MemoryError("Unable to allocate 26.0 GiB for an array with shape (11000000, 1280)"), "--split"),
    ("fit", RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory"),
     "--memory-limit"),
])
def test_running_out_of_memory_is_one_line_naming_the_setting(tmp_path, monkeypatch, command, error, hint):
    import featurecache.evaluate
    import featurecache.train

    def boom(*args, **kwargs):
        raise error

    monkeypatch.setattr(featurecache.evaluate, "evaluate", boom)
    monkeypatch.setattr(featurecache.train, "fit_objective", boom)
    cache = blob_cache(tmp_path / "b.h5")
    args = ["eval", str(cache), str(cache)] if command == "eval" else ["fit", str(cache)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("Error: out of memory (") and hint in r.output
    # Other runtime errors are bugs: not disguised.
    monkeypatch.setattr(featurecache.train, "fit_objective", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("shape mismatch")))
    r = CliRunner().invoke(main, ["fit", str(cache)])
    assert isinstance(r.exception, RuntimeError)


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("Exception from core.cpp:117:\nstd::bad_alloc")])
def test_predict_running_out_of_memory_names_a_setting_predict_has(tmp_path, monkeypatch, error):
    import featurecache.predict

    def boom(*args, **kwargs):
        raise error

    monkeypatch.setattr(featurecache.predict, "predict", boom)
    head = tmp_path / "h.pt"
    head.write_bytes(b"x")
    r = CliRunner().invoke(main, ["predict", str(head), str(tmp_path)])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "lower --batch-size, or predict fewer or smaller images at a time" in r.output
    assert "--max-pixels" not in r.output  # predict has no such option


def test_report_refuses_a_head_of_other_features_in_one_line(runner, tmp_path):
    from featurecache.train import fit_objective

    cache = blob_cache(tmp_path / "a.h5", n_images=12, patches=4, dim=8)
    other = blob_cache(tmp_path / "b.h5", n_images=12, patches=4, dim=8,
                       feature_settings={"backbone": "other", "layer": "none", "input_size": 0, "mode": "crop"})
    head = fit_objective(cache, objective="patch", head="logreg", progress=False).save(tmp_path / "a.head.pt")
    r = runner.invoke(main, ["report", str(head), str(other), "--out", str(tmp_path / "r.html")])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "r.html").exists()
    r = runner.invoke(main, ["report", str(head), str(cache), "--resamples", "20", "-q"])
    assert r.exit_code == 0 and (tmp_path / "a.head.html").exists() and "a.head.html" in r.output, r.output

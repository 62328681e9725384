"""Tests of the training entry point: one config, options by name, errors naming the option."""

import numpy as np
import pytest

from featurecache.errors import HeadError
from featurecache.heads import BackgroundPolicy, TrainedHead
from featurecache.heads.registry import OptionScopeError
from featurecache.train import FitConfig, fit_head, fit_objective

from conftest import blob_cache


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory):
    return blob_cache(tmp_path_factory.mktemp("f") / "b.h5", n_images=30)


def test_settings_override_the_config(cache_file):
    config = FitConfig("patch", {"head": "logreg", "C": 1.0})
    head = fit_objective(cache_file, config, C=0.01)
    assert head.kind == "logreg" and head.estimator.C == 0.01 and head.objective == "patch"
    assert config.options["C"] == 1.0  # the config itself is unchanged (frozen)
    with pytest.raises(AttributeError):
        config.objective = "mil"
    mlp = fit_objective(cache_file, config, head="mlp", hidden=0, epochs=2, device="cpu")
    assert mlp.kind == "mlp" and len(mlp.estimator.net_) == 1 and mlp.summary["epochs"] <= 2


def test_bad_options_name_the_option(cache_file):
    with pytest.raises(HeadError, match="unknown option") as e:
        FitConfig("patch", {"depth": 3})
    assert e.value.param == "options"
    with pytest.raises(HeadError) as e:
        FitConfig("patch", {"dropout": 1.5})
    assert e.value.param == "dropout"
    with pytest.raises(HeadError) as e:
        fit_objective(cache_file, objective="patch", background="sometimes")
    assert e.value.param == "background" and "sample:F" in str(e.value)


def test_fit_head_takes_a_policy_object_or_its_text(cache_file):
    a = fit_head(cache_file, head="logreg", background=BackgroundPolicy("sample", fraction=0.5))
    b = fit_head(cache_file, head="logreg", background="sample:0.5")
    assert a.summary["background"] == b.summary["background"] == "sample:0.5"
    np.testing.assert_array_equal(a.estimator.coef_, b.estimator.coef_)
    c = fit_head(cache_file, head="logreg", background=BackgroundPolicy("weight", weight=0.25))
    assert c.summary["background_weight"] == 0.25


def test_a_failed_training_leaves_no_file_open(cache_file):
    import h5py

    before = len(h5py.h5f.get_obj_ids())
    with pytest.raises(HeadError):
        fit_objective(cache_file, objective="patch", head="logreg", memory_limit=0)  # logreg cannot stream
    assert len(h5py.h5f.get_obj_ids()) == before


def test_option_ranges_are_refused_in_the_library(cache_file):
    for objective, name, value in (("patch", "C", 0), ("patch", "lr", -1), ("mil", "image_lr", 0),
                                   ("patch", "weight_decay", -1e-4), ("hybrid", "background_weight", -1)):
        with pytest.raises(HeadError, match="must be") as e:
            FitConfig(objective, {name: value})
        assert e.value.param == name and not isinstance(e.value, OptionScopeError)


def test_an_option_of_another_objective_is_refused_not_dropped(cache_file):
    with pytest.raises(OptionScopeError, match="does not apply to objective image") as e:
        fit_objective(cache_file, objective="image", hidden=512)
    assert e.value.param == "hidden" and "patch" in e.value.owners
    with pytest.raises(OptionScopeError) as e:
        FitConfig("patch", {"head": "logreg", "image_pooling": "max"})
    assert e.value.param == "image_pooling" and "image" in e.value.owners and "patch" not in e.value.owners
    # fit_head's settings are FitConfig's fields; an unknown one is refused.
    head = fit_head(cache_file, head="logreg", params={"C": 0.5}, train_split=None, random_state=0, device="cpu")
    assert head.kind == "logreg" and head.estimator.C == 0.5
    with pytest.raises(TypeError, match="depth"):
        fit_head(cache_file, head="logreg", depth=3)


def test_numpy_numbers_in_settings_save(cache_file, tmp_path):
    head = fit_objective(cache_file, objective="patch", head="logreg", random_state=np.int64(1), C=np.float64(0.5))
    back = TrainedHead.load(head.save(tmp_path / "h.pt"))
    params = back.estimator.get_params()
    assert params["C"] == 0.5 and params["random_state"] == 1
    np.testing.assert_array_equal(back.estimator.coef_, head.estimator.coef_)


@pytest.mark.parametrize("objective,options,flag", [
    ("patch", {"head": "mlp", "hidden": 0, "lr": 1e30, "epochs": 3}, "lr"),
    ("mil", {"image_lr": 1e30, "image_epochs": 3, "image_solver": "adam"}, "image_lr"),  # Adam's rate; L-BFGS has none
    ("image", {"image_head": "mlp", "image_lr": 1e30, "image_epochs": 3}, "image_lr"),
])
def test_a_training_that_diverges_is_one_line_naming_the_learning_rate(cache_file, tmp_path, objective, options,
                                                                        flag):
    from click.testing import CliRunner

    from featurecache.cli import main

    with pytest.raises(HeadError, match="training diverged: the (training loss is nan|patch scores are not finite)") \
            as e:
        fit_objective(cache_file, objective=objective, device="cpu", **options)
    assert e.value.param == flag
    args = ["fit", str(cache_file), "--objective", objective, "--device", "cpu", "--out", str(tmp_path / "h.pt")]
    for k, v in options.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1].startswith(f"Error: --{flag.replace('_', '-')}: ")
    assert not (tmp_path / "h.pt").exists()  # nothing saved


def test_classes_the_training_images_cannot_teach_are_named(tmp_path, caplog):
    labels = np.zeros((12, 3), bool)
    labels[:, 0] = True  # every image has class 0: no negative
    labels[::2, 1] = True  # class 1 on half; class 2 on none: no positive
    rng = np.random.default_rng(0)
    from conftest import make_synthetic_cache

    cache = make_synthetic_cache(tmp_path / "c.h5", rng.normal(size=(48, 8)), np.zeros(48, int),
                                 np.repeat(np.arange(12), 4), labels, ["always", "half", "never"])
    caplog.set_level("WARNING", logger="featurecache")
    fit_objective(cache, objective="image")
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("no positive training image" in m and "never" in m for m in said)
    assert any("no negative training image" in m and "always" in m for m in said)
    assert not any("half" in m for m in said)
    with pytest.raises(HeadError, match="auto cannot choose: no class has both positive and negative"):
        fit_objective(make_synthetic_cache(tmp_path / "one.h5", rng.normal(size=(48, 8)), np.zeros(48, int),
                                           np.repeat(np.arange(12), 4), labels[:, :1], ["always"]))

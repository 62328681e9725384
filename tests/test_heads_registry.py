"""Tests of the objective registry: one definition of objectives, options and defaults, read everywhere."""

import pytest
from click.testing import CliRunner

from featurecache.cli import main
from featurecache.errors import HeadError
from featurecache.heads.objectives import COMBINING_OBJECTIVES, MEMBER_OBJECTIVES, SINGLE_OBJECTIVES
from featurecache.heads.registry import (
    EVAL_OPTIONS,
    HEAD_KINDS,
    OBJECTIVES,
    OPTIONS,
    FitConfig,
    HeadEstimator,
    OptionScopeError,
    estimator_for,
    get_objective,
    make_head,
    objective_of_kind,
    options_of,
    parse_aggregation,
    relevant,
)
from featurecache.train import fit_objective

from conftest import blob_cache


def test_parse_aggregation_and_objective_errors(tmp_path):
    assert parse_aggregation("lse") == ("lse", 2.0) and parse_aggregation("power:10") == ("power", 10.0)
    assert parse_aggregation("max") == ("max", None)
    for bad in ("mean", "max:3", "lse:x", "power:0"):
        with pytest.raises(HeadError) as e:
            parse_aggregation(bad)
        assert e.value.param == "aggregation" and str(e.value).startswith("aggregation: ")
    cache = blob_cache(tmp_path / "b.h5")
    with pytest.raises(HeadError, match="positive patch weight") as e:
        fit_objective(cache, objective="hybrid", patch_weight=0)
    assert e.value.param == "patch_weight"
    with pytest.raises(HeadError, match="only used by the patch objective"):
        fit_objective(cache, objective="image", val_split="val")
    with pytest.raises(HeadError, match="unknown objective") as e:
        fit_objective(cache, objective="boxes")
    assert e.value.param == "objective"


@pytest.mark.parametrize("objective", ["patch", "image", "mil", "hybrid", "fusion"])
def test_estimators_get_the_option_defaults(objective):
    """An unconfigured objective builds its estimator with the registry's defaults, parameter by parameter."""
    kind, params = estimator_for({"objective": objective}, device="cpu")
    est = make_head(kind, **params)
    got = est.get_params()
    checked = 0
    for opt in OPTIONS.values():
        if isinstance(opt.param, str) and opt.param in got and opt.applies(
                {**{n: o.default for n, o in OPTIONS.items()}, "objective": objective}):
            assert got[opt.param] == opt.read(opt.default), (objective, opt.name)
            checked += 1
    assert checked >= 1
    # And the estimator's own defaults are the same numbers: a bare estimator matches the objective's.
    bare = type(est)().get_params()
    assert {k: v for k, v in bare.items() if k not in ("device", "random_state")} == \
        {k: v for k, v in got.items() if k not in ("device", "random_state")} or objective == "hybrid"


def test_option_values_reach_the_estimator():
    kind, params = estimator_for({"objective": "mil", "aggregation": "lse:3", "image_lr": 0.5, "image_hidden": 8})
    assert kind == "mil" and params["aggregation"] == "lse" and params["temperature"] == 3.0
    assert params["lr"] == 0.5 and params["hidden"] == 8 and params["patch_weight"] == 0.0
    kind, params = estimator_for({"objective": "image", "image_pooling": "mean,max", "C": 0.1})
    assert kind == "image-logreg" and params["pooling"] == ("mean", "max") and params["C"] == 0.1
    kind, params = estimator_for({"objective": "patch", "head": "mlp", "hidden": "512+512", "epochs": 3})
    assert kind == "mlp" and params["hidden"] == (512, 512) and params["max_epochs"] == 3 and "C" not in params
    kind, params = estimator_for({"objective": "hybrid"}, params_given={"warmup_epochs": 2})
    assert params["patch_weight"] == OPTIONS["patch_weight"].default and params["warmup_epochs"] == 2
    for bad, name in (({"objective": "patch", "hidden": "x"}, "hidden"), ({"objective": "mil", "aggregation": "mean"},
                                                                         "aggregation"),
                      ({"objective": "image", "image_pooling": "median"}, "image_pooling"),
                      ({"objective": "patch", "head": "forest"}, "head")):
        with pytest.raises(HeadError) as e:
            estimator_for(bad)
        assert e.value.param == name, bad
    with pytest.raises(HeadError, match="no parameter"):
        estimator_for({"objective": "patch", "head": "logreg"}, params_given={"hidden": 3})


def test_relevance_follows_the_objective_and_head():
    base = {n: o.default for n, o in {**OPTIONS, **EVAL_OPTIONS}.items()}
    patch_mlp = relevant({**base, "objective": "patch"})
    assert {"hidden", "dropout", "k", "pooling", "background"} <= patch_mlp and "C" not in patch_mlp
    patch_lr = relevant({**base, "objective": "patch", "head": "logreg"})
    assert "C" in patch_lr and "hidden" not in patch_lr
    assert "k" not in relevant({**base, "objective": "patch", "pooling": "max"})
    image = relevant({**base, "objective": "image"})
    assert {"image_pooling", "image_head", "C"} <= image and not {"k", "pooling", "image_lr", "head"} & image
    assert "image_lr" in relevant({**base, "objective": "image", "image_head": "mlp"})
    hybrid = relevant({**base, "objective": "hybrid"})
    assert {"aggregation", "patch_weight", "background", "image_solver", "image_tol"} <= hybrid
    assert "patch_weight" not in relevant({**base, "objective": "mil"})
    # The learning rate is Adam's: it shapes mil only with the previous solver or an MLP scorer.
    assert "image_lr" not in hybrid
    adam = relevant({**base, "objective": "mil", "image_solver": "adam"})
    assert "image_lr" in adam and "image_tol" not in adam
    assert "image_lr" in relevant({**base, "objective": "mil", "image_hidden": 16})


def test_objectives_and_kinds():
    assert get_objective("patch").pools_patches and not get_objective("mil").pools_patches
    assert get_objective("hybrid").patch_scores and not get_objective("image").patch_scores
    assert "val_split" in options_of("patch") and "val_split" not in options_of("mil")
    assert [objective_of_kind(k) for k in ("mlp", "linearsvm", "image-mlp", "mil", "fusion")] == [
        "patch", "patch", "image", "mil", "fusion"]
    assert all(any(h.name == k for h in get_objective(objective_of_kind(k)).heads) for k in HEAD_KINDS)
    with pytest.raises(HeadError, match="unknown head") as e:
        make_head("forest")
    assert e.value.param == "head"


def test_the_command_line_is_built_from_the_registry():
    runner = CliRunner()
    fit_help = runner.invoke(main, ["fit", "--help"], terminal_width=200).output
    for opt in OPTIONS.values():
        flag = "--" + (opt.name if opt.name == "C" else opt.name.replace("_", "-"))
        assert flag in fit_help, flag
    assert f"[default: {OPTIONS['objective'].default}]" in fit_help
    grid_help = " ".join(runner.invoke(main, ["ablate", "--help"], terminal_width=200).output.split())
    for name, opt in {**OPTIONS, **EVAL_OPTIONS}.items():
        assert (name in grid_help) == opt.grid or name.startswith("val"), name
    eval_help = runner.invoke(main, ["eval", "--help"], terminal_width=200).output
    assert all(p in eval_help for p in EVAL_OPTIONS["pooling"].choices)



@pytest.mark.parametrize("text", ["lse:inf", "lse:nan", "power:nan", "power:-inf", "power:1e9", "lse:0"])
def test_aggregation_parameters_are_finite_and_bounded(text):
    from featurecache.errors import HeadError
    from featurecache.heads.registry import parse_aggregation

    with pytest.raises(HeadError, match=r"the parameter must be a number in \(0, 1000\]") as e:
        parse_aggregation(text)
    assert e.value.param == "aggregation"
    assert parse_aggregation("power:1000") == ("power", 1000.0)


@pytest.mark.parametrize("kind", sorted(HEAD_KINDS))
def test_every_head_kind_satisfies_the_head_estimator_protocol(kind):
    """Every head kind of the objectives table, bare and as its objective's defaults build it."""
    assert isinstance(make_head(kind), HeadEstimator), kind
    objective = get_objective(objective_of_kind(kind))
    if objective.head_option is not None:
        options = {"objective": objective.name, objective.head_option: next(
            h.choice for h in objective.heads if h.name == kind)}
        built, params = estimator_for(options, device="cpu")
        assert built == kind and isinstance(make_head(built, **params), HeadEstimator)
    assert not isinstance(object(), HeadEstimator)


def test_objective_lists_are_derived_from_the_one_table():
    assert set(SINGLE_OBJECTIVES) | set(COMBINING_OBJECTIVES) == set(OBJECTIVES)
    assert not set(SINGLE_OBJECTIVES) & set(COMBINING_OBJECTIVES)
    assert all(get_objective(o).fuses or get_objective(o).chooses for o in COMBINING_OBJECTIVES)
    assert set(MEMBER_OBJECTIVES) == {o for o in OBJECTIVES if not get_objective(o).chooses}
    assert set(OPTIONS["objective"].choices) == set(OBJECTIVES)
    assert OPTIONS["objective"].choices[0] == OPTIONS["objective"].default
    kinds = {h.name for o in OBJECTIVES for h in get_objective(o).heads}
    assert kinds == set(HEAD_KINDS)
    assert OPTIONS["head"].choices == get_objective("patch").head_choices()


@pytest.mark.parametrize("objective,options,stray", [
    ("image", {"hidden": 512}, ("hidden",)),
    ("image", {"hidden": 512, "dropout": 0.2, "C": 0.5}, ("hidden", "dropout")),
    ("mil", {"head": "logreg"}, ("head",)),
    ("patch", {"fusion_rule": "rank"}, ("fusion_rule",)),
])
def test_fit_config_refuses_options_of_another_objective(objective, options, stray):
    with pytest.raises(OptionScopeError, match=f"does not apply to objective {objective}") as e:
        FitConfig(objective, options)
    assert e.value.param == stray[0] and e.value.options == stray and e.value.objective == objective
    assert isinstance(e.value, HeadError)
    assert all(all(n in options_of(o) for n in stray) for o in e.value.owners) and e.value.owners
    FitConfig(objective, {k: v for k, v in options.items() if k not in stray})  # the rest are accepted


def test_fit_config_refuses_validation_data_for_objectives_without_it():
    with pytest.raises(OptionScopeError, match="only used by the patch objective") as e:
        FitConfig("mil", val_split="val")
    assert e.value.param == "val_split" and e.value.owners == ("patch",)
    assert FitConfig("patch", val_split="val").val_split == "val"
    # fusion and auto train members with the options of theirs: a member's option is accepted.
    assert FitConfig("auto", {"hidden": 512}).option("hidden") == 512

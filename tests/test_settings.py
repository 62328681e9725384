"""The options table of stage one, prediction and maps: one definition read by the configs and the command line."""

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from featurecache.cli import main
from featurecache.errors import EvalError, ExtractError, FeaturecacheError, PredictError, ReportError
from featurecache.settings import EXTRACT, INSPECT, LOCALIZE, MAP, PREDICT, REPORT, Setting, check_fields

COMMANDS = {"extract": EXTRACT, "inspect": INSPECT, "predict": PREDICT, "localize": LOCALIZE, "report": REPORT}


def _config(table):
    if table is EXTRACT:
        from featurecache.extract import ExtractConfig

        return ExtractConfig, ExtractError
    if table is PREDICT:
        from featurecache.predict import PredictConfig

        return PredictConfig, PredictError
    if table is REPORT:
        from featurecache.pages import ReportConfig

        return ReportConfig, ReportError
    from featurecache.maps import MapConfig

    return MapConfig, EvalError


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_setting_is_the_commands_option_with_its_default_and_range(command):
    params = {p.name: p for p in main.commands[command].params if isinstance(p, click.Option)}
    for s in COMMANDS[command].values():
        if not s.cli:
            assert s.name not in params
            continue
        p = params[s.name]
        assert s.option in p.opts, (s.name, p.opts)
        assert p.help == s.help
        if s.kind == "scales":
            assert p.default == (None if s.default is None else ",".join(f"{v:g}" for v in s.default))
        else:
            assert p.default == s.default, s.name
        if s.kind in ("choice", "device"):
            assert tuple(p.type.choices) == s.choices
        if s.kind in ("int", "float") and (s.low is not None or s.high is not None):
            assert (p.type.min, p.type.max) == (s.low, s.high), s.name


@pytest.mark.parametrize("table", [EXTRACT, PREDICT, MAP, REPORT], ids=["extract", "predict", "map", "report"])
def test_a_config_refuses_what_the_table_refuses_naming_the_field(table):
    config, error = _config(table)
    for s in table.values():
        bad = {"int": (s.low - 1) if s.low is not None else 1.5, "float": float("nan"), "choice": "no-such",
               "flag": "yes", "scales": (1.0, 1.0)}.get(s.kind)
        if bad is None or s.name not in config.__dataclass_fields__:
            continue
        with pytest.raises(error) as e:
            config(**{s.name: bad})
        assert e.value.param == s.name and s.problem(bad) in str(e.value)
        if s.default is not None:
            assert getattr(config(**{s.name: s.default}), s.name) == (
                tuple(s.default) if s.kind == "scales" else s.default)


def test_the_command_line_refuses_the_same_bounds_as_the_library(tmp_path):
    low = EXTRACT["max_side"].low
    r = CliRunner().invoke(main, ["extract", str(tmp_path), str(tmp_path / "c.h5"), "--max-side", str(low - 1)])
    assert r.exit_code == 2 and "--max-side" in r.output and f"{low - 1} is not in the range x>={low}" in r.output
    with pytest.raises(ExtractError, match=f"max_side: must be an integer of at least {low}"):
        _config(EXTRACT)[0](max_side=low - 1)
    r = CliRunner().invoke(main, ["localize", __file__, __file__, "0", "--stride", str(MAP["stride"].high + 1)])
    assert r.exit_code == 2 and "--stride" in r.output


def test_setting_values_and_messages():
    ranged = Setting("n", 2, "h", low=1, high=4)
    assert ranged.problem(None) is None and ranged.problem(4) is None
    assert ranged.problem(5) == "must be an integer in [1, 4], got 5"
    assert ranged.problem(True) is not None  # a bool is not a count
    assert Setting("t", 1, "h", low=1).problem(0) == "must be a positive integer, got 0"
    unit = Setting("f", 0.5, "h", "float", low=0.0, high=1.0, low_open=True, high_open=True)
    assert [unit.problem(v) is None for v in (0.0, 0.5, 1.0, float("inf"), "0.5")] == [False, True, False, False,
                                                                                         False]
    scales = Setting("s", None, "h", "scales", low=1.0, high=16.0)
    assert scales.problem([1, 2.5]) is None
    assert all(scales.problem(v) for v in ((), "12", 2, (1, 1), (0.5,), (17,), (float("nan"),)))
    assert Setting("c", "a", "h", "choice", ("a", "b")).problem("c") == "must be one of a, b, got 'c'"
    assert Setting("o", None, "h", flag="part_size").option == "--part-size"


def test_check_fields_names_the_first_bad_field_and_honours_skip():
    class Config:
        top, stride = 0, 10**9

    with pytest.raises(PredictError) as e:
        check_fields(Config(), PREDICT, PredictError)
    assert e.value.param == "top"
    with pytest.raises(FeaturecacheError) as e:
        check_fields(Config(), PREDICT, FeaturecacheError, skip=("top",))
    assert e.value.param == "stride"


def test_importing_the_table_loads_no_torch():
    code = "import sys, featurecache.settings; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"

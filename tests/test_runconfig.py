"""The one run configuration (zoplan.runconfig): declared once, written whole, read strictly,
migrated from the unversioned record, and merged with a resume's command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from zoplan import runconfig
from zoplan.errors import ZoplanError
from zoplan.layout import Pins
from zoplan.runconfig import RunConfig, make


def run_options() -> dict[str, object]:
    """`zoplan run`'s command-line options, by the name of the setting each one gives."""
    import typer

    from zoplan.cli import app

    command = typer.main.get_command(app).commands["run"]
    return {p.name: p for p in command.params}


def least(option: Any) -> object:
    """An option's lower bound: typer keeps it on the option (older typers only on its click type)."""
    return option.min if hasattr(option, "min") else option.type.min


def test_every_run_option_is_defaulted_in_the_configuration_only() -> None:
    """An option of `zoplan run` that is a setting of the run has no default of its own (None: not
    given); its bounds and the default its help shows are the configuration's."""
    options = run_options()
    settings = [name for name in options if name in RunConfig.model_fields]
    assert len(settings) >= 20
    for name in settings:
        option, field = options[name], RunConfig.model_fields[name]
        assert option.default is None, name
        if isinstance(field.default, tuple):  # typed comma-separated
            assert option.show_default == ",".join(map(str, field.default)), name
        elif field.default is not None:
            assert option.show_default == str(field.default), name
        low = next((m.ge for m in field.metadata if hasattr(m, "ge")), None)
        if low is not None:
            assert least(option) == low, name


def test_the_configuration_round_trips_through_its_file(tmp_path: Path) -> None:
    cfg = make(
        model="tiny-llama",
        steps=7,
        output=tmp_path,
        pins=Pins(gpus=("rank0", "rank1"), slices=2),
        snapshot_minutes=1.5,
        lr=1e-4,
        device="cpu",
        model_dir=tmp_path / "m",
    )
    path = runconfig.write(cfg, tmp_path)
    assert path == tmp_path / "run.json" and json.loads(path.read_text())["version"] == runconfig.RUN_CONFIG_VERSION
    assert runconfig.read(path) == cfg
    assert not list(tmp_path.glob("*.tmp"))


def test_the_unversioned_record_of_earlier_runs_is_migrated(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"model": "/models/mine", "data": "train.jsonl"}))
    cfg = runconfig.read(tmp_path / "run.json")
    assert (cfg.model, cfg.data, cfg.output, cfg.steps) == (
        "/models/mine",
        "train.jsonl",
        tmp_path,
        runconfig.default("steps"),
    )


@pytest.mark.parametrize(
    "text, words",
    [
        ('{"model": 3', "not a JSON object"),
        ("[1, 2]", "not a JSON object"),
        ('{"model": "m"}', "does not name just the run's model and data"),
        ('{"model": "m", "data": "d", "extra": 1}', "does not name just"),
        ('{"version": 2, "model": "m"}', "version 2 is not one this zoplan reads"),
        ('{"version": true}', "version True"),
        ('{"version": 1, "steps": 0}', "steps"),
        ('{"version": 1, "bogus": 0}', "unknown key 'bogus'"),
        ('{"version": 1, "device": "tpu"}', "device"),
        ('{"version": 1, "snapshot_minutes": Infinity}', "snapshot_minutes"),
        ('{"version": 1, "pins": {"nope": 1}}', "pins"),
        pytest.param("[" * 50000, "not a JSON object", id="nested"),
    ],
)
def test_a_damaged_or_newer_configuration_is_refused_with_its_path(tmp_path: Path, text: str, words: str) -> None:
    (tmp_path / "run.json").write_text(text)
    with pytest.raises(ZoplanError) as caught:
        runconfig.read(tmp_path / "run.json")
    assert str(tmp_path / "run.json") in str(caught.value) and words in str(caught.value)


@pytest.mark.parametrize(
    "values, words",
    [
        ({"steps": 0}, "--steps must be at least 1, got 0"),
        ({"steps": 10**10}, "--steps must be at most 1000000000"),
        ({"snapshot_minutes": float("inf")}, "--snapshot-minutes must be a finite number"),
        ({"eval_every": -1}, "--eval-every must be at least 0"),
        ({"lr": 0.0}, "--lr must be more than 0"),
        ({"master_port": 70000}, "--master-port must be at most 65535"),
        # fine_tune(output="") from Python: not the current directory
        ({"output": ""}, "--output: is empty"),
        ({"data": " "}, "--data: is empty"),
        ({"model": ""}, "--model: is empty"),
        ({"topology": ""}, "--topology: is empty"),
        # the prompt is a format string of the records' fields, and nothing else (runconfig.prompt_fields)
        ({"prompt": "{text:>5} It was"}, r"--prompt: \{text:>5\} is not a field zoplan can fill"),
        ({"prompt": "{text!r} It was"}, r"--prompt: \{text!r\} is not a field"),
        ({"prompt": "{text} It was }"}, r"--prompt: single '\}' encountered in format string: a placeholder is"),
        ({"prompt": "{{text}} It was"}, r"--prompt: the prompt needs a \{text\} placeholder"),
        # the label is what the model predicts: the fix said to give every record a "label" string
        ({"prompt": "{label} {text} It was"}, r"--prompt: \{label\} is the answer the model is to predict"),
        # a byte the command line could not decode (\xff), as Python passes it: the ranks' tokenizer crashed
        ({"prompt": "{text} It was \udcff"}, r"--prompt: it holds '\\udcff' at character 15, which is no character"),
        ({"label_words": ("bad", "go\udcffod")}, r"--label-words: 'go\\udcffod' holds '\\udcff' at character 3"),
    ],
)
def test_a_bad_value_is_named_by_its_option(values: dict, words: str) -> None:
    with pytest.raises(ZoplanError, match=words):
        make(**values)


def test_a_resume_keeps_what_is_trained_and_takes_how_it_goes_on(tmp_path: Path) -> None:
    recorded = make(
        model="/m",
        data="/d.jsonl",
        lr=1e-4,
        seq_len=32,
        snapshot_every=3,
        eval_every=2,
        steps=10,
        output=tmp_path,
        quiet=True,
    )
    cfg, ignored = runconfig.resumed(
        recorded,
        {"steps": 20, "model": "/other", "lr": 1e-4, "seq_len": 64, "keep_snapshots": 5, "output": tmp_path / "moved"},
    )
    # what is trained stays; naming it again with the same value is not worth a warning
    assert (cfg.model, cfg.data, cfg.lr, cfg.seq_len) == ("/m", "/d.jsonl", 1e-4, 32)
    assert ignored == ["--model", "--seq-len"]
    # how the run goes on: given again or kept
    assert (cfg.steps, cfg.keep_snapshots, cfg.snapshot_every, cfg.eval_every) == (20, 5, 3, 2)
    assert cfg.output == tmp_path / "moved" and cfg.quiet is False
    with pytest.raises(ZoplanError, match="--steps must be at least 1"):
        runconfig.resumed(recorded, {"steps": 0})


def test_calibrate_options_are_defaulted_in_its_configuration_only() -> None:
    import typer

    from zoplan.cli import app
    from zoplan.runconfig import CalibrateConfig

    params = {p.name: p for p in typer.main.get_command(app).commands["calibrate"].params}
    settings = [name for name in params if name in CalibrateConfig.model_fields]
    assert len(settings) == 9
    for name in settings:
        assert params[name].default is None, name
    assert least(params["steps"]) == 2 and params["steps"].show_default == "20"


@pytest.mark.parametrize(
    "values, words",
    [
        ({"micro_batches": (1, 4)}, "--micro-batches: the counts timed must include 1 and 2"),
        ({"micro_batches": (1, 2, 1000)}, "each from 1 to 999"),
        ({"steps": 1}, "--steps must be at least 2"),
        ({"seq_len": 0}, "--seq-len must be at least 2"),
    ],
)
def test_a_bad_calibration_setting_is_named_by_its_option(values: dict, words: str) -> None:
    with pytest.raises(ZoplanError, match=words):
        runconfig.make_calibration(**values)


def test_a_calibration_configuration_reads_back_as_the_ranks_see_it(tmp_path: Path) -> None:
    cfg = runconfig.make_calibration(micro_batches=(4, 1, 2), dtype="bf16", model_dir=tmp_path, figures=tmp_path / "f")
    assert cfg.micro_batches == (1, 2, 4) and cfg.dtype == "bf16"
    assert runconfig.read_calibration(runconfig.write_calibration(cfg, tmp_path)) == cfg


def test_a_pin_of_zero_is_a_pin() -> None:
    """`--resident 0` is given as much as `--resident 2`: a plan file refuses it, a resume names it."""
    from zoplan.layout import Pins
    from zoplan.runconfig import pin_flags, planned_flags

    assert pin_flags(Pins(resident=0, perturbation=2)) == ["--pertp", "--resident"]
    assert pin_flags(None) == [] and pin_flags(Pins()) == []
    assert planned_flags({"pins": Pins(resident=0), "lr": 1e-3}) == ["--resident", "--lr"]

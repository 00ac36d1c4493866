"""Each option is declared once, on its config field: the commands are generated from the fields."""

from __future__ import annotations

import dataclasses
import re

import pytest
import typer
from typer.testing import CliRunner

from ltclip.cli import app
from ltclip.cli.generate import command, config_options
from ltclip.cli.train import HEAD_DEFAULTED
from ltclip.config import (
    EvalConfig, ExportConfig, ExtractConfig, FinetuneConfig, PredictConfig, ReproduceConfig, SecondStageConfig, TrainHeadConfig, flags_of,
    option, option_fields,
)

runner = CliRunner()
# Each command, the configs whose fields are its options, and the parameters that are no field.
COMMANDS = {
    "extract": ((ExtractConfig,), {"config"}),
    "train-head": ((TrainHeadConfig, SecondStageConfig), {"config", "resume"}),
    "finetune": ((FinetuneConfig,), {"config", "resume"}),
    "eval": ((EvalConfig,), {"config", "runs"}),
    "predict": ((PredictConfig,), {"items"}),
    "export": ((ExportConfig,), {"run"}),
}


def click_command(name: str):
    return typer.main.get_command(app).commands[name]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_field_is_an_option_of_its_command_and_nothing_else_is(name):
    classes, extras = COMMANDS[name]
    params = {p.name: p for p in click_command(name).params if p.name != "help"}
    fields = {}
    for cls in classes:
        fields.update({k: v for k, v in flags_of(cls).items() if k not in fields})
    assert set(params) == set(fields) | extras
    for field, flag in fields.items():
        assert flag in params[field].opts, (field, flag, params[field].opts)
        assert params[field].default is None  # not given: the layers below choose


@pytest.mark.parametrize("name", COMMANDS)
def test_boolean_flags_are_named_positively(name):
    for param in click_command(name).params:
        assert not any(opt.startswith("--no-") for opt in param.opts), param.opts


def help_of(*args) -> str:
    result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "400"}, terminal_width=400)
    assert result.exit_code == 0, result.output
    return re.sub(r"\s+", " ", result.output.replace("│", " "))


def test_help_shows_each_commands_own_defaults():
    finetune = help_of("finetune")
    assert "Rows per optimizer step, over all processes. [default: 128]" in finetune
    assert "Peak learning rate. [default: 0.01]" in finetune and "[default: sgd]" in finetune  # LIFT's
    assert "[default: LIFT's: the resolution × 8/7, 256 at 224]" in finetune
    train_head = help_of("train-head")
    assert "finetune" not in train_head.lower().replace("finetuned", "")
    assert "Rows per optimizer step, over all processes. [default: 256; with --from: 512]" in train_head
    assert "Peak learning rate. [default: the head's (`ltclip list heads`); with --from: 0.1]" in train_head
    assert "Head (`ltclip list heads`). [default: decoder]" in train_head
    assert "[default: 10]" not in train_head.split("--epochs")[1].split("--")[0]  # the head's, not the dataclass's


def test_the_options_heads_set_are_the_ones_help_says_they_set():
    from ltclip.recipes.resolve import head_defaults
    from ltclip.models.heads import HEADS

    for name in HEADS.names():
        for loss in ("ce", "balanced_softmax"):
            chosen = set(head_defaults(name, {"loss": loss})) - {"min_steps"}
            assert chosen <= set(HEAD_DEFAULTED), (name, chosen)


def test_a_new_field_is_a_new_option_with_its_help_and_default():
    @dataclasses.dataclass(frozen=True)
    class Toy:
        width: int = option(7, "How wide.", short="-w")
        verbose_log: bool = option(False, "Log more.")
        tags: tuple[str, ...] = option((), "Tags (repeatable).", flag="--tag")

    seen = {}
    toy = typer.Typer()
    toy.command()(command("toy", "A toy.", config_options(Toy), lambda values: seen.update(values)))
    result = runner.invoke(toy, ["-w", "3", "--verbose-log", "--tag", "a", "--tag", "b"])
    assert result.exit_code == 0, result.output
    assert seen == {"width": 3, "verbose_log": True, "tags": ["a", "b"]}
    runner.invoke(toy, [])
    assert seen == {"width": None, "verbose_log": None, "tags": None}  # not given
    text = re.sub(r"\s+", " ", runner.invoke(toy, ["--help"], terminal_width=400).output.replace("│", " "))
    assert "How wide. [default: 7]" in text and "--verbose-log --no-verbose-log" in text and "Log more. [default: off]" in text


def test_reproduce_takes_the_dataset_options_and_its_own():
    params = {p.name for p in click_command("reproduce").params}
    assert set(option_fields(ReproduceConfig)) <= params and {"dataset", "data_root", "manifest_dir"} <= params


def test_a_config_saved_by_an_earlier_version_still_reruns(tmp_path):
    """config.json of earlier versions: method options as key=value strings, ``no_decay_1d`` (now
    ``decay_1d``, named positively): read by ``--config`` and by the stages' saved-config reader alike."""
    import json

    from ltclip.config import TrainHeadConfig, load_config_file
    from ltclip.recipes.resolve import saved_config

    old = {"features": "f", "out": "o", "method": {"head": "decoder", "head_opts": ["depth=1", "final_norm=false"], "loss": "ldam",
                                                   "loss_opts": ["drw_epoch=1"], "sampler": "instance"},
           "optim": {"epochs": 2, "no_decay_1d": True, "lr": 0.01}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))
    cfg = saved_config(TrainHeadConfig, old)
    assert cfg.method.head_opts == {"depth": 1, "final_norm": False} and cfg.method.loss_opts == {"drw_epoch": 1}
    assert cfg.optim.decay_1d is False and cfg.optim.epochs == 2
    values = load_config_file(path)
    assert values["decay_1d"] is False and values["head_opts"] == ["depth=1", "final_norm=false"]
    new = {**old, "method": {**old["method"], "head_opts": {"depth": 1, "final_norm": False}, "loss_opts": {"drw_epoch": 1}}}
    assert load_config_file(_write(tmp_path / "new.json", new))["head_opts"] == ["depth=1", "final_norm=False"]
    assert saved_config(TrainHeadConfig, new) == cfg  # the current format reads back to the same config


def _write(path, data):
    import json

    path.write_text(json.dumps(data))
    return path


def test_method_options_are_parsed_once_when_the_config_is_built():
    from ltclip.core.errors import LtclipError
    from ltclip.recipes.resolve import finetune_config, second_stage_config, stage_one_config

    cfg = stage_one_config({"features": "f", "out": "o", "head": "mlp", "head_opts": ("hidden=8", "dropout=0.5"),
                            "loss": "focal", "loss_opts": ("gamma=0.5",)})
    assert cfg.method.head_opts == {"hidden": 8, "dropout": 0.5} and cfg.method.loss_opts == {"gamma": 0.5}
    assert type(cfg.method.head_opts["hidden"]) is int  # typed as the option's default
    with pytest.raises(LtclipError, match="gamma must be >= 0"):  # a value the loss refuses, before anything runs
        stage_one_config({"features": "f", "out": "o", "loss": "focal", "loss_opts": ("gamma=-1",)})
    with pytest.raises(LtclipError, match="--head-opt 'width' is not an option of head 'mlp'"):
        stage_one_config({"features": "f", "out": "o", "head": "mlp", "head_opts": ("width=3",)})
    second = second_stage_config({"from_run": "r", "out": "o", "two_stage": "crt", "loss_opts": ("tau=2",), "loss": "logit_adjusted"})
    assert second.loss_opts == {"tau": 2.0}
    with pytest.raises(LtclipError, match="--two-stage-opt needs --two-stage METHOD"):
        second_stage_config({"from_run": "r", "out": "o", "posthoc_la": True, "two_stage_opts": ("x=1",)})
    assert finetune_config({"out": "o", "tune": "lora", "tune_opts": ("rank=4",)}).tuning.tune_opts == {"rank": 4}


def test_finetune_names_its_run_folder_after_what_the_recipe_chose(tmp_path, monkeypatch):
    from ltclip.recipes.resolve import finetune_config

    monkeypatch.chdir(tmp_path)
    heard = []
    cfg = finetune_config({"recipe": "lift"}, say=lambda option, text: heard.append((option, text)))
    assert cfg.out == "runs/finetune-adaptformer-cosine-logit_adjusted-instance" and cfg.method.head_opts["init"] == "text"
    assert ("--out", cfg.out) in heard

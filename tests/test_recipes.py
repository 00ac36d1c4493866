"""Recipes as data: per-dataset values, checked like the stage's own."""

from __future__ import annotations

import pytest

from ltclip.core.errors import LtclipError
from ltclip.recipes import RECIPE_DIR, load_recipe
from ltclip.recipes.resolve import finetune_config


def test_a_recipes_dataset_table_applies_to_that_dataset_only():
    heard = []
    inat = finetune_config({"out": "o", "recipe": "lift", "dataset": "inat18"}, say=lambda option, text: heard.append((option, text)))
    assert inat.optim.epochs == 20 and ("--epochs", "20 from --recipe lift") in heard
    assert finetune_config({"out": "o", "recipe": "lift", "dataset": "places_lt"}).optim.epochs == 10
    assert finetune_config({"out": "o", "recipe": "lift", "dataset": "inat18", "epochs": 3}).optim.epochs == 3  # given wins


def test_a_dataset_table_is_checked_like_the_stage(monkeypatch, tmp_path):
    (tmp_path / "bad.toml").write_text('summary = "x"\n[finetune]\nlr = 0.1\n[finetune.dataset.inat18]\nlearning_rate = 1\n')
    monkeypatch.setattr("ltclip.recipes.RECIPE_DIR", tmp_path)
    with pytest.raises(LtclipError, match="--learning-rate: not an option of finetune"):
        load_recipe("bad")
    assert RECIPE_DIR.name == "recipes"


def test_a_config_records_the_recipe_it_was_resolved_with_and_reruns_from_it():
    from ltclip.config import FinetuneConfig, to_dict
    from ltclip.recipes.resolve import extract_config, saved_config, stage_one_config

    lift = finetune_config({"out": "o", "recipe": "lift"})
    assert lift.recipe == "lift" and to_dict(lift)["recipe"] == "lift"  # config.json names it: reports label the run by it
    assert finetune_config({"out": "o"}).recipe is None
    seed = stage_one_config({"features": "f", "out": "o", "recipe": "imbalance-vlm"})
    assert seed.recipe == "imbalance-vlm" and extract_config({"out": "o", "recipe": "imbalance-vlm"}).recipe == "imbalance-vlm"
    assert saved_config(FinetuneConfig, to_dict(lift)) == lift  # read back from config.json


@pytest.mark.parametrize("text, message", [
    ('[train-head]\nhead = "linear"\n[train-head.head_opts]\nlinear = ["depth=3"]\n',
     "^--head-opt 'depth' is not an option of head 'linear'; valid keys: "),
    ('[train-head]\nhead = "linear"\n[train-head.head_opts]\nliner = ["normalize=true"]\n',
     "^recipe bad: head_opts for 'liner', which is not one of the heads"),
    ('[loss_opts]\nfocal = ["gamma=abc"]\n[train-head]\nloss = "focal"\n', r"^--loss-opt gamma='abc': expected float"),
])
def test_a_recipes_method_options_are_checked_without_torch(monkeypatch, tmp_path, text, message):
    """Against the catalog (the registries' checked copy): a recipe loads before torch, for the command
    line's own check of the method options it chooses."""
    (tmp_path / "bad.toml").write_text('summary = "x"\n' + text)
    monkeypatch.setattr("ltclip.recipes.RECIPE_DIR", tmp_path)
    with pytest.raises(LtclipError, match=message):
        load_recipe("bad")

"""The config tree: recipes, dotted overrides, every problem reported at once."""

from __future__ import annotations

import pytest

from lorafit.config import list_recipes, load_config, save_config
from lorafit.errors import ConfigError, LorafitError


def test_quotes_recipe_has_the_published_setup():
    cfg = load_config("quotes")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets) == (8, 16.0, 0.05, "auto")
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lorafit.lora import resolve_targets

    with torch.device("meta"):  # auto on GPT-2 is the blog's c_attn (invariant 1 counts it)
        assert resolve_targets(GPT2LMHeadModel(GPT2Config()), cfg.lora.targets) == (["c_attn"], None)
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.batch_size, cfg.train.grad_accum) == (5, 2e-4, 4, 2)
    assert cfg.data.seq_len == 64 and cfg.data.sources["quotes"].text_field == "quote"
    assert cfg.data.sources["quotes"].path == "Abirate/english_quotes"


def test_overrides_are_typed_and_nested():
    cfg = load_config("quotes", ["lora.r=16", "lora.targets=[c_attn, c_proj]", "train.lr=1e-3", "train.max_steps=5",
                                 "data.sources.quotes.path=x.jsonl", "output_dir=runs/x"])
    assert cfg.lora.r == 16 and cfg.lora.targets == ["c_attn", "c_proj"]
    assert cfg.train.lr == 1e-3 and cfg.train.max_steps == 5
    assert cfg.data.sources["quotes"].path == "x.jsonl" and cfg.output_dir == "runs/x"


def test_every_problem_is_collected_with_the_nearest_name():
    with pytest.raises(ConfigError) as err:
        load_config("quotes", ["lora.rank=4", "train.lr=abc", "lora.dropout=1.0", "lora.alpha=-1",
                               "data.sources.quotes.text_feild=q", "train.batch_size=2.5", "nokey", "data.packing=tight"])
    text = str(err.value)
    assert "did you mean 'r'" in text and "did you mean 'text_field'" in text
    assert "train.lr: expected a number" in text and "train.batch_size: expected an integer" in text
    assert "lora.dropout: must be in [0, 1)" in text and "lora.alpha: must be positive" in text
    assert "override 'nokey'" in text
    assert "data.packing: 'tight' is not one of auto, segments, rows" in text
    assert len(err.value.problems) == 8


def test_unknown_recipe_suggests_and_lists():
    with pytest.raises(LorafitError, match="Did you mean 'quotes'"):
        load_config("quote")
    assert "quotes" in list_recipes()


def test_yaml_file_recipe_and_round_trip(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("data:\n  sources:\n    a: {path: a.txt}\nlora: {r: 2}\n")
    cfg = load_config(str(path))
    assert cfg.recipe == "mine" and cfg.lora.r == 2
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(str(tmp_path / "saved.yaml")) == cfg  # as `train --resume RUN_DIR` reads a run's config.yaml


@pytest.mark.parametrize("override, fragments", [
    ("train.lr=\x01", ["train.lr=\\x01", "the control character U+0001 at line 1, column 1", "Remove it"]),
    ("output_dir=runs/a\x07b", ["the control character U+0007 at line 1, column 7"]),
    ("output_dir=runs/caf\udce9", ["byte 0xe9 at character 20 is not valid UTF-8", "UTF-8"]),  # argv's bytes
], ids=["control-in-number", "control-in-path", "not-utf8"])
def test_an_override_with_a_control_character_or_bytes_not_utf8_is_one_problem(override, fragments):
    """yaml.SafeLoader refused these while it was built, outside the try: a traceback."""
    with pytest.raises(ConfigError) as err:
        load_config("quotes", [override])
    assert len(err.value.problems) == 1
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_a_recipe_with_a_control_character_names_its_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 1.0e-4\n  epochs: \x1b[31m2\n", encoding="utf-8")
    with pytest.raises(LorafitError, match=r"r.yaml: the control character U\+001B at line 3, column 11, which YAML "
                                           r"does not allow"):
        load_config(str(recipe))

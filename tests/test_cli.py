"""End to end through the command line: init-model -> train -> eval -> generate -> merge, and failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorafit.cli import main

TRAIN_ARGS = ["train.max_steps=6", "train.eval_every=3", "train.log_every=2", "eval.sample_max_new_tokens=5"]


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lorafit", *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=300
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, texts_file):
    out = tmp_path_factory.mktemp("runs") / "quotes"
    code = main(["train", "quotes", f"model.name={tiny_model_dir}", f"data.sources.quotes.path={texts_file}",
                 f"output_dir={out}", "--no-progress", *TRAIN_ARGS])
    assert code == 0
    return out


def test_train_writes_a_complete_run_directory(trained_run):
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer_config.json",
                 "config.yaml", "metrics.jsonl", "summary.json", "loss.png", "README.md"):
        assert (trained_run / name).is_file(), name
    summary = json.loads((trained_run / "summary.json").read_text())
    for key in ("trainable_params", "total_params", "train_examples", "val_examples", "train_tokens", "train_seconds",
                "train_tokens_per_second", "final_train_loss", "val_loss", "val_ppl", "val_bits_per_token",
                "val_bits_per_byte"):
        assert summary[key] is not None, key
    assert summary["train_examples"] + summary["val_examples"] == 120
    assert summary["val_examples"] == 12  # ceil(0.1 * 120)
    assert summary["optimizer_steps"] == 6
    assert (trained_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (trained_run / "README.md").read_text()
    assert "PeftModel.from_pretrained" in card and "r = 8" in card


def test_metrics_log_has_each_logged_step_once(trained_run):
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "loss" in r]
    eval_steps = [r["step"] for r in records if "val_loss" in r]
    assert train_steps == [2, 4, 6]
    assert eval_steps == [0, 3, 6]  # before training, every 3 steps, final
    assert all(r["tokens_per_second"] > 0 and r["lr"] >= 0 for r in records if "loss" in r)
    assert all("sample" in r for r in records if "val_loss" in r)


def test_eval_command_reproduces_the_summary(trained_run, capsys):
    assert main(["eval", str(trained_run)]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((trained_run / "summary.json").read_text())
    assert result["val_examples"] == summary["val_examples"]
    assert result["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
    assert result["val_ppl"] == pytest.approx(torch.tensor(result["val_loss"]).exp().item(), rel=1e-6)
    assert result["eval_samples_per_second"] > 0 and result["eval_tokens_per_second"] > 0


def test_generate_compare_base_shows_both(trained_run, capsys):
    assert main(["generate", str(trained_run), "The secret", "--max-new-tokens", "8", "--compare-base", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "base" in out and "fine-tuned" in out and out.count("The secret") >= 2


def test_generate_accepts_a_plain_adapter_directory(trained_run, capsys):
    assert main(["generate", str(trained_run / "adapter"), "Hello", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert "Hello" in capsys.readouterr().out


def test_merge_gives_the_logits_of_base_plus_adapter(trained_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorafit.generate import load_for_inference

    assert main(["merge", str(trained_run), str(tmp_path / "merged")]) == 0
    # The base's own activation name, not the one-kernel name it was loaded with (the same function).
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["activation_function"] == "gelu_new"
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    peft_model, _, _ = load_for_inference(trained_run, precision="fp32", device=torch.device("cpu"))
    ids = torch.randint(0, 200, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, atol=1e-4, rtol=0)


def test_peft_loads_the_run_adapter_with_lorafits_logits(trained_run):
    """Exactly lorafit's logits with the base's GELU in one kernel, as lorafit loads it (gelu_pytorch_tanh); the
    base's own gelu_new (seven elementwise ops) differs by rounding only."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorafit.generate import load_for_inference

    config = json.loads((trained_run / "adapter" / "adapter_config.json").read_text())
    ours, _, _ = load_for_inference(trained_run, precision="fp32", device=torch.device("cpu"))
    ids = torch.randint(0, 200, (1, 40))
    for activation in ("gelu_pytorch_tanh", "gelu_new"):
        base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], activation_function=activation)
        theirs = PeftModel.from_pretrained(base, str(trained_run / "adapter")).eval()
        with torch.no_grad():
            if activation == "gelu_pytorch_tanh":
                assert torch.equal(theirs(ids).logits, ours(ids).logits)
            else:
                torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)


def test_the_command_hides_two_peft_warnings_only(tmp_path, monkeypatch):
    """No blanket filter on PEFT: only its notes that it set fan_in_fan_out and that it could not check a Hub
    base's vocabulary offline are hidden (both by their message); another PEFT warning still shows."""
    import warnings

    from transformers import GPT2Config, GPT2LMHeadModel

    from lorafit.cli import _quiet_libraries
    from lorafit.config import LoraConfig
    from lorafit.lora import apply_lora

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=300))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _quiet_libraries()
        model = apply_lora(base, LoraConfig(r=4, targets=["c_attn"]))
        model.peft_config["default"].base_model_name_or_path = "gpt2"  # a Hub id, offline
        model.save_pretrained(str(tmp_path / "adapter"))
        apply_lora(base, LoraConfig(r=4, targets=["c_fc"]))  # wrapped twice: PEFT says so
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert not [m for m in messages if "fan_in_fan_out" in m or "vocabulary" in m], messages
    assert any("modify a model with PEFT for a second time" in m for m in messages), messages


# ---------------------------------------------------------------- failures: one message, exit 2, no traceback


def assert_clean_failure(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in proc.stderr, (f, proc.stderr)


def test_offline_quotes_says_which_overrides_use_local_files(tmp_path):
    proc = run_cli("train", "quotes", f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_clean_failure(proc, "model.name=", "data.sources.quotes.path=", "offline")
    assert not (tmp_path / "run").exists()  # nothing was created


def test_missing_local_file_is_named(tmp_path, tiny_model_dir):
    proc = run_cli("train", "quotes", f"model.name={tiny_model_dir}", f"data.sources.quotes.path={tmp_path}/nope.jsonl",
                   f"output_dir={tmp_path / 'run'}")
    assert_clean_failure(proc, "nope.jsonl")


def test_absent_text_field_lists_the_fields(tmp_path, tiny_model_dir, texts_file):
    proc = run_cli("train", "quotes", f"model.name={tiny_model_dir}", f"data.sources.quotes.path={texts_file}",
                   "data.sources.quotes.text_field=body", f"output_dir={tmp_path / 'run'}")
    assert_clean_failure(proc, "body", "quote", "author")


def test_all_config_problems_reported_at_once(tmp_path):
    proc = run_cli("train", "quotes", "lora.rr=4", "train.lr=fast", "lora.dropout=1.5", f"output_dir={tmp_path}/x")
    assert_clean_failure(proc, "3 problems", "did you mean 'r'", "train.lr", "lora.dropout")


def test_unknown_recipe_lists_the_recipes():
    proc = run_cli("train", "qoutes")
    assert_clean_failure(proc, "Did you mean 'quotes'", "Shipped recipes: ")


def test_rows_and_segments_layouts_train_the_same_adapter(tmp_path, tiny_model_dir, texts_file):
    """The two packed layouts are two ways of computing one loss: with every dropout off, training
    through either ends at the same validation loss."""
    summaries = {}
    for packing in ("rows", "segments"):
        out = tmp_path / packing
        code = main(["train", "quotes", f"model.name={tiny_model_dir}", f"data.sources.quotes.path={texts_file}",
                     f"output_dir={out}", "--no-progress", "train.max_steps=4", "model.dropout=0", "lora.dropout=0",
                     "eval.sample_prompt=null", "train.lr=1e-2", f"data.packing={packing}"])
        assert code == 0
        summaries[packing] = json.loads((out / "summary.json").read_text())
    rows, segments = summaries["rows"], summaries["segments"]
    assert rows["val_before_training"]["val_loss"] == pytest.approx(segments["val_before_training"]["val_loss"], rel=1e-6)
    assert rows["val_loss"] == pytest.approx(segments["val_loss"], rel=1e-5)
    assert rows["val_loss"] < rows["val_before_training"]["val_loss"] - 1e-3  # training moved it: the check has teeth

"""End to end through the command line: init-model -> train -> eval -> generate -> merge, and failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import greedy_continuation
from lorafit.cli import main

TRAIN_ARGS = ["train.max_steps=6", "train.eval_every=3", "train.log_every=2", "eval.sample_max_new_tokens=5"]


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
    # the sample of the final eval: the prompt and what the trained adapter samples from it (seed train.seed)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "The secret to happiness is"  # the recipe's eval.sample_prompt
    base = AutoModelForCausalLM.from_pretrained(json.loads((trained_run / "adapter" / "adapter_config.json").read_text())
                                                ["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(trained_run / "adapter")).eval()
    tok = AutoTokenizer.from_pretrained(str(trained_run / "adapter"))
    ids = torch.tensor([tok(prompt)["input_ids"]])
    torch.manual_seed(42)  # the recipe's train.seed
    with torch.no_grad():  # temperature 0.7, no top-k or top-p (transformers' default would be top_k=50)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=True,
                             temperature=0.7, top_k=0, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    continuation = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert continuation  # tokens were generated: the comparison has teeth
    assert records[-1]["step"] == 6 and records[-1]["sample"] == prompt + continuation


def test_eval_command_reproduces_the_summary_without_probing_or_tokenising_training_data(trained_run, capsys,
                                                                                         monkeypatch):
    import lorafit.data.prepare
    import lorafit.fastpath

    def no_probe(*args, **kwargs):
        raise AssertionError("lorafit eval ran the fast-path probe")

    tokenised, real_tokenize = [], lorafit.data.prepare.tokenize_cached
    monkeypatch.setattr(lorafit.fastpath, "choose_fast_paths", no_probe)
    monkeypatch.setattr(lorafit.data.prepare, "tokenize_cached",
                        lambda items, *a, **k: tokenised.append(len(items)) or real_tokenize(items, *a, **k))
    assert main(["eval", str(trained_run)]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((trained_run / "summary.json").read_text())
    assert tokenised == [summary["val_examples"]]  # validation alone
    assert result["val_examples"] == summary["val_examples"]
    assert result["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
    assert result["eval_samples_per_second"] > 0 and result["eval_tokens_per_second"] > 0


def test_eval_loaded_otherwise_than_trained_scores_plainly_and_the_same(trained_run, capsys, monkeypatch):
    """Another attention implementation than training's: the run's checked fast paths do not apply, so
    scoring falls back to one example a row and the model's own logits (still no probe), same loss."""
    import lorafit.evaluate
    import lorafit.fastpath

    monkeypatch.setattr(lorafit.fastpath, "choose_fast_paths", lambda *a, **k: pytest.fail("probe ran"))
    used, real = [], lorafit.evaluate.evaluate_run
    monkeypatch.setattr(lorafit.evaluate, "evaluate_run", lambda m, s, n, scoring, **k: used.append(scoring.fast) or real(m, s, n, scoring, **k))
    assert main(["eval", str(trained_run), "--attn-implementation", "eager"]) == 0
    out = capsys.readouterr()
    result, summary = json.loads(out.out), json.loads((trained_run / "summary.json").read_text())
    assert used == [lorafit.evaluate.PLAIN] and "attention eager" in out.err
    assert result["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)


def greedy_reference(run: Path, prompt: str, n: int, adapter: bool = True) -> str:
    """Plain transformers (+ PEFT): the greedy continuation of `prompt` by the base (and the run's adapter)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_name = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = AutoModelForCausalLM.from_pretrained(base_name)
    model = PeftModel.from_pretrained(model, str(run / "adapter")) if adapter else model
    tok = AutoTokenizer.from_pretrained(str(run / "adapter"))
    return greedy_continuation(model, tok, tok(prompt)["input_ids"], n)


def test_generate_compare_base_gives_the_base_and_the_tuned_continuations(trained_run, monkeypatch):
    import lorafit.cli

    shown = []
    monkeypatch.setattr(lorafit.cli, "show", lambda *a: shown.append(a))
    assert main(["generate", str(trained_run), "The secret", "--max-new-tokens", "8", "--temperature", "0",
                 "--compare-base"]) == 0
    ((prompt, tuned, base, _),) = shown
    assert prompt == "The secret"
    assert tuned == [greedy_reference(trained_run, "The secret", 8)]
    assert base == [greedy_reference(trained_run, "The secret", 8, adapter=False)]


def test_generate_prints_the_continuation_of_a_plain_adapter_directory(trained_run, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "500")  # one line: rich wraps at the terminal's width
    assert main(["generate", str(trained_run / "adapter"), "Hello", "--max-new-tokens", "6", "--temperature", "0"]) == 0
    printed = "".join(capsys.readouterr().out.split())
    assert "".join(("Hello" + greedy_reference(trained_run, "Hello", 6)).split()) in printed


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


# ---------------------------------------------------------------- failures (the bad-input cases: test_bad_input.py)


def test_offline_quotes_says_which_overrides_use_local_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # HF_HUB_OFFLINE=1 (conftest): the Hub is out of reach
    assert main(["train", "quotes", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for fragment in ("Could not load tokenizer 'gpt2'", "To run offline, point lorafit at local files",
                     "model.name=LOCAL_MODEL_DIR", "data.sources.quotes.path=LOCAL_FILE"):
        assert fragment in err, (fragment, err)
    assert not (tmp_path / "run").exists()  # nothing was created


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

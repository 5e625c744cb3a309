"""Any causal LM, exactly: a matrix of tiny random models of common families, each trained, evaluated
and sampled through lorafit with its default targets, and checked against plain transformers + PEFT."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import greedy_continuation, make_texts
from families import FAMILIES, build_model, save_family_model


@pytest.fixture(scope="module")
def family_texts(tmp_path_factory):
    path = tmp_path_factory.mktemp("family-data") / "texts.jsonl"
    path.write_text("".join(json.dumps({"quote": t}) + "\n" for t in make_texts(50, seed=3, max_words=12)), encoding="utf-8")
    return path


def plain_val_loss(model_dir, adapter_dir, val) -> float:
    """Each validation example alone through plain transformers + PEFT: the summed NLL over all, per target."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(adapter_dir)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(val)):
            ids = torch.from_numpy(val.example(i).astype("int64"))[None]
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return total / count


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_with_default_targets_and_reports_the_plain_models_loss(family, tmp_path, tiny_tokenizer, family_texts,
                                                                              capsys):
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
    from transformers import AutoModelForCausalLM

    from lorafit.cli import main
    from lorafit.config import load_config
    from lorafit.data.sources import load_corpus
    from lorafit.data.tokenize import tokenize_texts
    from lorafit.generate import load_for_inference
    from lorafit.lora import all_linear_targets
    from lorafit.train import train

    model_dir = save_family_model(family, tiny_tokenizer, tmp_path / "model")
    run = tmp_path / "run"
    cfg = load_config("quotes", [
        f"model.name={model_dir}", f"data.sources.quotes.path={family_texts}", "data.seq_len=40", "train.max_steps=2",
        "train.lr=5e-3", "eval.before_training=false", "eval.sample_prompt=null", f"output_dir={run}",
    ])
    summary = train(cfg, progress=False)

    # Default targets: PEFT's for the architecture where it has one, else every linear layer but the head,
    # less exactly the modules PEFT itself refuses to wrap on this model or whose LoRA the loss never reaches
    # (asked here of plain PEFT on a fresh copy each).
    model_type = AutoModelForCausalLM.from_pretrained(str(model_dir)).config.model_type
    expected = PEFT_DEFAULTS.get(model_type) or all_linear_targets(build_model(family, len(tiny_tokenizer), tiny_tokenizer.eos_token_id))

    def peft_accepts_and_trains(target: str) -> bool:
        """Plain PEFT wraps `target` on a fresh model, and the loss's gradient reaches its LoRA B weights."""
        try:
            wrapped = get_peft_model(build_model(family, len(tiny_tokenizer), tiny_tokenizer.eos_token_id),
                                     PeftLoraConfig(r=2, target_modules=[target], task_type="CAUSAL_LM"))
        except ValueError:
            return False
        ids = torch.randint(0, len(tiny_tokenizer), (1, 8), generator=torch.Generator().manual_seed(5))
        loss = wrapped(input_ids=ids, labels=ids).loss
        if not loss.requires_grad:  # no LoRA weight in the loss's graph
            return False
        loss.backward()
        return all(p.grad is not None and p.grad.abs().max() > 0 for n, p in wrapped.named_parameters() if "lora_B" in n)

    assert summary["lora_targets"] == [t for t in expected if peft_accepts_and_trains(t)]
    assert summary["packing"] in ("segments", "rows", "padded") and summary["trainable_params"] > 0
    # Every LoRA weight trained: B starts at zero, so a B still all zero is a module the loss never reached.
    from safetensors.torch import load_file

    lora_b = {k: v for k, v in load_file(str(run / "adapter" / "adapter_model.safetensors")).items() if "lora_B" in k}
    assert lora_b and all(v.abs().max() > 0 for v in lora_b.values()), [k for k, v in lora_b.items() if not v.abs().max() > 0]

    # The adapter as PEFT loads it gives the logits of lorafit's own loading.
    ids = torch.randint(0, len(tiny_tokenizer) - 1, (2, 12), generator=torch.Generator().manual_seed(0))
    ours, _, _ = load_for_inference(run, precision="fp32", device=torch.device("cpu"))
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(run / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-6, rtol=1e-6)

    # The reported validation loss is that of each example alone through plain transformers + PEFT.
    corpus = load_corpus(cfg.data)
    val = tokenize_texts(corpus.val_texts, corpus.val_sources, tiny_tokenizer, cfg.data.seq_len, cfg.data.long_examples)
    reference = plain_val_loss(model_dir, run / "adapter", val)
    assert summary["val_examples"] == len(val)
    assert abs(summary["val_loss"] - reference) <= 1e-5 * reference, (summary["packing"], summary["val_loss"], reference)

    # eval and generate work on the run, loading the base as it was trained.
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert abs(evaluated["val_loss"] - summary["val_loss"]) <= 1e-6 * reference
    import lorafit.cli

    shown = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lorafit.cli, "show", lambda *a: shown.append(a))
        assert main(["generate", str(run), "The", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    ((prompt, tuned, _, _),) = shown
    assert prompt == "The" and tuned == [greedy_continuation(theirs, tiny_tokenizer, tiny_tokenizer("The")["input_ids"], 4)]

"""Preference objectives exact against TRL: DPOTrainer (DPO, IPO), and TRL's experimental ORPOTrainer and
CPOTrainer (SimPO), on the same tiny model, initial adapter and pairs, dropout 0, fp32 on CPU: the step-1
loss and LoRA gradients within 1e-5 relative, the adapter after 10 steps within 1e-4."""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch

from lorafit.config import load_config
from lorafit.rundir import RunDir

pytest.importorskip("trl")  # a dev dependency; listed in pyproject's dev extra

N_PAIRS = 9  # 8 train + 1 validation (val_fraction 0.1): every step is the 8 training pairs
STEPS = 10
LR = 5e-3
# TRL's ORPO and CPO trainers prepend the tokenizer's BOS (GPT-2's is <|endoftext|>) to a prompt that lacks it; the
# prompts start with it, so every trainer sees the same tokens.
BOS = "<|endoftext|>"
WORDS = "the food was great awful slow kind rude tasty cold warm staff place again never".split()


@pytest.fixture(scope="module")
def trl_classes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import trl
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    return {"dpo": (trl.DPOConfig, trl.DPOTrainer), "ipo": (trl.DPOConfig, trl.DPOTrainer),
            "orpo": (ORPOConfig, ORPOTrainer), "simpo": (CPOConfig, CPOTrainer)}


def write_pairs(path, prompt) -> None:
    rng = random.Random(3)
    say = lambda: " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7)))  # noqa: E731
    with open(path, "w", encoding="utf-8") as f:
        for i in range(N_PAIRS):
            f.write(json.dumps({"prompt": prompt(i), "chosen": say(), "rejected": say()}) + "\n")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    write_pairs(path, lambda i: f"{BOS}Review {i}:")
    return path


@pytest.fixture(scope="module")
def bos_pairs_file(tmp_path_factory):
    """Pairs whose prompt is the BOS alone (rendered with the template "{prompt}"): TRL's ORPO takes the NLL term
    over the prompt and the response, the ORPO paper (and lorafit) over the response; with no prompt target
    (the first token is never one) the two are the same, so the rest of ORPO is compared exactly."""
    path = tmp_path_factory.mktemp("pairs") / "bos-pairs.jsonl"
    write_pairs(path, lambda i: BOS)
    return path


# Both sides' AdamW eps. At the default 1e-8 a LoRA weight whose gradient is ~1e-8 moves by +-lr on rounding noise
# (Adam divides by sqrt(v)), so one such element of 1,536 could differ by 3e-4 of the scale after 10 steps;
# 1e-6 keeps the comparison about the arithmetic, the same on both sides.
ADAM_EPS = 1e-6


def lorafit_trainer(tmp_path, model_dir, pairs_file, objective, *overrides):
    from lorafit.rundir import RunDir
    from lorafit.train import setup

    cfg = load_config("quotes", [f"model.name={model_dir}", f"data.sources.quotes.path={pairs_file}",
                                 "data.sources.quotes.kind=preference", f"train.objective={objective}",
                                 f"output_dir={tmp_path / objective}", "model.dropout=0", "lora.dropout=0",
                                 f"train.lr={LR}", "train.batch_size=8", "train.grad_accum=1", f"train.epochs={STEPS}",
                                 "train.max_grad_norm=1.0", f"train.adam_eps={ADAM_EPS}", "eval.sample_prompt=null", "preference.beta=0.2",
                                 "preference.gamma=0.3", "preference.lambda=0.3", *overrides])
    return setup(cfg, RunDir(cfg.output_dir))


def lora_weights(model) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def peer_run(trl_classes, objective, trainer, initial: dict, tmp_path, max_steps):
    """TRL's trainer on the same base, initial adapter and training pairs; returns (step-1 loss, step-1 LoRA
    gradients by PEFT key, the adapter after `max_steps`)."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, TrainerCallback

    from lorafit.data.sources import load_corpus
    from lorafit.data.templates import prompt_text, resolve_template
    from lorafit.lora import peft_config

    cfg = trainer.cfg
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = get_peft_model(base, peft_config(cfg.lora, trainer.lora_targets))
    set_peft_model_state_dict(model, initial)
    corpus = load_corpus(cfg.data)
    from datasets import Dataset

    template = resolve_template(cfg.data.sources["quotes"].template, "preference")
    rows = [{"prompt": prompt_text(template, e["prompt"], "\n"), "chosen": e["chosen"], "rejected": e["rejected"]}
            for e in corpus.train_texts]
    p = cfg.preference
    common = dict(output_dir=str(tmp_path / f"trl-{objective}"), per_device_train_batch_size=8,
                  gradient_accumulation_steps=1, learning_rate=LR, max_steps=max_steps, lr_scheduler_type="linear",
                  warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", adam_epsilon=ADAM_EPS, report_to=[],
                  save_strategy="no", logging_steps=1, use_cpu=True, bf16=False, fp16=False, seed=0,
                  disable_dropout=True, max_length=None, gradient_checkpointing=False)
    config_cls, trainer_cls = trl_classes[objective]
    if objective in ("dpo", "ipo"):
        args = config_cls(**common, beta=p.beta, loss_type=["sigmoid" if objective == "dpo" else "ipo"])
    elif objective == "simpo":
        args = config_cls(**common, beta=p.beta, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=p.gamma)
    else:
        args = config_cls(**common, beta=p.lambda_)  # TRL's ORPO calls lambda beta
    seen = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            if "grads" not in seen:  # before clipping? no: HF clips first; the norm stays below 1 here (asserted)
                peft = trainer_obj.model
                seen["grads"] = {k: v.clone() for k, v in get_peft_model_state_dict(
                    peft, state_dict={n: p.grad for n, p in peft.named_parameters() if p.grad is not None}).items()}

    class Peer(trainer_cls):
        def compute_loss(self, model, inputs, *a, **kw):
            loss = super().compute_loss(model, inputs, *a, **kw)
            seen.setdefault("loss", float((loss[0] if isinstance(loss, tuple) else loss).detach()))
            return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer_obj = Peer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=trainer.tokenizer,
                           callbacks=[Capture()])
        trainer_obj.train()
    return seen["loss"], seen["grads"], lora_weights(trainer_obj.model)


def lorafit_step_one(trainer):
    """lorafit's step-1 loss and LoRA gradients (by PEFT key), taken where the optimizer would step."""
    from peft import get_peft_model_state_dict

    seen = {}
    original = trainer.apply_update

    def capture(step_loss, grad_norm, n):
        if "loss" not in seen:
            seen["loss"], seen["norm"] = float(step_loss), float(grad_norm)
            seen["grads"] = {k: v.clone() for k, v in get_peft_model_state_dict(
                trainer.model, state_dict={n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}).items()}
        return original(step_loss, grad_norm, n)

    trainer.apply_update = capture
    trainer.model.train()
    return seen, capture


def assert_tensors_close(actual: dict, expected: dict, rel: float) -> None:
    assert actual.keys() == expected.keys() and actual
    for k in expected:
        scale = float(expected[k].abs().max())
        assert scale > 0, f"{k}: the reference is all zeros; the comparison would prove nothing"
        torch.testing.assert_close(actual[k], expected[k], rtol=rel, atol=rel * scale, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def initial_adapter(tmp_path_factory, tiny_model_dir, pairs_file):
    """A saved adapter with B != 0 (a new adapter's B is zero, so step 1 would move only B): the starting point
    both trainers continue from, and so (as TRL does for a PEFT model it is given) the frozen reference."""
    from lorafit.modeling import load_settings
    from lorafit.train import save_adapter

    tmp = tmp_path_factory.mktemp("initial")
    trainer = lorafit_trainer(tmp, tiny_model_dir, pairs_file, "sft")
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.05)
    path = tmp / "adapter"
    save_adapter(trainer.model, trainer.tokenizer, path, load_settings(trainer.cfg.model, trainer.model.get_base_model()))
    return path


@pytest.mark.parametrize("objective", ["dpo", "ipo", "orpo", "simpo"])
def test_step_one_and_ten_steps_equal_trl(objective, trl_classes, tmp_path, tiny_model_dir, pairs_file, bos_pairs_file,
                                         initial_adapter):
    if objective == "orpo":
        pairs_file, template = bos_pairs_file, ['data.sources.quotes.template="{prompt}"']
    else:
        template = []
    trainer = lorafit_trainer(tmp_path, tiny_model_dir, pairs_file, objective, f"model.adapter={initial_adapter}", *template)
    initial = lora_weights(trainer.model)
    assert any(float(v.abs().max()) > 0 for k, v in initial.items() if "lora_B" in k)
    seen, _ = lorafit_step_one(trainer)
    (tmp_path / "run").mkdir()
    trainer.run = RunDir(tmp_path / "run")
    trainer.fit(show_bar=False)
    ours = lora_weights(trainer.model)
    loss, grads, theirs = peer_run(trl_classes, objective, trainer, initial, tmp_path, STEPS)
    assert seen["norm"] < 1.0, "clipping would hide the gradient comparison: lower LR or the adapter's scale"
    assert seen["loss"] == pytest.approx(loss, rel=1e-5)
    assert_tensors_close(seen["grads"], grads, 1e-5)
    assert_tensors_close(ours, theirs, 1e-4)

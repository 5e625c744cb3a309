"""Training settings checked against references computed here: the LR schedule and its warm-up (closed forms),
`train.max_grad_norm` (an AdamW step on a gradient clipped by hand), `lora.use_rslora` and `lora.use_dora`
(the LoRA arithmetic written out, and PEFT loading the adapter a run saved)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lorafit.cli import main
from lorafit.config import load_config

LR, WARMUP = 1e-3, 3


def scheduled_lr(schedule: str, s: int, total: int, warmup: int = WARMUP, lr: float = LR) -> float:
    """The rate after `s` scheduler steps: linear warm-up from 0, then linear decay to 0, a half cosine to 0, or flat."""
    if s < warmup:
        return lr * s / warmup
    progress = (s - warmup) / (total - warmup)
    return lr * {"linear": max(0.0, 1 - progress), "cosine": 0.5 * (1 + math.cos(math.pi * progress)),
                 "constant": 1.0}[schedule]


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_build_optimizer_schedules_the_closed_form_rates(schedule):
    from lorafit.train import build_optimizer

    cfg = load_config("quotes", [f"train.schedule={schedule}", f"train.warmup_steps={WARMUP}", f"train.lr={LR}"])
    model = torch.nn.Linear(3, 2)
    optimizer, scheduler = build_optimizer(model, cfg, 10, torch.device("cpu"))
    applied = []
    for _ in range(10):
        applied.append(optimizer.param_groups[0]["lr"])
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
    assert applied == pytest.approx([scheduled_lr(schedule, s, 10) for s in range(10)], rel=1e-12, abs=1e-15)
    assert applied[0] == 0.0 and applied[WARMUP] == pytest.approx(LR)  # the warm-up starts at 0 and ends at lr


def test_a_run_applies_and_logs_the_scheduled_rates(tmp_path, tiny_model_dir, texts_file, monkeypatch):
    """A 6-step cosine run with 3 warm-up steps: optimizer step s uses the rate after s-1 scheduler steps; the
    record of step s logs the rate after s (the next step's, as transformers' Trainer logs it)."""
    from lorafit import train

    applied, real_build = [], train.build_optimizer

    def build_optimizer(*args, **kwargs):
        optimizer, scheduler = real_build(*args, **kwargs)
        optimizer.register_step_pre_hook(lambda opt, *_: applied.append(opt.param_groups[0]["lr"]))
        return optimizer, scheduler

    monkeypatch.setattr(train, "build_optimizer", build_optimizer)
    out = tmp_path / "run"
    assert main(["train", "quotes", f"model.name={tiny_model_dir}", f"data.sources.quotes.path={texts_file}",
                 f"output_dir={out}", "--no-progress", "train.max_steps=6", "train.log_every=1", "train.schedule=cosine",
                 f"train.warmup_steps={WARMUP}", f"train.lr={LR}", "eval.before_training=false",
                 "eval.sample_prompt=null"]) == 0
    assert applied == pytest.approx([scheduled_lr("cosine", s, 6) for s in range(6)], rel=1e-12, abs=1e-15)
    logged = {r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    assert logged == pytest.approx({s: scheduled_lr("cosine", s, 6) for s in range(1, 7)}, rel=1e-12, abs=1e-15)


# ---------------------------------------------------------------- train.max_grad_norm


def trainer_for(tmp_path, tiny_model_dir, texts_file, *overrides):
    from lorafit.rundir import RunDir
    from lorafit.train import setup

    cfg = load_config("quotes", [f"model.name={tiny_model_dir}", f"data.sources.quotes.path={texts_file}",
                                 f"output_dir={tmp_path / 'run'}", "model.dropout=0", "lora.dropout=0",
                                 # a large epsilon makes Adam's first step follow the gradient's size (with the
                                 # default 1e-8 it is lr * sign(g), blind to clipping)
                                 "train.adam_eps=1.0", "train.lr=0.5", "train.weight_decay=0.01", *overrides])
    return setup(cfg, RunDir(cfg.output_dir))


def reference_gradient(trainer) -> tuple[dict, float]:
    """The first step's gradient of the LoRA weights, each example alone through the model, summed over the
    step's scored targets and divided by their count; and its norm."""
    model = trainer.model
    examples, targets = trainer.step_examples(0)
    model.zero_grad(set_to_none=True)
    for i in examples:
        ids = torch.tensor(trainer.data.train.example(int(i)), dtype=torch.long)[None]
        logits = model(input_ids=ids).logits[0, :-1].double()
        (torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum") / int(targets.sum())).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads, float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])))


def reference_update(trainer, grads: dict, max_norm: float | None) -> dict:
    """torch's AdamW step from the trainer's weights, on the gradient clipped by hand to max_norm (None: as is)."""
    t = trainer.cfg.train
    params = {n: p.detach().clone().requires_grad_(True) for n, p in trainer.model.named_parameters() if p.requires_grad}
    for n, p in params.items():
        p.grad = grads[n].to(p.dtype).clone()
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm)
    optimizer = torch.optim.AdamW(list(params.values()), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                  weight_decay=t.weight_decay)
    optimizer.step()
    return {n: p.detach() for n, p in params.items()}


def trainable(trainer) -> dict:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def assert_weights_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for n, want in expected.items():
        torch.testing.assert_close(actual[n], want, atol=1e-6, rtol=1e-4, msg=n)


def test_max_grad_norm_clips_the_update_and_null_does_not(tmp_path, tiny_model_dir, texts_file):
    probe = trainer_for(tmp_path, tiny_model_dir, texts_file)
    grads, norm = reference_gradient(probe)
    assert norm > 0
    max_norm = norm / 4  # clipping must act

    clipped = trainer_for(tmp_path, tiny_model_dir, texts_file, f"train.max_grad_norm={max_norm}")
    expected = reference_update(clipped, grads, max_norm)
    reported = clipped.train_step()
    assert float(reported) == pytest.approx(norm, rel=1e-4)  # the norm before clipping, as logged
    assert_weights_close(trainable(clipped), expected)

    unclipped = trainer_for(tmp_path, tiny_model_dir, texts_file, "train.max_grad_norm=null")
    expected_unclipped = reference_update(unclipped, grads, None)
    unclipped.train_step()
    assert_weights_close(trainable(unclipped), expected_unclipped)
    # the two references differ well beyond the tolerance: the check tells clipped from unclipped
    b = next(n for n in expected if "lora_B" in n)
    assert not torch.allclose(expected[b], expected_unclipped[b], atol=1e-4, rtol=1e-2)


# ---------------------------------------------------------------- lora.use_rslora, lora.use_dora


def lora_layer(tiny_model_dir, **settings):
    from transformers import AutoModelForCausalLM

    from lorafit.config import LoraConfig
    from lorafit.lora import apply_lora

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model = apply_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0, targets=["c_attn"], **settings))
    return model, model.get_base_model().transformer.h[0].attn.c_attn


@pytest.mark.parametrize("rslora, scale", [(False, 8 / 4), (True, 8 / math.sqrt(4))], ids=["alpha/r", "rslora"])
def test_rslora_scales_the_update_by_alpha_over_sqrt_r(tiny_model_dir, rslora, scale):
    model, layer = lora_layer(tiny_model_dir, use_rslora=rslora)
    assert model.peft_config["default"].use_rslora is rslora
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=gen))
        x = torch.randn(3, layer.base_layer.weight.shape[0], generator=gen)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in), (out, r)
        base = x @ layer.base_layer.weight + layer.base_layer.bias  # GPT-2's Conv1D: weight is (in, out)
        torch.testing.assert_close(layer(x), base + scale * (x @ a.T @ b.T), atol=1e-5, rtol=1e-5)


def test_dora_adds_trained_magnitudes_and_peft_loads_the_adapter_with_lorafits_logits(tmp_path, tiny_model_dir, texts_file):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lorafit.generate import load_for_inference

    _, layer = lora_layer(tiny_model_dir, use_dora=True)
    # DoRA's magnitude starts as the norm of each output unit's weights (a Conv1D column)
    initial = layer.lora_magnitude_vector["default"].weight.detach().clone()
    torch.testing.assert_close(initial, torch.linalg.vector_norm(layer.base_layer.weight.detach(), dim=0))
    assert layer.lora_magnitude_vector["default"].weight.requires_grad

    out = tmp_path / "run"
    assert main(["train", "quotes", f"model.name={tiny_model_dir}", f"data.sources.quotes.path={texts_file}",
                 f"output_dir={out}", "--no-progress", "train.max_steps=1", "lora.use_dora=true", "lora.use_rslora=true",
                 "train.lr=1e-2", "eval.before_training=false", "eval.sample_prompt=null"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    magnitudes = [k for k in saved if "lora_magnitude_vector" in k]
    assert len(magnitudes) == 2  # c_attn of both blocks
    first = next(k for k in magnitudes if ".h.0." in k)
    assert not torch.allclose(saved[first], initial)  # the step trained it

    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(out / "adapter")).eval()
    ours, _, _ = load_for_inference(out, precision="fp32", device=torch.device("cpu"))
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=1e-5)
        plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()(ids).logits
        assert not torch.allclose(theirs(ids).logits, plain, atol=1e-4)  # the adapter changes the model

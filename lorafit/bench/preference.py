"""`lorafit bench --objective dpo [--peers trl]`: DPO on the same pairs, lorafit against TRL's DPOTrainer.

The pairs are the sentiment-dpo-offline recipe's (positive over negative Yelp reviews, one prompt), the first
`--examples` of them; both sides train LoRA r 8 / alpha 16 on c_attn, dropout 0, 8 pairs a step, for whole
steps over them once, the first `--warmup-steps` untimed. lorafit computes the reference's log-probabilities
once, before training: that whole pass (training and validation pairs) is added to its timed seconds. TRL
computes the reference in each step (its default, `precompute_ref_log_probs=False`). Also measured: lorafit's
step with the reference computed each step instead (one no-grad, adapter-off forward of the step's
micro-batches), which is what precomputing saves.
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import time
import warnings

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from lorafit.bench.baseline import _StepTimer, quiet
from lorafit.bench.peers import _quiet_datasets
from lorafit.config import load_config
from lorafit.data.prepare import prepare_data
from lorafit.data.sources import load_corpus
from lorafit.measure import sync
from lorafit.modeling import load_base_model, load_tokenizer, resolve_precision
from lorafit.train import assemble, prepare_model

PAIRS_PER_STEP = 8
LR = 5e-4


def lorafit_config(model_dir: str, data: str, pairs: int, seed: int):
    return load_config("sentiment-dpo-offline", [
        f"model.name={model_dir}", f"data.sources.yelp.path={data}", f"data.sources.yelp.max_examples={pairs}", f"train.batch_size={PAIRS_PER_STEP}",
        "train.grad_accum=1", "train.warmup_steps=0", f"train.lr={LR}", "lora.r=8", "lora.alpha=16", "lora.dropout=0",
        "lora.targets=[c_attn]", "model.dropout=0", f"train.seed={seed}", "eval.sample_prompt=null"])


def run_lorafit(cfg, tokenizer, device: torch.device, warmup_steps: int) -> tuple[dict, list[dict]]:
    """(lorafit's figures, the training pairs as text rows for TRL)."""
    precision = resolve_precision(cfg.model.precision, device)
    data = prepare_data(cfg, tokenizer)
    steps = len(data.train) // 2 // PAIRS_PER_STEP
    cfg.train.max_steps = steps
    model, targets, fast = prepare_model(cfg, load_base_model(cfg.model, precision, device), device, precision)
    trainer = assemble(cfg, model, tokenizer, data, fast, targets, device, precision, run=None)  # the reference pass
    reference_once = trainer.objective.reference_seconds
    trainer.model.train()
    timed, pairs, each_step = 0.0, 0, 0.0
    for step in range(steps):
        sync(device)
        start = time.perf_counter()
        trainer.train_step()
        sync(device)
        if step >= warmup_steps:
            timed += time.perf_counter() - start
            pairs += len(trainer.plan.examples(step))
            start = time.perf_counter()  # what a reference computed in the step would add: its no-grad forwards
            with torch.no_grad(), trainer.model.disable_adapter():
                for batch in trainer.step_batches(step):
                    trainer.forward.token_nll(batch.to(device))
            sync(device)
            each_step += time.perf_counter() - start
        trainer.progress.step += 1
    corpus = load_corpus(cfg.data)
    rows = [{"prompt": e["prompt"]["prompt"] + "\n", "chosen": e["chosen"], "rejected": e["rejected"]}
            for e in corpus.train_texts]
    reference_pairs = (len(data.train) + len(data.val)) // 2
    amortised = reference_once * pairs / reference_pairs  # the timed pairs' share of the one reference pass
    return {
        "pairs": pairs, "optimizer_steps": steps - warmup_steps, "step_seconds": timed,
        "reference_once_seconds": reference_once, "reference_pairs": reference_pairs,
        "seconds": timed + reference_once,  # the whole reference pass counted
        "pairs_per_second": pairs / (timed + reference_once),
        "reference_each_step_seconds": each_step,
        "pairs_per_second_reference_each_step": pairs / (timed + each_step),
        "precomputed_reference_speedup": (timed + each_step) / (timed + amortised),
        "packing": fast.layout.kind, "fused_head": fast.fused_head,
    }, rows


def run_trl(model_dir: str, cfg, tokenizer, rows: list[dict], device: torch.device, warmup_steps: int, seed: int) -> dict:
    import trl  # optional extra: [bench] (trl)

    steps = len(rows) // PAIRS_PER_STEP
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").to(device)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=["c_attn"], task_type="CAUSAL_LM",
                      fan_in_fan_out=True)
    timer = _StepTimer(warmup_steps, device.type == "cuda")
    with tempfile.TemporaryDirectory() as tmp, _quiet_datasets(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trl.DPOConfig(
            output_dir=tmp, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, per_device_train_batch_size=PAIRS_PER_STEP, gradient_accumulation_steps=1,
            max_length=cfg.data.seq_len, max_steps=steps, seed=seed, beta=cfg.preference.beta, loss_type=["sigmoid"],
            gradient_checkpointing=False, use_cpu=device.type != "cuda", bf16=False, fp16=False,
            save_strategy="no", eval_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
            log_level="error", dataloader_num_workers=0)
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                 peft_config=lora, callbacks=[timer])
        quiet(trainer)
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.train()
    wall = timer.end - timer.start
    pairs = (steps - warmup_steps) * PAIRS_PER_STEP
    return {"pairs": pairs, "optimizer_steps": steps - warmup_steps, "seconds": wall, "pairs_per_second": pairs / wall,
            "trl": trl.__version__, "precompute_ref_log_probs": args.precompute_ref_log_probs}


def main(args, model_dir: str, tokenizer_dir: str, device: torch.device, peers: dict, default_data: str) -> dict:
    """`--data`: a labelled CSV as the recipe's (label, sentence); default: the shared Yelp sample."""
    tokenizer = load_tokenizer(tokenizer_dir)
    cfg = lorafit_config(model_dir, args.data or default_data, args.examples, seed=42)
    print(f"lorafit dpo: up to {args.examples} pairs ...", file=sys.stderr)
    ours, rows = run_lorafit(cfg, tokenizer, device, args.warmup_steps)
    results = {"objective": "dpo", "lorafit": ours}
    if "trl" in peers:
        print(f"trl DPOTrainer: {len(rows)} pairs ...", file=sys.stderr)
        results["peers"] = {"trl": run_trl(model_dir, cfg, tokenizer, rows, device, args.warmup_steps, seed=42)}
        results["speedup_vs"] = {"trl": ours["pairs_per_second"] / results["peers"]["trl"]["pairs_per_second"]}
    return results

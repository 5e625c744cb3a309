"""The original quotes fine-tuning pipeline, re-created faithfully for `lorafit bench`.

`transformers.Trainer` + PEFT LoRA on GPT-2, every text padded to 64 tokens with pad = eos and
labels = input_ids, so padding positions are trained on and scored: that flaw is reproduced on
purpose. Nothing else is added that would slow it down (no eval, saving, logging or progress bars
during training), so the throughput comparison is fair.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from lorafit.measure import peak_memory_bytes, reset_peak_memory, sync

MAX_LENGTH = 64
BATCH_SIZE = 4
GRAD_ACCUM = 2
EXAMPLES_PER_STEP = BATCH_SIZE * GRAD_ACCUM
EVAL_BATCH_SIZE = 8  # the original left per_device_eval_batch_size at Trainer's default
GEN_NEW_TOKENS = 70  # the original's generation length


@dataclass
class SideResult:
    name: str
    examples: int  # examples trained in the timed part
    optimizer_steps: int  # timed optimizer steps
    wall_seconds: float  # timed part only
    examples_per_second: float
    real_tokens_per_second: float  # non-pad tokens (attention_mask == 1)
    token_slots_per_second: float  # every position, padding included
    peak_memory_bytes: int  # CPU: peak RSS of the process during the run; CUDA: max allocated
    device: str


def build_baseline_dataset(tokenizer, texts: list[str]) -> list[dict[str, list[int]]]:
    """Tokenize as the original did: pad/truncate to 64, labels = input_ids (pads included).

    Rows are plain dicts in a list (the original used `datasets.map`; the row store costs nothing
    measurable next to a training step and keeps `datasets` out of the timed path)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=MAX_LENGTH)
    # A plain copy, not DataCollatorForLanguageModeling: that one would mask pad (= eos) to -100.
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": list(ids)}
        for ids, mask in zip(enc["input_ids"], enc["attention_mask"])
    ]


class _CountingCollator:
    """default_data_collator that records (real tokens, slots) of each micro-batch, in order."""

    def __init__(self):
        self.batches: list[tuple[int, int]] = []

    def __call__(self, features):
        batch = default_data_collator(features)
        mask = batch["attention_mask"]
        self.batches.append((int(mask.sum()), mask.numel()))
        return batch


class _StepTimer(TrainerCallback):
    """Marks the end of the warm-up's last optimizer step and of the last step."""

    def __init__(self, warmup_steps: int, cuda: bool):
        self.warmup_steps, self.cuda = warmup_steps, cuda
        self.start = self.end = None

    def _now(self) -> float:
        sync("cuda" if self.cuda else "cpu")  # kernels are async: wait for the step to really finish
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        if self.warmup_steps == 0:
            self.start = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup_steps:
            self.start = self._now()
        if state.global_step == state.max_steps:
            self.end = self._now()


def quiet(trainer: Trainer) -> Trainer:
    """Drop the callbacks that print Trainer's metrics dicts (train_runtime, eval_loss, ...) to stdout,
    which belongs to the bench's own output."""
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    return trainer


def _resolve_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _training_args(output_dir: str, cuda: bool, **settings) -> TrainingArguments:
    """What both the original training and evaluation set: fp16 on GPU, and nothing that would slow the
    timed part (no saving, logging, progress bars or loader workers)."""
    return TrainingArguments(
        output_dir=output_dir, fp16=cuda, use_cpu=not cuda, save_strategy="no", logging_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, **settings,
    )


def run_baseline(
    model_dir: str,
    tokenizer_dir: str,
    texts: list[str],
    *,
    warmup_steps: int = 1,
    device: str | None = None,
    seed: int = 42,
) -> tuple[SideResult, PeftModel]:
    """Train the original pipeline on `texts` (already the first N training examples) for whole
    optimizer steps: the first `warmup_steps` optimizer steps are not timed, then all remaining
    whole steps (len(texts) // 8 - warmup_steps) are timed. Returns timing and the trained PEFT model."""
    total_steps = len(texts) // EXAMPLES_PER_STEP
    timed_steps = total_steps - warmup_steps
    if warmup_steps < 0 or timed_steps < 1:
        raise ValueError(
            f"{len(texts)} texts make {total_steps} optimizer steps of {EXAMPLES_PER_STEP}; "
            f"need more than warmup_steps={warmup_steps}"
        )
    device = _resolve_device(device)
    cuda = device.startswith("cuda")
    reset_peak_memory(device)

    torch.manual_seed(seed)
    # As the original loaded it (not lorafit's load_tokenizer): this side re-creates that pipeline, flaws included.
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = tokenizer.eos_token
    # The original loaded the base in fp16 and trained with fp16 AMP; PEFT upcasts the adapter to fp32.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16 if cuda else torch.float32)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        bias="none",
        target_modules=["c_attn"],
        task_type="CAUSAL_LM",
        fan_in_fan_out=True,  # GPT-2's c_attn is a Conv1D; PEFT would set this itself, with a warning
    )
    model = get_peft_model(model, lora)
    dataset = build_baseline_dataset(tokenizer, texts)

    collator = _CountingCollator()
    timer = _StepTimer(warmup_steps, cuda)
    with tempfile.TemporaryDirectory() as tmp:
        args = _training_args(
            tmp,
            cuda,
            per_device_train_batch_size=BATCH_SIZE,
            gradient_accumulation_steps=GRAD_ACCUM,
            learning_rate=2e-4,
            max_steps=total_steps,  # whole optimizer steps within one pass over `texts`
            eval_strategy="no",
            seed=seed,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            data_collator=collator,
            callbacks=[timer],
        )
        quiet(trainer).train()

    # Micro-batches come out of the collator in training order; keep those of the timed steps.
    timed = collator.batches[warmup_steps * GRAD_ACCUM : total_steps * GRAD_ACCUM]
    real = sum(r for r, _ in timed)
    slots = sum(s for _, s in timed)
    wall = timer.end - timer.start
    examples = timed_steps * EXAMPLES_PER_STEP
    result = SideResult(
        name="baseline",
        examples=examples,
        optimizer_steps=timed_steps,
        wall_seconds=wall,
        examples_per_second=examples / wall,
        real_tokens_per_second=real / wall,
        token_slots_per_second=slots / wall,
        peak_memory_bytes=peak_memory_bytes(device),
        device=device,
    )
    return result, model


def baseline_eval_samples_per_second(model, tokenizer, texts: list[str], device: str | None) -> float:
    """The original evaluation throughput: `Trainer.evaluate` on texts padded to 64 with
    labels = input_ids, eval batch 8 (Trainer's default). One untimed warm-up batch first."""
    device = _resolve_device(device)
    cuda = device.startswith("cuda")
    dataset = build_baseline_dataset(tokenizer, texts)
    with tempfile.TemporaryDirectory() as tmp:
        args = _training_args(tmp, cuda, per_device_eval_batch_size=EVAL_BATCH_SIZE)
        trainer = quiet(Trainer(model=model, args=args, processing_class=tokenizer, data_collator=default_data_collator))
        trainer.evaluate(eval_dataset=dataset[:EVAL_BATCH_SIZE])  # warm-up
        sync(device)
        start = time.perf_counter()
        trainer.evaluate(eval_dataset=dataset)
        sync(device)
        wall = time.perf_counter() - start
    return len(dataset) / wall


@torch.no_grad()
def generation_rates(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int | None = None) -> list[float]:
    """New tokens per second of each `generate` call over `batch_size` prompts at a time (one repetition a
    batch), after one untimed warm-up call: a plain loop on the model as given (KV cache, sampling at
    temperature 0.7, left padding). Every sequence generates exactly max_new_tokens."""
    max_new_tokens = max_new_tokens or GEN_NEW_TOKENS
    model.eval()  # Trainer leaves the model in train mode; dropout has no place in generation
    device = next(model.parameters()).device
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only: pad on the left so new tokens follow the prompt
    try:
        batches = [
            tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True).to(device)
            for i in range(0, len(prompts), batch_size)
        ]
    finally:
        tokenizer.padding_side = side
    gen = dict(
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,  # suppress eos so every row counts the same number of tokens
        do_sample=True,
        temperature=0.7,
        use_cache=True,  # Trainer sets config.use_cache=False; the original generated with the cache
        pad_token_id=tokenizer.pad_token_id,
    )
    model.generate(**batches[0], **gen)  # warm-up, untimed
    rates = []
    for batch in batches:
        sync(device)
        start = time.perf_counter()
        out = model.generate(**batch, **gen)
        sync(device)
        rates.append(out.shape[0] * (out.shape[1] - batch["input_ids"].shape[1]) / (time.perf_counter() - start))
    return rates


def baseline_generation_tokens_per_second(
    model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int | None = None
) -> float:
    """The median of `generation_rates` on the unmerged PEFT model, as the original generated."""
    return statistics.median(generation_rates(model, tokenizer, prompts, batch_size, max_new_tokens))

"""The tools a user would otherwise pick, trained side by side in `lorafit bench --peers ...`.

`trl`: TRL 1.x `SFTTrainer` on the same examples, set up as TRL's documentation recommends for speed:
best-fit-decreasing packing into rows of `max_length`, padding-free (each micro-batch one flat row
with position ids restarting per example, so no padding is computed and no example attends to
another), no gradient checkpointing (TRL turns it on by default; a 124M model needs no memory
saving), fp32 on CPU (bf16 is emulated there and ~30x slower), bf16 on CUDA, plus Liger's fused
kernels with `--peers trl,liger` (CUDA only). Same model, LoRA (r 8, alpha 16, dropout 0.05 on
c_attn) and optimizer (AdamW lr 2e-4, linear schedule, 4 rows x 2 accumulation, max_length 64) as
the quotes recipe. TRL counts its batch in packed rows, so a step holds more examples than lorafit's
8: the comparison is per example (examples/s over the same examples), not per step.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import sys
import tempfile
import warnings

import peft
import torch
import transformers
from datasets import Dataset
from datasets.utils import logging as ds_logging
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from lorafit.bench.baseline import BATCH_SIZE, GRAD_ACCUM, MAX_LENGTH, SideResult, _StepTimer, quiet
from lorafit.errors import LorafitError
from lorafit.measure import peak_memory_bytes, reset_peak_memory
from lorafit.modeling import load_tokenizer

KNOWN = ("trl", "liger")
ROWS_PER_STEP = BATCH_SIZE * GRAD_ACCUM
INSTALL = 'pip install -e ".[bench]"'
INSTALL_LIGER = 'pip install -e ".[bench-gpu]"'


def parse_peers(spec: str | None, device: torch.device) -> dict:
    """`--peers trl` / `trl,liger` -> {"trl": {"liger": bool}}; bad names, liger off CUDA and a missing
    extra are LorafitErrors before anything runs."""
    if not spec:
        return {}
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in KNOWN]
    if unknown or not names:
        raise LorafitError(f"--peers {spec}: unknown peer {', '.join(unknown) or '(none)'}; known: trl, and trl,liger on CUDA.")
    if "liger" in names and "trl" not in names:
        raise LorafitError("--peers liger: Liger runs inside TRL's SFTTrainer; pass --peers trl,liger.")
    if importlib.util.find_spec("trl") is None:
        raise LorafitError(f"--peers trl needs TRL, which is not installed: {INSTALL}")
    liger = "liger" in names
    if liger and device.type != "cuda":
        raise LorafitError(f"--peers trl,liger: Liger's kernels are Triton kernels and need CUDA; this run is on "
                           f"{device.type}. Use --peers trl here, or run on a GPU.")
    if liger and importlib.util.find_spec("liger_kernel") is None:
        raise LorafitError(f"--peers trl,liger needs liger-kernel, which is not installed: {INSTALL_LIGER}")
    return {"trl": {"liger": liger}}


@contextlib.contextmanager
def _quiet_datasets():
    """No per-map progress bars while TRL prepares the data (it runs five maps)."""
    was = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            ds_logging.enable_progress_bar()


def liger_supports(model_type: str) -> bool:
    """Whether Liger has kernels for this architecture: for others (GPT-2 among them, as of liger-kernel
    0.8) `use_liger_kernel` is silently a no-op, and the report must say so."""
    # optional extra: [bench-gpu] (liger-kernel)
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return model_type in MODEL_TYPE_TO_APPLY_LIGER_FN


def trl_packed_rows(texts: list[str], tokenizer_dir: str) -> int:
    """How many rows TRL's bfd packing makes of `texts` (text + EOS, truncated to max_length), without a
    model: the bench checks --examples against it before anything is trained."""
    from trl.data_utils import pack_dataset  # optional extra: [bench] (trl)

    tokenizer = load_tokenizer(tokenizer_dir)
    ids = [row[:MAX_LENGTH] for row in tokenizer([t + tokenizer.eos_token for t in texts])["input_ids"]]
    with _quiet_datasets():
        return len(pack_dataset(Dataset.from_dict({"input_ids": ids}), MAX_LENGTH, strategy="bfd"))


def trl_min_examples(texts: list[str], tokenizer_dir: str, warmup_steps: int) -> int | None:
    """None when `texts` make more than `warmup_steps` whole TRL steps; else an estimate of the examples
    needed (at the density these texts pack to)."""
    rows = trl_packed_rows(texts, tokenizer_dir)
    if rows // ROWS_PER_STEP > warmup_steps:
        return None
    return math.ceil((warmup_steps + 1) * ROWS_PER_STEP * len(texts) / max(rows, 1)) + ROWS_PER_STEP


class _CountingCollator:
    """Wraps TRL's padding-free collator: (examples, scored tokens, positions) of each micro-batch, in order."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def __getattr__(self, name):  # TRL reads attributes of its own collator (padding_free, ...)
        return getattr(self.inner, name)

    def __call__(self, features):
        batch = self.inner(features)
        examples = sum(len(f["seq_lengths"]) for f in features)
        # Scored = labels kept: every token but each example's first (as lorafit's targets count).
        self.batches.append((examples, int((batch["labels"] != -100).sum()), batch["input_ids"].numel()))
        return batch


def trl_config(output_dir: str, device: torch.device, *, liger: bool, max_steps: int, seed: int):
    from trl import SFTConfig  # optional extra: [bench] (trl)

    cuda = device.type == "cuda"
    return SFTConfig(
        output_dir=output_dir,
        # the quotes recipe
        learning_rate=2e-4, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        per_device_train_batch_size=BATCH_SIZE, gradient_accumulation_steps=GRAD_ACCUM, max_length=MAX_LENGTH,
        max_steps=max_steps, seed=seed,
        # TRL's speed recommendations
        packing=True, packing_strategy="bfd", padding_free=True, gradient_checkpointing=False,
        bf16=cuda, fp16=False, use_cpu=not cuda, use_liger_kernel=liger,
        # plain text: the loss covers every token (text + EOS)
        dataset_text_field="text", completion_only_loss=False, assistant_only_loss=False,
        # nothing that would slow or clutter the timed part
        save_strategy="no", eval_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        log_level="error", dataloader_num_workers=0,
    )


SETTING_KEYS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "optim",
                "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "max_steps", "packing",
                "packing_strategy", "padding_free", "gradient_checkpointing", "bf16", "fp16", "use_liger_kernel",
                "dataset_text_field", "completion_only_loss", "loss_type", "seed")


def run_trl(model_dir: str, tokenizer_dir: str, texts: list[str], *, warmup_steps: int, device: torch.device,
            liger: bool = False, seed: int = 42):
    """TRL's SFTTrainer on `texts` for its whole optimizer steps, the first `warmup_steps` untimed.
    Returns (SideResult, the trained PEFT model, the exact settings)."""
    # optional extra: [bench] (trl)
    import trl
    from trl import SFTTrainer

    cuda = device.type == "cuda"
    rows = trl_packed_rows(texts, tokenizer_dir)
    total_steps = rows // ROWS_PER_STEP  # whole steps within one pass, as the other sides
    if total_steps <= warmup_steps:
        raise LorafitError(f"TRL packs these {len(texts)} examples into {rows} rows = {total_steps} optimizer steps of "
                           f"{ROWS_PER_STEP} rows, not more than --warmup-steps {warmup_steps}; pass more --examples.")
    reset_peak_memory(device)
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(tokenizer_dir)  # lorafit's loader: pad = EOS where there is none (GPT-2)
    # The base in the training precision (bf16 weights + bf16 autocast on CUDA, as TRL's examples load it).
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa").to(device)
    liger_applied = liger and liger_supports(model.config.model_type)
    if liger and not liger_applied:
        print(f"note: Liger has no kernels for {model.config.model_type}; TRL runs without them "
              f"(recorded as liger_applied: false)", file=sys.stderr)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, bias="none", target_modules=["c_attn"],
                      task_type="CAUSAL_LM", fan_in_fan_out=True)
    timer = _StepTimer(warmup_steps, cuda)
    with tempfile.TemporaryDirectory() as tmp, _quiet_datasets(), warnings.catch_warnings():
        # transformers 5 renamed gradient_checkpointing, which TRL's config still sets: noise, not news
        warnings.simplefilter("ignore", FutureWarning)
        args = trl_config(tmp, device, liger=liger, max_steps=total_steps, seed=seed)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": list(texts)}),
                             processing_class=tokenizer, peft_config=lora, callbacks=[timer])
        quiet(trainer)
        counter = trainer.data_collator = _CountingCollator(trainer.data_collator)
        with contextlib.redirect_stdout(io.StringIO()):  # and anything else it prints: stdout is ours
            trainer.train()
    timed = counter.batches[warmup_steps * GRAD_ACCUM: total_steps * GRAD_ACCUM]
    examples, tokens, slots = (sum(b[i] for b in timed) for i in range(3))
    wall = timer.end - timer.start
    result = SideResult("trl", examples, total_steps - warmup_steps, wall, examples / wall, tokens / wall,
                        slots / wall, peak_memory_bytes(device), str(device))
    settings = {k: getattr(args, k) for k in SETTING_KEYS}
    settings["optim"] = str(settings["optim"].value if hasattr(settings["optim"], "value") else settings["optim"])
    settings["lr_scheduler_type"] = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    settings.update(
        trl=trl.__version__, transformers=transformers.__version__, peft=peft.__version__,
        model_dtype=str(trainer.model.get_base_model().dtype).replace("torch.", ""),
        attn_implementation=trainer.model.config._attn_implementation,
        lora={"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["c_attn"]},
        liger_applied=liger_applied, packed_rows=rows, examples_per_step=examples / max(result.optimizer_steps, 1),
    )
    return result, trainer.model, settings

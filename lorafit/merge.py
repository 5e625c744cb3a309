"""Merge a LoRA adapter into its base: W' = W + (alpha / r) * B A, saved as a plain transformers model."""

from __future__ import annotations

from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.generate import load_for_inference
from lorafit.modeling import restore_activation_names
from lorafit.atomic import atomic_dir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def merge(run_or_adapter, out: Path, base: str | None = None, dtype: str = "fp32", attn_implementation: str | None = None) -> Path:
    from lorafit.rundir import forbidden_output_dir

    out = Path(out).expanduser()
    why = forbidden_output_dir(str(out))
    if why:
        raise LorafitError(f"'{out}' cannot take the merged model: {why}. Choose a new directory.")
    if out.exists() and any(out.iterdir()):
        raise LorafitError(f"'{out}' exists and is not empty; choose a new directory for the merged model.")
    merged, tokenizer = merged_model(run_or_adapter, base, attn_implementation)
    merged = merged.to(DTYPES[dtype])
    with atomic_dir(out) as tmp:
        save_model(merged, tokenizer, tmp)
    return out


def merged_model(run_or_adapter, base: str | None = None, attn_implementation: str | None = None):
    """(base + adapter merged into plain weights in fp32 on CPU, tokenizer): exact arithmetic first; a caller
    casts once, after (merge's --dtype, export's GGUF types)."""
    model, tokenizer, _ = load_for_inference(run_or_adapter, base=base, precision="fp32", device=torch.device("cpu"),
                                             attn_implementation=attn_implementation)
    merged = model.merge_and_unload()
    restore_activation_names(merged)  # loaded with the one-kernel GELU; saved with the base's own name
    merged.config.use_cache = True
    return merged, tokenizer


def save_model(model, tokenizer, directory: Path) -> None:
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))

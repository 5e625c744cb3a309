"""Merge a LoRA adapter into its base: W' = W + (alpha / r) * B A, saved as a plain transformers model."""

from __future__ import annotations

from pathlib import Path

import torch

from lorafit.atomic import atomic_dir
from lorafit.errors import LorafitError
from lorafit.generate import load_for_inference
from lorafit.modeling import restore_activation_names
from lorafit.rundir import check_output_path, saving

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def merge(run_or_adapter, out: Path, base: str | None = None, dtype: str = "fp32", attn_implementation: str | None = None,
          trust_remote_code: bool = False, force_base: bool = False) -> Path:
    out = check_output_path(out, "the merged model")
    if out.exists() and not out.is_dir():
        raise LorafitError(f"'{out}' exists and is a file; choose a new directory for the merged model.")
    if out.exists() and any(out.iterdir()):
        raise LorafitError(f"'{out}' exists and is not empty; choose a new directory for the merged model.")
    merged, tokenizer = merged_model(run_or_adapter, base, attn_implementation, trust_remote_code, force_base)
    merged = merged.to(DTYPES[dtype])
    with saving(f"the merged model in {out}", "Free space or choose another directory; nothing else was changed."):
        with atomic_dir(out) as tmp:
            save_model(merged, tokenizer, tmp)
    return out


def merged_model(run_or_adapter, base: str | None = None, attn_implementation: str | None = None,
                 trust_remote_code: bool = False, force_base: bool = False):
    """(base + adapter merged into plain weights in fp32 on CPU, tokenizer): exact arithmetic first; a caller
    casts once, after (merge's --dtype, export's GGUF types)."""
    model, tokenizer, _ = load_for_inference(run_or_adapter, base=base, precision="fp32", device=torch.device("cpu"),
                                             attn_implementation=attn_implementation,
                                             trust_remote_code=trust_remote_code, force_base=force_base)
    merged = model.merge_and_unload()
    restore_activation_names(merged)  # loaded with the one-kernel GELU; saved with the base's own name
    merged.config.use_cache = True
    return merged, tokenizer


def save_model(model, tokenizer, directory: Path) -> None:
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))

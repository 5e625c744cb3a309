"""LoRA through PEFT: wrap a frozen base, count parameters, load saved adapters safely."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lorafit.config import LoraConfig
from lorafit.errors import LorafitError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LINEAR_LIKE = ("Linear", "Conv1D", "Embedding", "Conv1d", "Conv2d")


def linear_module_names(model) -> list[str]:
    """Distinct last-name components of the modules LoRA can wrap (e.g. c_attn, c_proj, c_fc)."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name and type(module).__name__ in LINEAR_LIKE
    }
    return sorted(names)


def check_targets(model, targets: list[str]) -> None:
    available = linear_module_names(model)
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [t for t in targets if t not in leaf_names and not any(n.endswith(t) for n, _ in model.named_modules())]
    if unknown:
        raise LorafitError(
            f"lora.targets: no module named {', '.join(map(repr, unknown))} in {type(model).__name__}. "
            f"Modules LoRA can wrap in this model: {', '.join(available)}."
        )


def peft_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.targets),
        bias=cfg.bias,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        task_type="CAUSAL_LM",
        # GPT-2's Conv1D stores weights as (in, out); PEFT must know to transpose.
        fan_in_fan_out=None,
    )


def apply_lora(model, cfg: LoraConfig):
    """Freeze the base and add fresh LoRA weights (B = 0, so outputs are unchanged)."""
    import warnings

    from peft import get_peft_model

    check_targets(model, cfg.targets)
    pc = peft_config(cfg)
    pc.fan_in_fan_out = any(
        type(m).__name__ == "Conv1D" for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in cfg.targets
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about fan_in_fan_out defaults we set explicitly
        peft_model = get_peft_model(model, pc)
    for param in peft_model.parameters():  # PEFT keeps adapters fp32; make sure of it
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return peft_model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), counting tied weights once."""
    seen, trainable, total = set(), 0, 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def format_counts(trainable: int, total: int) -> str:
    return f"trainable {trainable:,} / {total:,} ({100 * trainable / total:.2f}%)"


def read_adapter_config(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise LorafitError(
            f"'{adapter_dir}' is not a LoRA adapter: {ADAPTER_CONFIG} is missing. "
            "Give a lorafit run directory or a PEFT adapter directory."
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LorafitError(f"{path} is not valid JSON ({exc}).") from None


def load_adapter(base_model, adapter_dir: Path, base_name: str, is_trainable: bool = False):
    """Base + saved adapter; any shape mismatch or missing/unexpected key is an error, never a partial load."""
    from peft import PeftModel
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise LorafitError(f"Adapter weights not found: {weights} (lorafit loads adapters only from safetensors).")
    config = read_adapter_config(adapter_dir)
    trained_on = config.get("base_model_name_or_path")
    mismatch = (
        f"The adapter in '{adapter_dir}' was trained on base '{trained_on}' and does not fit the given base "
        f"'{base_name}'"
    )
    try:
        model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=is_trainable)
    except (RuntimeError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise LorafitError(f"{mismatch}: {reason}") from None
    # PEFT loads with strict=False; check ourselves that every saved tensor found its place.
    expected = {k for k, _ in model.named_parameters() if "lora_" in k}
    with safe_open(str(weights), framework="pt") as f:
        saved = set(f.keys())
    loaded_names = {k.replace(".default", "") for k in expected}
    missing = sorted(k for k in loaded_names if not any(s.endswith(k.split("base_model.model.", 1)[-1]) for s in saved))
    unexpected = sorted(s for s in saved if not any(k.endswith(s.split("base_model.model.", 1)[-1]) for k in loaded_names))
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing from the adapter: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            detail.append(f"not in the base: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        raise LorafitError(f"{mismatch}; " + "; ".join(detail))
    return model

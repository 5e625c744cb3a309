"""Generation from base + adapter, and the inference-side loading it shares with eval and merge."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.lora import ADAPTER_CONFIG, load_adapter, read_adapter_config
from lorafit.modeling import default_device, load_base_model, load_tokenizer, resolve_precision
from lorafit.rundir import ADAPTER_DIR


@dataclass
class SamplingConfig:
    max_new_tokens: int = 70
    temperature: float = 0.7
    top_p: float | None = None
    top_k: int | None = None
    num_return_sequences: int = 1
    seed: int = 0


def resolve_adapter_dir(path: str | Path) -> Path:
    """A lorafit run directory (uses its adapter/) or a plain PEFT adapter directory."""
    path = Path(path)
    if (path / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
        return path / ADAPTER_DIR
    if (path / ADAPTER_CONFIG).is_file():
        return path
    if not path.exists():
        raise LorafitError(f"'{path}' does not exist; give a lorafit run directory or a PEFT adapter directory.")
    raise LorafitError(
        f"'{path}' holds no adapter ({ADAPTER_DIR}/{ADAPTER_CONFIG} or {ADAPTER_CONFIG}). "
        "Is the run finished? A run that stopped early has its latest state under checkpoints/."
    )


def load_for_inference(run_or_adapter, base: str | None = None, precision: str = "auto", device=None):
    """(PEFT model in eval mode, tokenizer, base name) for a run or adapter directory."""
    adapter_dir = resolve_adapter_dir(run_or_adapter)
    base_name = adapter_base_name(adapter_dir, base)
    base_model, tokenizer = load_inference_base(base_name, adapter_dir, precision, device)
    model = load_adapter(base_model, adapter_dir, base_name)
    return model.eval(), tokenizer, base_name


def adapter_base_name(adapter_dir: Path, base: str | None = None) -> str:
    """The base to load: the one given, else the one the adapter was trained on."""
    base_name = base or read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not base_name:
        raise LorafitError(f"{Path(adapter_dir) / ADAPTER_CONFIG} names no base model; pass --base MODEL.")
    return base_name


def load_inference_base(base_name: str, adapter_dir: Path | None = None, precision: str = "auto", device=None):
    """(base model in eval mode, tokenizer): the adapter's own tokenizer when it saved one, else the base's."""
    from lorafit.config import ModelConfig

    device = device or default_device()
    prec = resolve_precision(precision, device)
    has_own = adapter_dir is not None and (Path(adapter_dir) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(adapter_dir) if has_own else base_name, hint="\n  --base LOCAL_MODEL_DIR")
    base_model = load_base_model(ModelConfig(name=base_name), prec, device, hint="\n  --base LOCAL_MODEL_DIR")
    return base_model.eval(), tokenizer


def sample(model, tokenizer, prompt: str, cfg: SamplingConfig) -> list[str]:
    """Continuations of one prompt (prompt excluded); stops at EOS."""
    return tokenizer.batch_decode(sample_ids(model, tokenizer, prompt, cfg), skip_special_tokens=True)


@torch.inference_mode()
def sample_ids(model, tokenizer, prompt: str, cfg: SamplingConfig) -> torch.Tensor:
    """The new token ids of each continuation (rows that stopped early are padded after their EOS)."""
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)  # same seed for base and fine-tuned: a fair side-by-side
        out = model.generate(
            **enc,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=cfg.temperature > 0,
            temperature=cfg.temperature if cfg.temperature > 0 else None,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            num_return_sequences=cfg.num_return_sequences,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )
    return out[:, enc["input_ids"].shape[1] :]


def merged_copy(model):
    """A copy of base + adapter with LoRA folded into the weights: plain linear layers, no adapter
    overhead per token. For inference only; the trainable model is left untouched."""
    import copy

    fast = copy.deepcopy(model).merge_and_unload()
    fast.config.use_cache = True
    return fast.eval()


def sample_base(model, tokenizer, prompt: str, cfg: SamplingConfig) -> list[str]:
    with model.disable_adapter():
        return sample(model, tokenizer, prompt, cfg)

"""Generation from base + adapter, and the inference-side loading it shares with eval and merge."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.config import ModelConfig
from lorafit.errors import LorafitError
from lorafit.lora import ADAPTER_CONFIG, load_adapter, read_adapter_config, read_base_record, unwrapped
from lorafit.modeling import Precision, default_device, load_base_model, load_tokenizer, max_positions, resolve_precision
from lorafit.rundir import ADAPTER_DIR


MAX_RETURN_SEQUENCES = 128  # OpenAI's own cap on `n`; each sequence holds its own KV cache (20,000 took over 6 GB)


@dataclass
class SamplingConfig:
    max_new_tokens: int = 70
    temperature: float = 0.7
    top_p: float | None = None
    top_k: int | None = None
    num_return_sequences: int = 1
    seed: int = 0


def check_sampling(cfg: SamplingConfig) -> None:
    """Refuse settings generation cannot honour (named as the `lorafit generate` flags), all at once."""
    problems = []
    if cfg.max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be at least 1, got {cfg.max_new_tokens}")
    if not (math.isfinite(cfg.temperature) and cfg.temperature >= 0):
        problems.append(f"--temperature must be a finite number >= 0 (0 = greedy), got {cfg.temperature}")
    if cfg.top_p is not None and not (0 < cfg.top_p <= 1):  # also refuses NaN
        problems.append(f"--top-p must be in (0, 1], got {cfg.top_p}")
    if cfg.top_k is not None and cfg.top_k < 0:
        problems.append(f"--top-k must be >= 0 (0 = no top-k), got {cfg.top_k}")
    if not 0 <= cfg.seed < 2**63:
        problems.append(f"--seed must be in [0, 2^63), got {cfg.seed}")
    if cfg.num_return_sequences < 1:
        problems.append(f"--num-return-sequences must be at least 1, got {cfg.num_return_sequences}")
    elif cfg.num_return_sequences > MAX_RETURN_SEQUENCES:
        problems.append(f"--num-return-sequences must be at most {MAX_RETURN_SEQUENCES} (each sample holds its own "
                        f"cache in memory; run the command again for more), got {cfg.num_return_sequences}")
    elif cfg.num_return_sequences > 1 and cfg.temperature == 0:
        problems.append(f"--num-return-sequences {cfg.num_return_sequences} needs sampling (--temperature > 0): "
                        "greedy decoding has one answer")
    if problems:
        raise LorafitError("; ".join(problems) + ".")


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's tokens; an empty prompt starts from the BOS token (EOS when there is none, as GPT-2 does)."""
    ids = tokenizer(prompt)["input_ids"]
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [start]
    return list(ids)


def check_generation(model, tokenizer, prompt: str, max_new_tokens: int, tokens_name: str = "--max-new-tokens",
                     prompt_name: str = "the prompt") -> None:
    """The prompt and the new tokens fit in the model's context (positions beyond it do not exist)."""
    limit = max_positions(unwrapped(model))
    if limit is None:
        return
    n = len(prompt_ids(tokenizer, prompt))
    if n >= limit:
        raise LorafitError(
            f"{prompt_name} is {n:,} tokens; the model's context is {limit:,} positions, which leaves no room for a "
            f"new token. Shorten it to fewer than {limit:,} tokens."
        )
    if n + max_new_tokens > limit:
        raise LorafitError(
            f"{tokens_name}={max_new_tokens} with {prompt_name} of {n:,} tokens exceeds the model's context of "
            f"{limit:,} positions; set {tokens_name}={limit - n} or less."
        )


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


def base_load_config(adapter_dir: Path, base: str | None = None, attn_implementation: str | None = None,
                     trust_remote_code: bool = False):
    """How to load an adapter's base: as the run recorded it (name, revision, attention implementation),
    with `base` / `attn_implementation` given by the user taking precedence. `trust_remote_code` is the
    user's alone (--trust-remote-code): a file lorafit reads never switches on code execution."""
    load = read_base_record(adapter_dir).get("load") or {}
    if not isinstance(load, dict):
        load = {}
    recorded = load.get("resolved") if load.get("resolved") and Path(load["resolved"]).is_dir() else load.get("name")
    name = base or recorded or read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not name:
        raise LorafitError(f"{adapter_dir / ADAPTER_CONFIG} names no base model; pass --base MODEL.")
    same_base = base is None
    if same_base and load.get("trust_remote_code") is True and not trust_remote_code:
        raise LorafitError(
            f"The adapter in '{adapter_dir}' records that its base '{name}' was loaded with trust_remote_code, which "
            "runs Python code shipped with the model. lorafit never takes that setting from a file it reads: if you "
            "trust the base's code, pass --trust-remote-code; otherwise do not use this adapter."
        )
    return ModelConfig(
        name=name,
        revision=load.get("revision") if same_base else None,
        precision=load.get("precision") or "auto",
        attn_implementation=attn_implementation or load.get("attn_implementation") or "auto",
        trust_remote_code=trust_remote_code,
    )


def load_for_inference(run_or_adapter, base: str | None = None, precision: str | Precision | None = None, device=None,
                       attn_implementation: str | None = None, trust_remote_code: bool = False,
                       force_base: bool = False):
    """(PEFT model in eval mode, tokenizer, base name) for a run or adapter directory, the base loaded
    as the run recorded it unless `base`, `precision` or `attn_implementation` say otherwise. `force_base`:
    load the adapter onto a base whose weights differ from those it was trained on (lora.load_adapter)."""
    adapter_dir = resolve_adapter_dir(run_or_adapter)
    model_cfg = base_load_config(adapter_dir, base, attn_implementation, trust_remote_code)
    base_model, tokenizer = load_inference_base(model_cfg, adapter_dir, precision, device)
    model = load_adapter(base_model, adapter_dir, model_cfg.name, force_base=force_base)
    return model.eval(), tokenizer, model_cfg.name


def load_inference_base(model_cfg, adapter_dir: Path | None = None, precision: str | Precision | None = None, device=None):
    """(base model in eval mode, tokenizer) as `model_cfg` says (see base_load_config): the adapter's
    own tokenizer when it saved one, else the base's. `lorafit serve` puts several adapters on it."""
    device = device or default_device()
    # a Precision already resolved by the caller (who scores with it too), or a name resolved here
    prec = precision if isinstance(precision, Precision) else resolve_precision(precision or model_cfg.precision, device)
    hint = "\n  --base LOCAL_MODEL_DIR"
    has_own = adapter_dir is not None and (Path(adapter_dir) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(adapter_dir) if has_own else model_cfg.name, hint=hint)
    base_model = load_base_model(model_cfg, prec, device, hint=hint)
    return base_model.eval(), tokenizer


def sample(model, tokenizer, prompt: str, cfg: SamplingConfig, segments: list[str] | None = None) -> list[str]:
    """Continuations of one prompt (prompt excluded); stops at EOS. `segments`: the prompt as a template
    rendered it (lorafit/data/templates.py), each encoded on its own as in training."""
    return tokenizer.batch_decode(sample_ids(model, tokenizer, prompt, cfg, segments), skip_special_tokens=True)


@torch.inference_mode()
def sample_ids(model, tokenizer, prompt: str, cfg: SamplingConfig, segments: list[str] | None = None) -> torch.Tensor:
    """The new token ids of each continuation (rows that stopped early are padded after their EOS)."""
    device = next(model.parameters()).device
    if segments is not None:
        ids = [i for seg in segments for i in tokenizer(seg, add_special_tokens=False)["input_ids"]]
    else:
        ids = prompt_ids(tokenizer, prompt)
    ids = torch.tensor([ids], dtype=torch.long, device=device)
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)  # same seed for base and fine-tuned: a fair side-by-side
        out = model.generate(
            **enc,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=cfg.temperature > 0,
            temperature=cfg.temperature if cfg.temperature > 0 else None,
            top_p=cfg.top_p,
            top_k=cfg.top_k or None,  # 0: no top-k
            num_return_sequences=cfg.num_return_sequences,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )
    return out[:, enc["input_ids"].shape[1] :]


def merged_copy(model):
    """A copy of base + adapter with LoRA folded into the weights: plain linear layers, no adapter
    overhead per token. For inference only; the trainable model is left untouched."""
    fast = copy.deepcopy(model).merge_and_unload()
    fast.config.use_cache = True
    return fast.eval()


def sample_base(model, tokenizer, prompt: str, cfg: SamplingConfig, segments: list[str] | None = None) -> list[str]:
    with model.disable_adapter():
        return sample(model, tokenizer, prompt, cfg, segments)

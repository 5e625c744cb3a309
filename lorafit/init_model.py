"""Randomly initialised models for offline smoke runs, tests and benchmarks.

The arithmetic of a random full-size GPT-2 is the same as the real one's, so throughput
measured on it holds for the real weights; only the losses differ.
"""

from __future__ import annotations

from pathlib import Path

from lorafit.config import LoraConfig, ModelConfig
from lorafit.errors import LorafitError, one_line
from lorafit.fingerprint import base_fingerprint
from lorafit.rundir import saving

# This module's own imports of lorafit's torch-side modules are made inside its functions: the CLI's parser reads
# SIZES (`init-model --help`) at start-up, before torch loads.
SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024),
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, n_positions=256),
}


def describe_sizes() -> str:
    """`init-model --help`: what each --config is (torch is imported only to build one)."""
    return "; ".join(f"{name}: {s['n_layer']} layers, {s['n_head']} heads, width {s['n_embd']}, {s['n_positions']} positions"
                     + (" (full-size GPT-2, 124M parameters)" if name == "gpt2" else "") for name, s in SIZES.items())


def is_raw_gpt2_bpe(tok_dir: Path) -> bool:
    """The original GPT-2 release: vocab.json + merges.txt and no transformers tokenizer files."""
    tok_dir = Path(tok_dir)
    return (tok_dir / "vocab.json").is_file() and (tok_dir / "merges.txt").is_file() and not (
        tok_dir / "tokenizer_config.json"
    ).is_file()


def tokenizer_from_dir(tok_dir: Path):
    """A tokenizer from a saved transformers tokenizer directory (lorafit's loader) or from the raw GPT-2 BPE files."""
    tok_dir = Path(tok_dir)
    if is_raw_gpt2_bpe(tok_dir):  # transformers' loader cannot read these (it would need a tokenizer_config.json)
        from transformers import GPT2Tokenizer  # start-up: transformers (see SIZES)

        return GPT2Tokenizer(vocab=str(tok_dir / "vocab.json"), merges=str(tok_dir / "merges.txt"))
    from lorafit.modeling import load_tokenizer  # start-up: torch (see SIZES)

    return load_tokenizer(str(tok_dir))


def init_model(size: str, tokenizer_dir: str, out: Path, seed: int = 0) -> Path:
    # start-up: torch and transformers (see SIZES)
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if size not in SIZES:
        raise LorafitError(f"--config {size!r}: choose one of {', '.join(SIZES)}")
    tok_dir = Path(tokenizer_dir)
    if not tok_dir.is_dir():
        raise LorafitError(f"--tokenizer '{tokenizer_dir}' is not a directory (expected tokenizer files or vocab.json + merges.txt).")
    if not any(tok_dir.iterdir()):
        raise LorafitError(f"--tokenizer '{tokenizer_dir}' is empty (expected tokenizer files or vocab.json + merges.txt).")
    try:
        tokenizer = tokenizer_from_dir(tok_dir)
    except LorafitError:
        raise
    except Exception as exc:  # transformers raises ValueError/OSError/TypeError for the same problem
        raise LorafitError(
            f"--tokenizer '{tokenizer_dir}' holds no tokenizer that loads ({one_line(exc, 200)}). Give a saved "
            "tokenizer directory (tokenizer.json, tokenizer_config.json) or GPT-2's vocab.json + merges.txt."
        ) from None
    if tokenizer.eos_token_id is None:
        raise LorafitError(f"The tokenizer in '{tokenizer_dir}' has no EOS token.")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise LorafitError(f"'{out}' exists and is not empty; choose a new directory.")
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **SIZES[size],
    )
    model = GPT2LMHeadModel(config)
    with saving(f"the model in {out}", "Free space or choose another directory."):
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
    return out


def random_adapter(base_dir: Path, out: Path, seed: int, r: int = 4, targets: tuple[str, ...] = ("c_attn",), scale: float = 0.5) -> Path:
    """A LoRA adapter with random non-zero weights on a local base, saved as a lorafit run saves one
    (tests and the serving load test need several adapters that differ, without training them)."""
    # start-up: torch and transformers (see SIZES)
    import torch
    from transformers import AutoModelForCausalLM

    from lorafit.lora import apply_lora  # start-up: torch (see SIZES)
    from lorafit.modeling import BASE_FINGERPRINT, load_settings, load_tokenizer  # start-up: torch (see SIZES)
    from lorafit.train import save_adapter  # start-up: torch (see SIZES)

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), use_safetensors=True)
    setattr(base, BASE_FINGERPRINT, base_fingerprint(str(base_dir), base.config))  # as load_base_model records it
    load = load_settings(ModelConfig(name=str(base_dir), precision="fp32"), base)
    model = apply_lora(base, LoraConfig(r=r, dropout=0.0, targets=list(targets)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    save_adapter(model, load_tokenizer(str(base_dir)), Path(out), load)
    return Path(out)

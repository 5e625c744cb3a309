"""Base model and tokenizer: from a hub id or a local directory, in the right precision.

Precision `auto`: on a GPU the frozen base is stored in bf16 (fp16 before Ampere) and runs under
autocast, while the LoRA weights stay fp32 (PEFT keeps adapters in fp32); on CPU all is fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from lorafit.config import ModelConfig
from lorafit.errors import LorafitError, offline_note, one_line
from lorafit.fingerprint import base_fingerprint

NETWORK_ERROR_NAMES = (
    "OfflineModeIsEnabled",
    "LocalEntryNotFoundError",
    "ConnectionError",
    "ConnectTimeout",
    "ReadTimeout",
    "MaxRetryError",
    "NameResolutionError",
)


@dataclass
class Precision:
    weights: torch.dtype  # how the frozen base is stored
    autocast: torch.dtype | None  # compute dtype under autocast; None = no autocast


def resolve_precision(name: str, device: torch.device) -> Precision:
    if device.type != "cuda":
        if name in ("bf16", "fp16"):
            # Half precision on CPU is emulated and slow; honour it only when asked explicitly.
            dtype = torch.bfloat16 if name == "bf16" else torch.float16
            return Precision(dtype, dtype)
        return Precision(torch.float32, None)
    if name == "fp32":
        return Precision(torch.float32, None)
    if name == "auto":
        name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if name == "bf16" else torch.float16
    return Precision(dtype, dtype)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def is_network_error(exc: BaseException) -> bool:
    seen = exc
    while seen is not None:
        if type(seen).__name__ in NETWORK_ERROR_NAMES or "offline" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _load_failure(what: str, name: str, exc: Exception, hint: str) -> LorafitError:
    local = Path(name).expanduser()
    if local.is_dir() and what == "Tokenizer" and not any((local / f).is_file() for f in TOKENIZER_FILES):
        return LorafitError(
            f"'{name}' holds no tokenizer that loads (none of {', '.join(TOKENIZER_FILES)}). Give a directory with a saved "
            "tokenizer (a saved transformers model has one), or GPT-2's vocab.json + merges.txt."
        )
    if local.is_dir() and what == "Model" and (local / "config.json").exists() and not any(local.glob("*.safetensors")) \
            and not any(p.suffix in PICKLED_WEIGHTS for p in local.iterdir()):
        held = ", ".join(sorted(p.name for p in local.iterdir())[:8])
        return LorafitError(
            f"Model directory '{name}' holds no weights (no .safetensors file; it has: {held}). Point model.name at a "
            "complete saved model (config.json and model.safetensors), or make a random one with `lorafit init-model`."
        )
    if local.exists() and not local.is_dir():
        return LorafitError(f"{what} '{name}' is a file; give a model directory (with config.json) or a hub id.")
    if (local.is_dir() and not (local / "config.json").exists() and what == "Model"):
        return LorafitError(f"{what} directory '{name}' has no config.json; is it a saved transformers model?")
    if local.is_dir() and what == "Model" and not any(local.glob("*.safetensors")):
        return LorafitError(
            f"Model directory '{name}' has no .safetensors weights. lorafit loads weights only from safetensors "
            "(pickled .bin files can run code when loaded). If you trust the model, convert it once: "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR)."
        )
    reason = one_line(exc)
    if what == "Model" and ("attn_implementation" in str(exc) or "attention implementation" in str(exc).lower()):
        return LorafitError(
            f"Could not load model '{name}' with this attention implementation: {reason}\nSet model.attn_implementation "
            "to one the model supports: auto (transformers picks), eager or sdpa (lorafit eval/generate/merge: "
            "--attn-implementation)."
        )
    if "trust_remote_code" in str(exc) or "custom code" in str(exc):
        return LorafitError(
            f"Could not load {what.lower()} '{name}': it needs its own Python code to load, which lorafit runs only "
            "with model.trust_remote_code=true. Set that only if you trust the code's author."
        )
    if is_network_error(exc) or not local.exists():
        return LorafitError(
            f"Could not load {what.lower()} '{name}': not a local directory, and the Hugging Face Hub "
            f"could not provide it ({reason}).{offline_note()}\nTo run offline, point lorafit at local files:{hint}"
        )
    return LorafitError(f"Could not load {what.lower()} '{name}': {reason}")


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False, hint: str = ""):
    """The tokenizer of a hub id or a saved directory, with an EOS and a pad token: every lorafit tokenizer
    comes from here (the bench's re-created original pipeline alone loads its own, as the original did)."""
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError/ValueError/hub errors for the same problems
        raise _load_failure("Tokenizer", name, exc, hint) from None
    if tok.eos_token_id is None:
        raise LorafitError(f"Tokenizer of '{name}' has no EOS token; lorafit needs one to end examples.")
    if tok.pad_token_id is None:
        # GPT-2 has no pad token. Padding is never scored (targets are -100 there), so EOS as pad is safe.
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(cfg: ModelConfig, precision: Precision, device: torch.device):
    """bitsandbytes settings for model.quantize (QLoRA: NF4 with double quantisation, compute in the
    training precision), or None. Checked before anything loads: it needs CUDA and the extra."""
    if cfg.quantize is None:
        return None
    if device.type != "cuda":
        raise LorafitError(
            f"model.quantize={cfg.quantize} needs a CUDA GPU (bitsandbytes quantises for CUDA kernels); this run is on "
            f"{device.type}. Remove model.quantize, or run on a GPU."
        )
    try:
        import bitsandbytes  # noqa: F401  # optional extra: [quantize]
    except ImportError:
        raise LorafitError(f"model.quantize={cfg.quantize} needs bitsandbytes: pip install -e \".[quantize]\"") from None
    if cfg.quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=precision.autocast or torch.bfloat16)


# GPT-2's `gelu_new` (also GPT-J's, GPT-Neo's, CodeGen's, Phi's) is written as seven elementwise ops (pow, mul,
# add, tanh, ...), each a full pass over the (tokens x 4 hidden) MLP activations, forward and backward. transformers'
# `gelu_pytorch_tanh` is the same function in one kernel, F.gelu(approximate="tanh"): 3.4x faster forward + backward
# on CPU too (6.6 vs 2.0 ms for one quotes step's activations, ~5% of the step). Every load of a base (training, eval,
# generate, merge, serve) goes through load_base_model, so an adapter is always evaluated as it was trained.
FUSED_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh"}
ACTIVATION_KEYS = ("activation_function", "hidden_act")  # GPT-2/GPT-J/GPT-Neo/CodeGen; most others
ORIGINAL_ACTIVATIONS = "lorafit_original_activations"  # on the loaded model: {key: the base's own name}
BASE_FINGERPRINT = "lorafit_base_fingerprint"  # on the loaded model: its identity (lorafit/fingerprint.py)


def fuse_activations(config) -> dict[str, str]:
    """Name the one-kernel equivalent in `config` where the base says `gelu_new`; returns {key: original}.
    Only transformers' own model classes: code shipped with a model may not know the name."""
    if not type(config).__module__.startswith("transformers."):
        return {}
    originals = {}
    for key in ACTIVATION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, str) and value in FUSED_ACTIVATIONS:
            originals[key] = value
            setattr(config, key, FUSED_ACTIVATIONS[value])
    return originals


def restore_activation_names(model) -> None:
    """The base's own activation names back in model.config (the same function): a model saved from a loaded
    base (lorafit merge) has the config its user knows."""
    for key, value in getattr(model, ORIGINAL_ACTIVATIONS, {}).items():
        setattr(model.config, key, value)


def load_base_model(cfg: ModelConfig, precision: Precision, device: torch.device, hint: str = ""):
    """The frozen base, loaded straight onto its device (a GPU never waits for a full CPU copy first), with
    the one-kernel GELU where the base names `gelu_new` (see FUSED_ACTIVATIONS)."""
    quantization = quantization_config(cfg, precision, device)
    try:
        config = AutoConfig.from_pretrained(cfg.name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        originals = fuse_activations(config)
        model = AutoModelForCausalLM.from_pretrained(
            cfg.name,
            config=config,
            revision=cfg.revision,
            dtype=precision.weights,
            attn_implementation=None if cfg.attn_implementation == "auto" else cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True,  # never unpickle weights: a .bin file can run code when loaded
            device_map={"": device if device.index is not None else torch.device("cuda", torch.cuda.current_device())}
            if device.type == "cuda" else None,
            quantization_config=quantization,
        )
    except torch.OutOfMemoryError:
        raise out_of_memory(device, "loading the base model") from None
    except Exception as exc:
        raise _load_failure("Model", cfg.name, exc, hint) from None
    setattr(model, ORIGINAL_ACTIVATIONS, originals)
    setattr(model, BASE_FINGERPRINT, base_fingerprint(cfg.name, config))  # what adapters and checkpoints record
    model.config.use_cache = False  # training never needs the KV cache
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    if quantization is not None:
        # start-up: peft (about a second) loads only for a quantized base; `lorafit data` needs none of it
        from peft import prepare_model_for_kbit_training

        # Norms in fp32 and inputs that require grad, as QLoRA trains; checkpointing is train.gradient_checkpointing's.
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model if device.type == "cuda" else model.to(device)


def out_of_memory(device: torch.device, doing: str) -> LorafitError:
    return LorafitError(
        f"Out of memory on {device} while {doing}. Lower train.micro_batch_tokens (tokens a forward pass), set "
        "train.gradient_checkpointing=true (recompute activations), or model.quantize=nf4 (a 4-bit base, CUDA); "
        "with several GPUs, train.fsdp=true shards the base."
    )


def load_settings(cfg: ModelConfig, model) -> dict:
    """Everything needed to load this base again as it was trained: the name as the user gave it,
    the resolved local path, and the settings (the attention implementation as resolved)."""
    local = Path(cfg.name).expanduser()
    return {
        "name": cfg.name,
        "resolved": str(local.resolve()) if local.is_dir() else None,
        "revision": cfg.revision,
        "precision": cfg.precision,
        "attn_implementation": getattr(model.config, "_attn_implementation", None) or cfg.attn_implementation,
        "trust_remote_code": cfg.trust_remote_code,
    }


def set_dropout(model, p: float) -> None:
    """Override the base's own dropout (before LoRA adds its own). With p = 0 attention can use the
    flash kernel, which has no dropout-free fallback cost; the published recipes keep GPT-2's 0.1."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
    for key in ("attn_pdrop", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_dropout", "dropout"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, p)


def max_positions(model) -> int | None:
    c = model.config
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(c, key, None):
            return int(getattr(c, key))
    return None

"""LoRA through PEFT: wrap a frozen base, load saved adapters safely, check saved tensors against a model."""

from __future__ import annotations

import contextlib
import copy
import json
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULT_TARGETS
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

from lorafit.atomic import atomic_write_text
from lorafit.config import LoraConfig
from lorafit.console import log
from lorafit.errors import LorafitError, first_line
from lorafit.fingerprint import FINGERPRINT_KEY, differs

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_SIGNATURE = "lorafit_base.json"
BASE_SIGNATURE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")
AUTO, ALL_LINEAR = "auto", "all-linear"


def unwrapped(model):
    """The transformers model inside a PEFT wrapper (with its LoRA layers), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _linear_classes() -> tuple[type, ...]:
    return (torch.nn.Linear, Conv1D)  # subclasses count too (Falcon's FalconLinear)


def _wrappable(model) -> list[str]:
    """Full names of the modules LoRA can wrap: linear-like layers (subclasses included), embeddings, convolutions."""
    kinds = (*_linear_classes(), torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)
    return [name for name, module in model.named_modules() if name and isinstance(module, kinds)]


def linear_module_names(model) -> list[str]:
    """Distinct last-name components of the modules LoRA can wrap (e.g. c_attn, c_proj, c_fc)."""
    return sorted({name.rsplit(".", 1)[-1] for name in _wrappable(model)})


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # how PEFT matches a list of target names


def all_linear_targets(model) -> list[str]:
    """Every linear-like layer but the output head, as PEFT's `all-linear` chooses them, named by their
    last component where that name picks out linear layers only (else by full name)."""
    head = model.get_output_embeddings()
    named = dict(model.named_modules())
    linear = {n for n, m in named.items() if n and isinstance(m, _linear_classes()) and m is not head}
    targets = []
    for short in sorted({n.rsplit(".", 1)[-1] for n in linear}):
        matched = {n for n in named if n and _matches(n, short)}
        targets += [short] if matched <= linear else sorted(n for n in linear if _matches(n, short))
    return targets


def resolve_targets(model, targets: str | list[str]) -> tuple[list[str], str | None]:
    """lora.targets as module names for this model: `auto` is PEFT's default for the architecture
    (GPT-2: c_attn), else every linear layer but the head, less any module PEFT itself refuses on this
    model (asked by `peft_refuses`, not by a list of families); `all-linear` every linear layer but the
    head. Returns (names, a note when `auto` fell back or left modules out). Named targets must exist,
    or the error lists what does."""
    if targets == ALL_LINEAR:
        return all_linear_targets(model), None
    if targets == AUTO:
        # PEFT's refusal check builds a skeleton and the probe initialises a throw-away LoRA, both drawing from
        # the global generators: kept as they were, so a seed gives the same run whether or not `auto` asked
        with random_state_kept(model):
            return _resolve_auto(model)
    targets = [targets] if isinstance(targets, str) else list(targets)
    unknown = _unknown_targets(model, targets)
    if unknown:
        raise LorafitError(
            f"lora.targets: no linear-like module named {', '.join(map(repr, unknown))} in {type(model).__name__}. "
            f"Modules LoRA can wrap in this model: {', '.join(linear_module_names(model))}. "
            f"Or use lora.targets={AUTO} (PEFT's default for this architecture) or lora.targets={ALL_LINEAR}."
        )
    return targets, None


def _resolve_auto(model) -> tuple[list[str], str | None]:
    """lora.targets=auto (see resolve_targets)."""
    model_type = getattr(model.config, "model_type", None)
    default = PEFT_DEFAULT_TARGETS.get(model_type)
    if default and not _unknown_targets(model, default):
        candidates, note = list(default), None
    else:
        why = "has no PEFT default" if not default else "does not have PEFT's default modules"
        candidates, note = all_linear_targets(model), f"lora.targets=auto: model type '{model_type}' {why}; using all-linear"
    refused = peft_refuses(model, candidates)
    if refused:
        kept = [t for t in candidates if t not in refused]
        if not kept:
            raise LorafitError(
                f"lora.targets=auto: PEFT refuses every candidate module of this {type(model).__name__} "
                f"({'; '.join(refused.values())}). Name targets PEFT accepts in lora.targets."
            )
        dropped = ", ".join(f"{t} ({why})" for t, why in refused.items())
        note = (note + "; " if note else "lora.targets=auto: ") + f"left out what PEFT refuses on this model: {dropped}"
        candidates = kept
    idle = targets_without_gradient(model, candidates)
    if idle:
        kept = [t for t in candidates if t not in idle]
        if not kept:
            raise LorafitError(
                f"lora.targets=auto: no LoRA weight on {', '.join(candidates)} gets a gradient in this "
                f"{type(model).__name__}'s forward (it uses those layers' weights without calling them). "
                f"Name other targets in lora.targets; modules LoRA can wrap: {', '.join(linear_module_names(model))}."
            )
        note = (note + "; " if note else "lora.targets=auto: ") + (
            f"left out {', '.join(idle)}: this model's forward uses their weights without calling the layer, "
            "so LoRA on them would never train")
        candidates = kept
    return candidates, note


@contextlib.contextmanager
def random_state_kept(model):
    """Python's, numpy's and torch's generators (and the model's CUDA device's) left as they were on entry."""
    device = next(model.parameters()).device
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def peft_refuses(model, targets: list[str]) -> dict[str, str]:
    """{target: PEFT's reason} for the targets PEFT will not wrap on this model (e.g. Mamba's out_proj, whose
    fused kernel bypasses the module). PEFT itself is asked, on a weightless copy of the model's skeleton (meta
    tensors: no memory, the model itself untouched): all targets at once, then one by one if it refuses."""
    def refusal(names: list[str]) -> str | None:
        try:
            with torch.device("meta"):
                skeleton = type(model)._from_config(copy.deepcopy(model.config))
        except Exception:  # noqa: BLE001 - a model that cannot be rebuilt from its config: leave the check to apply_lora
            return None
        try:
            with peft_detects_fan_in_fan_out(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the real wrap below warns for itself
                get_peft_model(skeleton, peft_config(LoraConfig(dropout=0.0), names))
        except ValueError as exc:
            return first_line(exc)
        return None

    if refusal(targets) is None:
        return {}
    return {t: why for t in targets if (why := refusal([t])) is not None}


def targets_without_gradient(model, targets: list[str]) -> list[str]:
    """The targets whose LoRA weights get no gradient from the model's own loss (a forward that reads a
    layer's weight directly, as a fused kernel does, bypasses its LoRA). The targets are wrapped for one
    forward and backward of a short input (B = 0 at first, so the loss is the model's own; B's gradient is
    nonzero wherever the layer's output is used), then unwrapped: the model is left as it was."""
    device = next(model.parameters()).device
    if device.type == "meta":  # no weights to run (a skeleton, e.g. to count parameters): nothing to probe
        return []
    # The probe's LoRA initialisation draws from the global generators: restored after, so the real adapter's
    # initial weights (and so the whole run) are those the same seed gave without the probe.
    with random_state_kept(model):
        return _probe_gradients(model, targets, get_peft_model)


def _probe_gradients(model, targets: list[str], get_peft_model) -> list[str]:
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    with peft_detects_fan_in_fan_out(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the real wrap warns for itself
        wrapped = get_peft_model(model, peft_config(LoraConfig(dropout=0.0), targets))
    try:
        device = next(model.parameters()).device
        ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)
        wrapped.eval()
        logits = wrapped(input_ids=ids, use_cache=False).logits[0, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
        if loss.requires_grad:  # else no LoRA weight is in the loss's graph at all
            loss.backward()
        reached = {t: False for t in targets}
        for name, param in wrapped.named_parameters():
            if "lora_B" in name and param.grad is not None and bool(param.grad.abs().max() > 0):
                layer = name.split(".lora_B", 1)[0]
                for t in targets:
                    reached[t] = reached[t] or _matches(layer, t)
    finally:
        wrapped.unload()  # the original layers back in place
        model.train(was_training)
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(name, p.requires_grad))
            p.grad = None
    return [t for t, ok in reached.items() if not ok]


def _unknown_targets(model, targets: list[str]) -> list[str]:
    names = _wrappable(model)
    return [t for t in targets if not any(_matches(n, t) for n in names)]


def peft_config(cfg: LoraConfig, targets: list[str]):
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(targets),
        bias=cfg.bias,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        task_type="CAUSAL_LM",
        # fan_in_fan_out (GPT-2's Conv1D stores weights as (in, out)) is left to PEFT: it sets it for
        # Conv1D targets, and the saved adapter_config.json records it.
    )


FAN_IN_FAN_OUT_WARNING = r"fan_in_fan_out is set to \w+ but the target module is"  # peft/tuners/lora/layer.py


@contextlib.contextmanager
def peft_detects_fan_in_fan_out():
    """PEFT sets fan_in_fan_out by the target's layer type (True for Conv1D) and warns that it did: lorafit
    leaves it to PEFT on purpose, so that one warning says nothing to a user. Every other warning shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=FAN_IN_FAN_OUT_WARNING, category=UserWarning)
        yield


def apply_lora(model, cfg: LoraConfig, targets: list[str] | None = None):
    """Freeze the base and add fresh LoRA weights (B = 0, so outputs are unchanged). `targets`: the
    names `resolve_targets` gave for cfg.targets (resolved here when not given)."""
    targets = targets if targets is not None else resolve_targets(model, cfg.targets)[0]
    with peft_detects_fan_in_fan_out():
        try:
            peft_model = get_peft_model(model, peft_config(cfg, targets))
        except ValueError as exc:  # e.g. a setting this module type does not support
            raise LorafitError(f"PEFT cannot apply this LoRA config: {first_line(exc)}") from None
    for param in peft_model.parameters():  # PEFT keeps adapters fp32; make sure of it
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return peft_model


def format_counts(trainable: int, total: int) -> str:
    return f"trainable {trainable:,} / {total:,} ({100 * trainable / total:.2f}%)"


def read_adapter_config(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise LorafitError(
            f"'{adapter_dir}' is not a LoRA adapter: {ADAPTER_CONFIG} is missing. "
            "Give a lorafit run directory or a PEFT adapter directory."
        )
    return read_adapter_json(path)


def read_adapter_json(path: Path) -> dict:
    """A JSON object file of an adapter; a damaged one is an error saying how to get the adapter back."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(value, dict):
            raise ValueError(f"it holds a {type(value).__name__}, not an object")
        return value
    except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise LorafitError(
            f"{path} is unreadable ({first_line(exc, 200)}); the adapter cannot be used. If it belongs to a lorafit run, delete the "
            "run's adapter/ and summary.json and run the same train command with --resume: the adapter is written "
            "again from the last checkpoint. Otherwise restore the adapter from a copy."
        ) from None


def base_signature(model) -> dict:
    """What an adapter needs its base to be: architecture and the sizes its tensors depend on."""
    config = model.config
    return {key: getattr(config, key, None) for key in BASE_SIGNATURE_KEYS}


def loaded_fingerprint(model) -> dict | None:
    """The fingerprint modeling.load_base_model attached to a base (None for a model made otherwise)."""
    return getattr(unwrapped(model), "lorafit_base_fingerprint", None)


def write_base_signature(adapter_dir: Path, model, load: dict | None = None) -> None:
    """lorafit's metadata beside a saved adapter: the base's signature and fingerprint (its weights' identity),
    and how the base was loaded (`load`: what eval, generate and merge need to load it the same way)."""
    fingerprint = loaded_fingerprint(model)
    record = {**base_signature(model), **({FINGERPRINT_KEY: fingerprint} if fingerprint else {}),
              **({"load": load} if load else {})}
    atomic_write_text(Path(adapter_dir) / BASE_SIGNATURE, json.dumps(record, indent=2))


def read_base_record(adapter_dir: Path) -> dict:
    """lorafit's metadata of an adapter ({} for a plain PEFT adapter)."""
    path = Path(adapter_dir) / BASE_SIGNATURE
    return read_adapter_json(path) if path.is_file() else {}


def load_adapter(base_model, adapter_dir: Path, base_name: str, is_trainable: bool = False, adapter_name: str = "default",
                 force_base: bool = False):
    """Base + saved adapter. Any difference in base signature, fingerprint (other weights of the same shapes:
    only `force_base` lets that pass), keys or shapes is an error naming both bases; never a partial load.
    Weights come only from safetensors. Given a PeftModel, the adapter is added to it as `adapter_name`
    (several adapters on one base, as `lorafit serve` keeps them)."""
    adapter_dir = Path(adapter_dir)
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise LorafitError(f"Adapter weights not found: {weights_path} (lorafit loads adapters only from safetensors).")
    trained_on = read_adapter_config(adapter_dir).get("base_model_name_or_path")

    def mismatch(reason: str) -> LorafitError:
        return LorafitError(
            f"The adapter in '{adapter_dir}' was trained on base '{trained_on}' and does not fit the given base "
            f"'{base_name}': {reason}. Pass the adapter's own base (--base), or train an adapter for this one."
        )

    adding = isinstance(base_model, PeftModel)
    # Written by lorafit; a plain PEFT adapter has only keys and shapes to check.
    saved_sig, given_sig = read_base_record(adapter_dir), base_signature(unwrapped(base_model))
    differ = [f"{k} {saved_sig[k]} vs {given_sig[k]}" for k in BASE_SIGNATURE_KEYS if k in saved_sig and saved_sig[k] != given_sig[k]]
    if differ:
        raise mismatch(", ".join(differ))
    if saved_sig:  # written by lorafit (a plain PEFT adapter records no base to compare)
        check_same_base(saved_sig.get(FINGERPRINT_KEY), loaded_fingerprint(base_model), force_base,
                        lambda why: mismatch(f"{why} (other weights of the same shapes). If you mean to use it on "
                                             "this base anyway, pass --force-base"),
                        f"the adapter in '{adapter_dir}'")
    if adding and adapter_name in base_model.peft_config:
        raise LorafitError(f"An adapter named '{adapter_name}' is already loaded; choose another name.")
    try:
        config = PeftConfig.from_pretrained(str(adapter_dir))
        config.inference_mode = not is_trainable
        with peft_detects_fan_in_fan_out():  # a plain PEFT adapter may have left it False for GPT-2
            if adding:
                model = base_model
                model.add_adapter(adapter_name, config)
            else:
                model = PeftModel(base_model, config, adapter_name=adapter_name)
    except (ValueError, TypeError, KeyError) as exc:  # e.g. target modules absent from this base
        raise mismatch(first_line(exc)) from None

    def undo() -> None:  # never leave a half-loaded adapter in a model that stays in use (lorafit serve)
        model.delete_adapter(adapter_name) if adding else model.unload()

    expected = {k: v.shape for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}
    try:
        saved = load_file(str(weights_path))
    except SafetensorError as exc:
        undo()
        raise LorafitError(f"{weights_path} is not a valid safetensors file ({exc}).") from None
    problems = key_problems(expected, {k: v.shape for k, v in saved.items()})
    if problems:
        undo()
        raise mismatch("; ".join(problems))
    set_peft_model_state_dict(model, saved, adapter_name=adapter_name)
    return model if is_trainable else model.eval()


def check_same_base(recorded, current, force_base: bool, refusal, what: str) -> None:
    """Refuse (raise `refusal(why)`) when a recorded base fingerprint differs from the loaded base's, unless
    `force_base`. Without a recorded one (made by an older lorafit, or a plain PEFT adapter) there is nothing
    to compare: a warning says so, and the load goes on."""
    if recorded is None:
        if current is not None and not force_base:
            log(f"warning: {what} records no fingerprint of its base (made by an older lorafit?): lorafit cannot "
                "check that the base has the same weights, only the same shapes.")
        return
    why = differs(recorded, current)
    if why is None:
        return
    if force_base:
        log(f"warning: --force-base: using {what} on another base than its own ({why}).")
        return
    raise refusal(why)


def key_problems(expected: dict, saved: dict, saved_as: str = "adapter", model_as: str = "base",
                 show: int = 5) -> list[str]:
    """What keeps `saved` {name: shape} from loading into a model that expects `expected` {name: shape}:
    missing and unexpected tensor names and shape differences, a few of each named. `saved_as` and
    `model_as` name the two sides in the messages (an adapter and its base, a checkpoint and the run's model)."""

    def listed(names: list[str]) -> str:
        return ", ".join(names[:show]) + (f" (+{len(names) - show} more)" if len(names) > show else "")

    missing = sorted(expected.keys() - saved.keys())
    unexpected = sorted(saved.keys() - expected.keys())
    shapes = [f"{k} {tuple(saved[k])} vs {tuple(s)}" for k, s in sorted(expected.items()) if k in saved and saved[k] != s]
    problems = []
    if missing:
        problems.append(f"missing from the {saved_as}: {listed(missing)}")
    if unexpected:
        problems.append(f"not in the {model_as}: {listed(unexpected)}")
    if shapes:
        problems.append(f"shape ({saved_as} vs {model_as}): {listed(shapes)}")
    return problems

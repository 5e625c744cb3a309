"""The run configuration: one typed tree, loaded from a recipe plus dotted overrides.

    cfg = load_config("quotes", ["lora.r=16", "train.max_steps=10"])

Every problem (unknown key with the nearest valid name, wrong type, bad value) is collected
and raised once as a `ConfigError`, so a user fixes a bad recipe in one pass.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lorafit.errors import ConfigError, LorafitError

RECIPE_PACKAGE = "lorafit.recipes"


@dataclass
class ModelConfig:
    name: str = "gpt2"  # hub id or local directory
    revision: str | None = None
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    attn_implementation: str = "auto"  # auto (transformers picks: sdpa where the model has it) | eager | sdpa | ...
    dropout: float | None = None  # the base's own dropout (GPT-2: 0.1); None keeps it, 0 turns it off
    trust_remote_code: bool = False
    quantize: str | None = None  # nf4 | int8: the frozen base quantised by bitsandbytes (QLoRA; CUDA only)


@dataclass
class SourceConfig:
    path: str = ""  # hub dataset id or local file (relative to data.root if set)
    text_field: str | list[str] = "text"  # several fields are joined with `join`
    join: str = "\n"
    format: str = "auto"  # auto | hub | jsonl | json | csv | txt | parquet
    split: str = "train"  # hub split
    config: str | None = None  # hub config name (e.g. "3.0.0" for cnn_dailymail)
    revision: str | None = None
    max_examples: int | None = None  # cap, taken by seeded sampling
    weight: float = 1.0  # sampling weight: examples kept = weight * available (after the cap)
    separator: str | None = None  # txt: split the file on this string instead of lines
    drop_unterminated: bool = False  # txt + separator: drop a last piece with no separator after it
    csv_header: bool = True  # csv: False when the first row is data; fields are then indices
    records_path: str | None = None  # json: where the records are, e.g. "data[].paragraphs[]"
    min_chars: int = 1  # drop texts shorter than this (after stripping whitespace)
    dedupe: bool = False  # drop exact duplicate texts


@dataclass
class DataConfig:
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    root: str | None = None  # base directory for relative local source paths
    val_fraction: float = 0.1
    split_seed: int = 42
    stratify: bool = True  # hold out val_fraction of every source (not of the pooled rows)
    seq_len: int = 64  # longest example in tokens, EOS included
    long_examples: str = "truncate"  # truncate | chunk | drop
    pack_len: int | None = None  # packed row length (rows packing); None = seq_len
    packing: str = "auto"  # auto | segments | rows | padded: see lorafit/fastpath.py; auto = the fastest exact one
    cache_dir: str | None = None  # tokenised-data cache; None = ~/.cache/lorafit


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    # auto: PEFT's default for the architecture (GPT-2: c_attn); all-linear: every linear layer but the head; or names
    targets: str | list[str] = "auto"
    bias: str = "none"  # none | all | lora_only
    use_rslora: bool = False
    use_dora: bool = False


@dataclass
class TrainConfig:
    epochs: float = 1.0
    max_steps: int | None = None  # caps the run (optimizer steps)
    lr: float = 2e-4
    batch_size: int = 4  # examples per micro-batch in the original recipe
    grad_accum: int = 1  # batch_size * grad_accum = examples per optimizer step
    micro_batch_tokens: int | None = None  # memory knob; None = chosen for the device
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "linear"  # linear | cosine | constant
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    seed: int = 42
    log_every: int = 10
    eval_every: int | None = None  # optimizer steps; None = only before and after training
    save_every: int | None = None  # optimizer steps between checkpoints; None = end only
    keep_checkpoints: int = 2
    compile: bool = False
    skip_nonfinite: bool = False
    gradient_checkpointing: bool = False  # recompute activations in the backward: less memory, ~30% more compute
    fsdp: bool = False  # data parallel with the frozen base sharded over the ranks (torch FSDP2 fully_shard)


@dataclass
class EvalConfig:
    before_training: bool = True  # a quick eval at step 0, so the user sees the change
    max_examples: int | None = None
    batch_tokens: int | None = None  # None = chosen for the device
    sample_prompt: str | None = None  # generated at each eval when set
    sample_max_new_tokens: int = 40


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/run"
    recipe: str | None = None  # name of the recipe this came from, for the model card

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "model.precision": ("auto", "fp32", "bf16", "fp16"),
    "data.long_examples": ("truncate", "chunk", "drop"),
    "data.packing": ("auto", "segments", "rows", "padded"),
    "lora.bias": ("none", "all", "lora_only"),
    "train.schedule": ("linear", "cosine", "constant"),
    "source.format": ("auto", "hub", "jsonl", "json", "csv", "txt", "parquet"),
}


# ---------------------------------------------------------------- building from dicts

KNOWN_ALIASES = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
    "learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "max_length": "seq_len", "max_seq_length": "seq_len",
    "model_name_or_path": "name", "dataset_text_field": "text_field",
}


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true/false"}.get(
            tp.__name__, tp.__name__
        )
    origin = typing.get_origin(tp)
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    return str(tp)


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check `value` against annotation `tp`; return it converted, or record a problem."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for opt in options:  # first option that accepts the value without a problem
            if opt is type(None):
                continue
            trial: list[str] = []
            out = _coerce(value, opt, where, trial)
            if not trial:
                return out
        names = " or ".join(_type_name(o) for o in options)
        problems.append(f"{where}: expected {names}, got {value!r}")
        return None
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, problems)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str | int | float) and not isinstance(value, bool) and item_tp is str:
            value = [str(value)] if not isinstance(value, str) else [value]
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {value!r}")
            return None
        return [_coerce(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
            return None
        return {str(k): _coerce(v, val_tp, f"{where}.{k}", problems) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # yaml reads "2e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # e.g. a hub config name like 3.0.0 is fine; 3 -> "3"
    else:
        return value
    problems.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return None


def _build(cls: type, raw: Any, where: str, problems: list[str]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{where or 'config'}: expected a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            # Names users bring from PEFT / the HF Trainer map to ours; otherwise the closest spelling.
            alias = KNOWN_ALIASES.get(str(key))
            close = [alias] if alias in names else difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            problems.append(f"{path}: unknown key{hint}")
            continue
        kwargs[key] = _coerce(value, hints[key], path, problems)
    kwargs = {k: v for k, v in kwargs.items() if v is not None or _allows_none(hints[k])}
    return cls(**kwargs)


def _allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


# ---------------------------------------------------------------- validation of values


def _check_values(cfg: RunConfig, problems: list[str]) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    def choice(key: str, value: str) -> None:
        options = CHOICES[key]
        need(value in options, f"{key}: {value!r} is not one of {', '.join(options)}")

    choice("model.precision", cfg.model.precision)
    need(cfg.model.quantize in (None, "nf4", "int8"), f"model.quantize: {cfg.model.quantize!r} is not one of nf4, int8 (or null)")
    choice("data.long_examples", cfg.data.long_examples)
    choice("data.packing", cfg.data.packing)
    choice("lora.bias", cfg.lora.bias)
    choice("train.schedule", cfg.train.schedule)
    need(bool(cfg.model.name), "model.name: must name a hub model id or a local directory")
    need(
        cfg.model.dropout is None or 0.0 <= cfg.model.dropout < 1.0,
        f"model.dropout: must be in [0, 1) (or null to keep the model's own), got {cfg.model.dropout}",
    )

    d = cfg.data
    need(len(d.sources) > 0, "data.sources: at least one source is needed (name: {path: ..., text_field: ...})")
    for name, src in d.sources.items():
        if src is None:
            continue
        need(bool(src.path), f"data.sources.{name}.path: required (a hub dataset id or a local file)")
        need(
            src.format in CHOICES["source.format"],
            f"data.sources.{name}.format: {src.format!r} is not one of {', '.join(CHOICES['source.format'])}",
        )
        need(
            src.max_examples is None or src.max_examples > 0,
            f"data.sources.{name}.max_examples: must be positive, got {src.max_examples}",
        )
        need(0 < src.weight, f"data.sources.{name}.weight: must be positive, got {src.weight}")
        fields = src.text_field if isinstance(src.text_field, list) else [src.text_field]
        need(len(fields) > 0 and all(str(f) != "" for f in fields), f"data.sources.{name}.text_field: required")
    need(0.0 < d.val_fraction < 1.0, f"data.val_fraction: must be in (0, 1), got {d.val_fraction}")
    need(d.seq_len >= 2, f"data.seq_len: must be at least 2, got {d.seq_len}")
    need(
        d.pack_len is None or d.pack_len >= d.seq_len,
        f"data.pack_len: must be at least data.seq_len ({d.seq_len}), got {d.pack_len}",
    )

    lo = cfg.lora
    need(lo.r > 0, f"lora.r: must be a positive integer, got {lo.r}")
    need(lo.alpha > 0, f"lora.alpha: must be positive, got {lo.alpha}")
    need(0.0 <= lo.dropout < 1.0, f"lora.dropout: must be in [0, 1), got {lo.dropout}")
    need(
        (isinstance(lo.targets, str) and lo.targets != "") or (isinstance(lo.targets, list) and len(lo.targets) > 0 and all(lo.targets)),
        "lora.targets: auto, all-linear, or at least one module name (e.g. [c_attn])",
    )

    t = cfg.train
    need(t.epochs > 0, f"train.epochs: must be positive, got {t.epochs}")
    need(t.max_steps is None or t.max_steps > 0, f"train.max_steps: must be positive, got {t.max_steps}")
    need(t.lr > 0, f"train.lr: must be positive, got {t.lr}")
    need(t.batch_size > 0, f"train.batch_size: must be positive, got {t.batch_size}")
    need(t.grad_accum > 0, f"train.grad_accum: must be positive, got {t.grad_accum}")
    need(t.weight_decay >= 0, f"train.weight_decay: must be >= 0, got {t.weight_decay}")
    need(t.warmup_steps >= 0, f"train.warmup_steps: must be >= 0, got {t.warmup_steps}")
    need(t.log_every > 0, f"train.log_every: must be positive, got {t.log_every}")
    need(t.eval_every is None or t.eval_every > 0, f"train.eval_every: must be positive, got {t.eval_every}")
    need(t.save_every is None or t.save_every > 0, f"train.save_every: must be positive, got {t.save_every}")
    need(t.keep_checkpoints >= 1, f"train.keep_checkpoints: must be at least 1, got {t.keep_checkpoints}")
    need(
        t.micro_batch_tokens is None or t.micro_batch_tokens > 0,
        f"train.micro_batch_tokens: must be positive, got {t.micro_batch_tokens}",
    )
    need(
        t.max_grad_norm is None or t.max_grad_norm > 0,
        f"train.max_grad_norm: must be positive (or null to disable), got {t.max_grad_norm}",
    )


# ---------------------------------------------------------------- recipes and overrides


def list_recipes() -> list[str]:
    files = resources.files(RECIPE_PACKAGE).iterdir()
    return sorted(p.name[: -len(".yaml")] for p in files if p.name.endswith(".yaml"))


def read_recipe(name_or_path: str) -> tuple[dict[str, Any], str | None]:
    """Return the raw dict of a shipped recipe (by name) or a YAML file, and the recipe name."""
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise LorafitError(f"Recipe file not found: {path}. Give a shipped recipe name ({', '.join(list_recipes())}) or an existing YAML file.")
        text, recipe_name = path.read_text(encoding="utf-8"), path.stem
    else:
        if name_or_path not in list_recipes():
            close = difflib.get_close_matches(name_or_path, list_recipes(), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise LorafitError(
                f"No recipe named '{name_or_path}'.{hint} Shipped recipes: {', '.join(list_recipes())}; "
                "or give the path of a YAML file."
            )
        text = resources.files(RECIPE_PACKAGE).joinpath(f"{name_or_path}.yaml").read_text(encoding="utf-8")
        recipe_name = name_or_path
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise LorafitError(f"Recipe {name_or_path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise LorafitError(f"Recipe {name_or_path} must be a YAML mapping at the top level.")
    return raw, recipe_name


def apply_overrides(raw: dict[str, Any], overrides: list[str], problems: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a raw dict; values are parsed as YAML (so lists work)."""
    for item in overrides:
        if "=" not in item:
            problems.append(f"override '{item}': expected key=value, e.g. train.lr=1e-4")
            continue
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"override '{item}': '{part}' is not a section")
                break
            node = child
        else:
            node[parts[-1]] = value
    return raw


def build_config(raw: dict[str, Any]) -> RunConfig:
    problems: list[str] = []
    cfg = _build(RunConfig, raw, "", problems)
    _check_values(cfg, problems)  # fields with a bad type fell back to defaults, which pass
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(recipe: str, overrides: list[str] | None = None) -> RunConfig:
    raw, name = read_recipe(recipe)
    problems: list[str] = []
    raw = apply_overrides(raw, list(overrides or []), problems)
    raw.setdefault("recipe", name)
    if problems:
        # Report override syntax problems together with everything else that is wrong.
        try:
            build_config(raw)
        except ConfigError as exc:
            problems += exc.problems
        raise ConfigError(problems)
    return build_config(raw)


def save_config(cfg: RunConfig, path: Path) -> None:
    from lorafit.rundir import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_saved_config(path: Path) -> RunConfig:
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return build_config(raw)

"""The run configuration: one typed tree, loaded from a recipe plus dotted overrides.

    cfg = load_config("quotes", ["lora.r=16", "train.max_steps=10"])

Every problem (unknown key with the nearest valid name, wrong type, bad value) is collected
and raised once as a `ConfigError`, so a user fixes a bad recipe in one pass.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import keyword
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lorafit.atomic import atomic_write_text
from lorafit.data.label_pairs import problems as label_pair_problems
from lorafit.data.paths import LOCAL_SUFFIXES
from lorafit.data.templates import source_problems
from lorafit.errors import ConfigError, LorafitError, not_utf8
from lorafit.rundir import CONFIG_FILE, MARKER_FILE, forbidden_output_dir

RECIPE_PACKAGE = "lorafit.recipes"
YAML_MAX_NODES = 10_000  # a recipe is a few hundred nodes; YAML aliases may not expand one beyond this
MAX_INT = 2**63 - 1  # what torch and numpy can hold
MAX_SEED = 2**32 - 1  # numpy's seeding limit
# Caps on values that would exhaust memory or overflow later, checked with the config before anything loads:
PATH_MAX, NAME_MAX = 4096, 255  # Linux's limits on a path and on one of its names (most file systems share them)
MAX_SOURCE_WEIGHT = 1_000  # a source repeated 1,000 times is already far beyond useful upsampling; 1e6 took 6 GB
MAX_EPOCHS = 1_000_000  # epochs x examples must stay a step count (train.max_steps caps a run more precisely)
MAX_LORA_R = 4_096  # beyond a layer's own width a rank adds nothing; 2^63-1 would try to allocate it
MAX_LORA_ALPHA = 65_536.0  # alpha / r scales every update; beyond this it overflows half precision (1e308: inf)


def doc(default: Any = dataclasses.MISSING, text: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its one-line doc: the one place it is written (`lorafit config` prints it)."""
    return field(default=default, default_factory=factory, metadata={"doc": text})


@dataclass
class ModelConfig:
    name: str = doc("gpt2", "hub id or local directory")
    revision: str | None = doc(None, "hub revision (branch, tag or commit) of the model")
    precision: str = doc("auto", "auto | fp32 | bf16 | fp16 (auto: bf16/fp16 frozen base on GPU, fp32 on CPU)")
    attn_implementation: str = doc("auto", "auto (transformers picks: sdpa where the model has it) | eager | sdpa | ...")
    dropout: float | None = doc(None, "the base's own dropout (GPT-2: 0.1); null keeps it, 0 turns it off")
    trust_remote_code: bool = doc(False, "run the model's own code from the Hub (only for models you trust)")
    quantize: str | None = doc(None, "nf4 | int8: the frozen base quantised by bitsandbytes (QLoRA; CUDA only)")
    adapter: str | None = doc(None, "a run or PEFT adapter directory to continue training (e.g. an SFT run before DPO); "
                                    "its LoRA settings replace lora.*; for a preference objective it is also the reference")


@dataclass
class SourceConfig:
    path: str = doc("", "hub dataset id or local file (relative to data.root if set)")
    text_field: str | list[str] = doc("text", "the field holding the text; several fields are joined with `join`")
    join: str = doc("\n", "what joins several text (or prompt/completion) fields")
    format: str = doc("auto", "auto | hub | jsonl | json | csv | txt | parquet")
    split: str = doc("train", "hub split")
    config: str | None = doc(None, "hub config name (e.g. \"3.0.0\" for cnn_dailymail)")
    revision: str | None = doc(None, "hub revision of the dataset")
    max_examples: int | None = doc(None, "cap, taken by seeded sampling")
    weight: float = doc(1.0, "sampling weight: examples kept = weight * available (after the cap); at most 1000")
    separator: str | None = doc(None, "txt: split the file on this string instead of lines")
    drop_unterminated: bool = doc(False, "txt + separator: drop a last piece with no separator after it")
    csv_header: bool = doc(True, "csv: false when the first row is data; fields are then indices")
    records_path: str | None = doc(None, "json: where the records are, e.g. \"data[].paragraphs[]\"")
    min_chars: int = doc(1, "drop texts shorter than this (after stripping whitespace)")
    dedupe: bool = doc(False, "drop exact duplicate texts")
    # What an example is (lorafit/data/examples.py) and which of its tokens are scored (data/templates.py):
    kind: str = doc("text", "text | prompt_completion | chat | preference (a prompt with a chosen and a rejected response)")
    prompt_field: str | list[str] | None = doc(None, "prompt_completion; null: \"prompt\" (template alpaca: [instruction, input])")
    completion_field: str | list[str] | None = doc(None, "null: \"completion\" (template alpaca: \"output\")")
    messages_field: str = doc("messages", "chat: a list of {role, content}")
    chosen_field: str | None = doc(None, "preference: the preferred response (text or messages); null: \"chosen\"")
    rejected_field: str | None = doc(None, "preference: the dispreferred response; null: \"rejected\"")
    pair_by_label: dict[str, str] | None = doc(None, "preference from labelled texts: {field, chosen, rejected, prompt} "
                                                     "(lorafit/data/label_pairs.py)")
    template: str | None = doc(None, "null: plain (\"{prompt}\\n\") or, for chat, the model's chat template; a name, file or format string")
    train_on: str = doc("completion", "completion: only completion (assistant) tokens and the EOS are scored; all: every token")

    @property
    def text_fields(self) -> list[str]:
        """`text_field` as a list of field names (a CSV column index as its digits)."""
        fields = self.text_field if isinstance(self.text_field, list | tuple) else [self.text_field]
        return [str(f) for f in fields]


@dataclass
class DataConfig:
    sources: dict[str, SourceConfig] = doc(factory=dict, text="named sources: {name: {path: ..., text_field: ...}}")
    root: str | None = doc(None, "base directory for relative local source paths")
    val_fraction: float = doc(0.1, "fraction held out for validation")
    split_seed: int = doc(42, "seed of the train/validation split")
    stratify: bool = doc(True, "hold out val_fraction of every source (not of the pooled rows)")
    seq_len: int = doc(64, "longest example in tokens, EOS included")
    long_examples: str = doc("truncate", "truncate | chunk | drop: what happens to longer examples")
    pack_len: int | None = doc(None, "packed row length (rows packing); null = seq_len")
    packing: str = doc("auto", "auto | segments | rows | padded: see lorafit/fastpath.py; auto = the fastest exact one")
    cache_dir: str | None = doc(None, "tokenised-data cache; null = ~/.cache/lorafit")


@dataclass
class LoraConfig:
    r: int = doc(8, "LoRA rank (at most 4096)")
    alpha: float = doc(16.0, "LoRA scaling numerator (the update is scaled by alpha / r); at most 65536")
    dropout: float = doc(0.05, "dropout on the LoRA input")
    targets: str | list[str] = doc(
        "auto", "auto: PEFT's default for the architecture (GPT-2: c_attn); all-linear: every linear layer but the head; or names")
    bias: str = doc("none", "none | all | lora_only: which biases train")
    use_rslora: bool = doc(False, "rank-stabilised scaling: alpha / sqrt(r)")
    use_dora: bool = doc(False, "weight-decomposed LoRA (DoRA)")


@dataclass
class TrainConfig:
    epochs: float = doc(1.0, "passes over the training data (may be raised on --resume); at most 1e6")
    max_steps: int | None = doc(None, "caps the run (optimizer steps; may be raised on --resume)")
    lr: float = doc(2e-4, "peak learning rate")
    batch_size: int = doc(4, "examples per micro-batch in the original recipe")
    grad_accum: int = doc(1, "batch_size * grad_accum = examples per optimizer step")
    micro_batch_tokens: int | None = doc(None, "memory knob; null = chosen for the device")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    warmup_steps: int = doc(0, "steps of linear warm-up")
    schedule: str = doc("linear", "linear | cosine | constant (after the warm-up)")
    adam_beta1: float = doc(0.9, "AdamW beta1")
    adam_beta2: float = doc(0.999, "AdamW beta2")
    adam_eps: float = doc(1e-8, "AdamW epsilon")
    max_grad_norm: float | None = doc(1.0, "clip the gradient norm to this; null: no clipping")
    seed: int = doc(42, "seed of LoRA's initialisation and the data order")
    log_every: int = doc(10, "optimizer steps between training log records (and lines without a terminal)")
    eval_every: int | None = doc(None, "optimizer steps; null = only before and after training")
    save_every: int | None = doc(None, "optimizer steps between checkpoints; null = end only")
    keep_checkpoints: int = doc(2, "how many of the newest checkpoints to keep")
    compile: bool = doc(False, "torch.compile the model (GPU)")
    skip_nonfinite: bool = doc(False, "skip a step with a non-finite loss or gradient instead of stopping")
    gradient_checkpointing: bool = doc(False, "recompute activations in the backward: less memory, ~30% more compute")
    fsdp: bool = doc(False, "data parallel with the frozen base sharded over the ranks (torch FSDP2 fully_shard)")
    report_to: list[str] = doc(factory=list, text="experiment trackers: tensorboard, wandb, mlflow, trackio (each an extra)")
    objective: str = doc("sft", "sft | dpo | ipo | orpo | simpo (the last four train on preference sources; see lorafit/objectives.py)")


@dataclass
class PreferenceConfig:
    """The preference objectives' settings, named (and defaulted) as TRL names them, so settings carry over."""

    beta: float = doc(0.1, "dpo/ipo: strength of the pull to the reference (IPO's tau); simpo: reward scale (TRL's default)")
    label_smoothing: float = doc(0.0, "dpo: the assumed share of flipped labels (conservative DPO), in [0, 0.5)")
    gamma: float = doc(0.5, "simpo: the target reward margin (TRL's simpo_gamma)")
    lambda_: float = doc(0.1, "orpo: weight of the odds-ratio term next to the chosen responses' NLL (TRL's ORPO beta)")


@dataclass
class EvalConfig:
    before_training: bool = doc(True, "a quick eval at step 0, so the user sees the change")
    max_examples: int | None = doc(None, "evaluate on at most this many validation examples (each source its share)")
    batch_tokens: int | None = doc(None, "null = chosen for the device")
    sample_prompt: str | None = doc(None, "generated at each eval when set")
    sample_max_new_tokens: int = doc(40, "tokens generated for the sample")


@dataclass
class RunConfig:
    model: ModelConfig = doc(factory=ModelConfig, text="the base model")
    data: DataConfig = doc(factory=DataConfig, text="the training and validation data")
    lora: LoraConfig = doc(factory=LoraConfig, text="the adapter")
    train: TrainConfig = doc(factory=TrainConfig, text="the optimisation")
    eval: EvalConfig = doc(factory=EvalConfig, text="evaluation during training")
    preference: PreferenceConfig = doc(factory=PreferenceConfig, text="dpo | ipo | orpo | simpo settings (train.objective)")
    output_dir: str = doc("runs/run", "the run directory")
    recipe: str | None = doc(None, "name of the recipe this came from, for the model card")

    def to_dict(self) -> dict[str, Any]:
        return _keys_out(dataclasses.asdict(self))


def key_of(name: str) -> str:
    """The config key of a dataclass field: a Python keyword (ORPO's `lambda`) is a field with a trailing `_`."""
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def _field_of(key: str) -> str:
    return key + "_" if keyword.iskeyword(key) else key


def _keys_out(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {key_of(k) if isinstance(k, str) else k: _keys_out(v) for k, v in tree.items()}
    return tree


# The settings of a source that only some kinds read (the rest apply to every source).
KIND_FIELDS = {
    "text": ("text_field",),
    "prompt_completion": ("prompt_field", "completion_field", "template", "train_on"),
    "chat": ("messages_field", "template", "train_on"),
    # a preference source reads text_field only to build pairs from labelled texts (pair_by_label)
    "preference": ("prompt_field", "chosen_field", "rejected_field", "template", "pair_by_label", "text_field"),
}


def applies(src: SourceConfig, name: str) -> bool:
    """Whether setting `name` means anything for a source of `src.kind` (`lorafit config` shows only those)."""
    specific = {n for names in KIND_FIELDS.values() for n in names}
    return name not in specific or name in KIND_FIELDS.get(src.kind, specific)


CHOICES = {
    "model.precision": ("auto", "fp32", "bf16", "fp16"),
    "data.long_examples": ("truncate", "chunk", "drop"),
    "data.packing": ("auto", "segments", "rows", "padded"),
    "lora.bias": ("none", "all", "lora_only"),
    "train.schedule": ("linear", "cosine", "constant"),
    "source.format": ("auto", "hub", "jsonl", "json", "csv", "txt", "parquet"),
    "source.kind": ("text", "prompt_completion", "chat", "preference"),
    "train.objective": ("sft", "dpo", "ipo", "orpo", "simpo"),
    "source.train_on": ("completion", "all"),
}


# ---------------------------------------------------------------- building from dicts
# Why by hand, not a library (issue 22). pydantic (installed only as another package's dependency) could check the
# types, but: its messages ("Input should be a valid integer, unable to parse string as an integer", under a loc
# tuple) would each need translating into lorafit's one line per key ("train.batch_size: expected an integer, got
# 'four'"), and it reports each branch of a union (`str | list[str]`) as an error of its own; extra="forbid" says
# "Extra inputs are not permitted", without the nearest name or the PEFT / HF Trainer aliases; and what lorafit
# accepts (a scalar for a list of names, `targets: c_attn`; a number for a string, a hub config `3`; integers up to
# 2^63 - 1; values cut to 80 characters in messages) would be a validator each. OmegaConf (not installed) would merge
# `a.b=c` overrides, but interpolates "${...}" inside values and types them its own way; apply_overrides is 25 lines.

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


def _short(value: Any, limit: int = 80) -> str:
    """repr of a value for a message, cut to `limit` characters: a value can be huge (or an alias bomb)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        return f"an integer of {len(str(abs(value))) if abs(value) < 10**4000 else 'thousands of'} digits"
    if isinstance(value, list | dict) and len(value) > 20:
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " ...'"


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check `value` against annotation `tp`; return it converted, or record a problem."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        trials = []
        for opt in options:  # first option that accepts the value without a problem
            if opt is type(None):
                continue
            trial: list[str] = []
            out = _coerce(value, opt, where, trial)
            if not trial:
                return out
            trials.append(trial)
        if len(trials) == 1 and "expected" not in trials[0][0]:  # the value's type fits, its value does not
            problems.extend(trials[0])
            return None
        names = " or ".join(_type_name(o) for o in options)
        problems.append(f"{where}: expected {names}, got {_short(value)}")
        return None
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, problems)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str | int | float) and not isinstance(value, bool) and item_tp is str:
            value = [str(value)] if not isinstance(value, str) else [value]
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {_short(value)}")
            return None
        return [_coerce(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {_short(value)}")
            return None
        return {str(k): _coerce(v, val_tp, f"{where}.{k}", problems) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) <= MAX_INT:
                return value
            problems.append(f"{where}: {_short(value)} is too large (at most {MAX_INT})")
            return None
    elif tp is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 else math.inf
        elif isinstance(value, str):  # yaml reads "2e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if math.isfinite(number):
                return number
            problems.append(f"{where}: must be a finite number, got {_short(value)}")
            return None
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # e.g. a hub config name like 3.0.0 is fine; 3 -> "3"
    else:
        return value
    hint = " (YAML reads a bare ~ as null: quote the value)" if value is None else ""
    problems.append(f"{where}: expected {_type_name(tp)}, got {_short(value)}{hint}")
    return None


def _build(cls: type, raw: Any, where: str, problems: list[str]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{where or 'config'}: expected a mapping, got {_short(raw)}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [key_of(f.name) for f in dataclasses.fields(cls)]
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
        kwargs[_field_of(key)] = _coerce(value, hints[_field_of(key)], path, problems)
    kwargs = {k: v for k, v in kwargs.items() if v is not None or _allows_none(hints[k])}
    return cls(**kwargs)


def _allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


# ---------------------------------------------------------------- validation of values


def _check_values(cfg: RunConfig, problems: list[str], output_dir: bool = False) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    def choice(key: str, value: str) -> None:
        options = CHOICES[key]
        need(value in options, f"{key}: {value!r} is not one of {', '.join(options)}")

    paths = {"model.name": cfg.model.name, "output_dir": cfg.output_dir, "data.root": cfg.data.root,
             "data.cache_dir": cfg.data.cache_dir,
             **{f"data.sources.{n}.path": s.path for n, s in cfg.data.sources.items() if s is not None}}
    for key, value in paths.items():
        need(not value or (len(value) <= PATH_MAX and all(len(part) <= NAME_MAX for part in value.split("/"))),
             f"{key}: {_short(value)} ({len(value or ''):,} characters) is too long to be a path or a Hub id (a path "
             f"has at most {PATH_MAX:,} characters, each name in it at most {NAME_MAX}). Shorten it.")
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
        need(0 < src.weight <= MAX_SOURCE_WEIGHT,
             f"data.sources.{name}.weight: must be positive and at most {MAX_SOURCE_WEIGHT:,} (each unit of weight "
             f"is another copy of the source in memory), got {src.weight:g}")
        need(len(src.text_fields) > 0 and all(src.text_fields), f"data.sources.{name}.text_field: required")
        problems += source_problems(name, src, d.root) + label_pair_problems(name, src)
    need(0.0 < d.val_fraction < 1.0, f"data.val_fraction: must be in (0, 1), got {d.val_fraction}")
    need(d.seq_len >= 2, f"data.seq_len: must be at least 2, got {d.seq_len}")
    need(0 <= d.split_seed <= MAX_SEED, f"data.split_seed: must be in [0, {MAX_SEED}], got {d.split_seed}")
    need(
        d.pack_len is None or d.pack_len >= d.seq_len,
        f"data.pack_len: must be at least data.seq_len ({d.seq_len}), got {d.pack_len}",
    )

    lo = cfg.lora
    need(lo.r > 0, f"lora.r: must be a positive integer, got {lo.r}")
    need(lo.r <= MAX_LORA_R, f"lora.r: must be at most {MAX_LORA_R:,} (a rank beyond a layer's width adds nothing "
                             f"and each unit costs memory in every adapted layer), got {_short(lo.r)}")
    need(lo.alpha > 0, f"lora.alpha: must be positive, got {lo.alpha}")
    need(lo.alpha <= MAX_LORA_ALPHA, f"lora.alpha: must be at most {MAX_LORA_ALPHA:g} (alpha / r scales every update; "
                                     f"larger values overflow), got {lo.alpha:g}")
    need(0.0 <= lo.dropout < 1.0, f"lora.dropout: must be in [0, 1), got {lo.dropout}")
    need(
        (isinstance(lo.targets, str) and lo.targets != "") or (isinstance(lo.targets, list) and len(lo.targets) > 0 and all(lo.targets)),
        "lora.targets: auto, all-linear, or at least one module name (e.g. [c_attn])",
    )

    t = cfg.train
    need(t.epochs > 0, f"train.epochs: must be positive, got {t.epochs}")
    need(t.epochs <= MAX_EPOCHS, f"train.epochs: must be at most {MAX_EPOCHS:,} (use train.max_steps to cap a long "
                                 f"run), got {t.epochs:g}")
    need(0.0 <= t.adam_beta1 < 1.0, f"train.adam_beta1: must be in [0, 1), got {t.adam_beta1}")
    need(0.0 <= t.adam_beta2 < 1.0, f"train.adam_beta2: must be in [0, 1), got {t.adam_beta2}")
    need(t.adam_eps > 0, f"train.adam_eps: must be positive, got {t.adam_eps}")
    need(0 <= t.seed <= MAX_SEED, f"train.seed: must be in [0, {MAX_SEED}], got {t.seed}")
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
    trackers = ("tensorboard", "wandb", "mlflow", "trackio")  # lorafit/trackers.py
    for name in t.report_to:
        need(name in trackers, f"train.report_to: {name!r} is not one of {', '.join(trackers)}")
    need(
        t.max_grad_norm is None or t.max_grad_norm > 0,
        f"train.max_grad_norm: must be positive (or null to disable), got {t.max_grad_norm}",
    )

    choice("train.objective", t.objective)
    pr = cfg.preference
    if t.objective != "sft":
        plain = [n for n, src in d.sources.items() if src is not None and src.kind != "preference"]
        need(not plain, f"train.objective={t.objective} trains on pairs: data.sources.{plain[0] if plain else ''}.kind must be "
                        "preference (prompt, chosen, rejected)")
        need(d.long_examples != "chunk", f"data.long_examples: chunk would split a response over windows; train.objective="
                                         f"{t.objective} takes truncate or drop")
    need(pr.beta > 0, f"preference.beta: must be positive, got {pr.beta}")
    need(0.0 <= pr.label_smoothing < 0.5, f"preference.label_smoothing: must be in [0, 0.5), got {pr.label_smoothing}")
    need(pr.lambda_ >= 0, f"preference.lambda: must be >= 0, got {pr.lambda_}")

    e = cfg.eval
    need(
        e.max_examples is None or e.max_examples > 0,
        f"eval.max_examples: must be positive (or null to evaluate on every validation example), got {e.max_examples}",
    )
    need(e.batch_tokens is None or e.batch_tokens > 0, f"eval.batch_tokens: must be positive, got {e.batch_tokens}")
    need(e.sample_max_new_tokens > 0, f"eval.sample_max_new_tokens: must be positive, got {e.sample_max_new_tokens}")

    if output_dir:  # for a run to train (`lorafit eval` reads a saved config whose output_dir may be anything now)
        why = forbidden_output_dir(cfg.output_dir)
        need(why is None, f"output_dir: {_short(cfg.output_dir)} can never hold a run: {why}. Give a directory of its "
                          "own, e.g. output_dir=runs/NAME")


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
        try:
            text, recipe_name = path.read_text(encoding="utf-8"), path.stem
        except UnicodeDecodeError as exc:
            raise LorafitError(
                f"Recipe file {path} is not UTF-8 text (byte offset {exc.start}: {exc.reason}). Save it as UTF-8."
            ) from None
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
    raw = load_yaml(text, f"Recipe {name_or_path}") or {}
    if not isinstance(raw, dict):
        raise LorafitError(f"Recipe {name_or_path} must be a YAML mapping at the top level.")
    if path.is_file() and not is_run_config(path):
        rebase_paths(raw, path.parent)
    return raw, recipe_name


def is_run_config(path: Path) -> bool:
    """A run's own config.yaml: its paths are as the run used them (relative to where it was started)."""
    return path.name == CONFIG_FILE and (path.parent / MARKER_FILE).is_file()


def _local_looking(value: str, folder: Path) -> bool:
    """Would lorafit read `value` as a local path (not a Hub id)? The same test data.sources.is_local makes."""
    return (folder / value).exists() or value.lower().endswith(LOCAL_SUFFIXES) or value.startswith(".")


def rebase_paths(raw: dict, folder: Path) -> None:
    """Relative paths written in a recipe file mean the file's folder, not the current directory: data.root,
    source paths when there is no root (with one they are relative to it), and model.name when it names a
    directory there. They become absolute. output_dir and data.cache_dir stay relative to the current directory."""
    def rebase(section: dict, key: str, looks_local) -> None:
        value = section.get(key)
        if isinstance(value, str) and value and not value.startswith("~") and not Path(value).is_absolute() \
                and looks_local(value):
            section[key] = os.path.normpath(folder.absolute() / value)

    data, model = raw.get("data"), raw.get("model")
    if isinstance(data, dict):
        rebase(data, "root", lambda v: True)
        if data.get("root") is None and isinstance(data.get("sources"), dict):
            for src in data["sources"].values():
                if isinstance(src, dict) and src.get("format", "auto") != "hub":
                    explicit = src.get("format", "auto") != "auto"
                    rebase(src, "path", lambda v: explicit or _local_looking(v, folder))
    if isinstance(model, dict):
        rebase(model, "name", lambda v: (folder / v).is_dir() or v.startswith("."))


def load_yaml(text: str, what: str) -> Any:
    """yaml.safe_load, refusing what would take minutes or gigabytes: aliases that expand the document beyond
    YAML_MAX_NODES nodes (the "billion laughs"), nesting too deep for the parser, numbers too long to read."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # its reader refuses control characters and lone surrogates at once
        node = loader.get_single_node()
        if node is not None and _expanded_nodes(node, {}, set()) > YAML_MAX_NODES:
            raise LorafitError(
                f"{what} holds more than {YAML_MAX_NODES:,} values (counting each alias, *name, as what it stands "
                "for); a run configuration is far smaller. Remove the bulk, or use fewer aliases."
            )
        return loader.construct_document(node) if node is not None else None
    except yaml.reader.ReaderError as exc:
        raise LorafitError(f"{what}: {_unreadable_character(text, exc)}") from None
    except yaml.YAMLError as exc:
        raise LorafitError(f"{what} is not valid YAML: {_first_chars(exc)}") from None
    except RecursionError:
        raise LorafitError(f"{what}: nested too deeply to read; a run configuration is a few levels deep.") from None
    except ValueError as exc:  # e.g. an integer of thousands of digits
        why = "a number in it has thousands of digits" if "digits" in str(exc) else _first_chars(exc)
        raise LorafitError(f"{what}: a value cannot be read ({why}).") from None
    finally:
        if loader is not None:
            loader.dispose()


def _unreadable_character(text: str, exc: yaml.reader.ReaderError) -> str:
    """YAML's refusal of a character (a control character, or a byte that was not UTF-8), with its line and column."""
    position = exc.position if isinstance(exc.position, int) else 0
    line = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1) + 1
    bad = not_utf8(text[position:position + 1]) if isinstance(exc.character, int) else None
    what = f"byte 0x{exc.character - 0xDC00:02x}, which is not valid UTF-8" if bad and exc.character >= 0xDC80 else \
        f"the control character U+{exc.character:04X}" if isinstance(exc.character, int) else "a character"
    return (f"{what} at line {line}, column {column}, which YAML does not allow. Remove it (in a double-quoted "
            "YAML string a control character can be written as an escape, e.g. \"\\t\").")


def _first_chars(exc: BaseException, limit: int = 300) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + " ..."


def _expanded_nodes(node, memo: dict, active: set) -> int:
    """How many nodes the document has once every alias is expanded (capped just above the limit)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:  # a recursive alias expands without end
        return YAML_MAX_NODES + 1
    active.add(key)
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    total = 1
    for child in children:
        total = min(total + _expanded_nodes(child, memo, active), YAML_MAX_NODES + 1)
    active.discard(key)
    memo[key] = total
    return total


def apply_overrides(raw: dict[str, Any], overrides: list[str], problems: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a raw dict; values are parsed as YAML (so lists work)."""
    for item in overrides:
        if "=" not in item:
            problems.append(f"override '{item}': expected key=value, e.g. train.lr=1e-4")
            continue
        key, text = item.split("=", 1)
        if why := not_utf8(item):  # bytes the terminal sent that are not UTF-8: never a value anyone meant
            problems.append(f"override {_short(item)}: {why}. Type it again in UTF-8.")
            continue
        try:
            value = load_yaml(text, f"override {_short(item)}") if text != "" else ""
        except LorafitError as exc:
            if "not valid YAML" not in str(exc):
                problems.append(str(exc))
                continue
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


def build_config(raw: dict[str, Any], check_output_dir: bool = False) -> RunConfig:
    problems: list[str] = []
    cfg = _build(RunConfig, raw, "", problems)
    if cfg.output_dir.strip():
        cfg.output_dir = str(Path(cfg.output_dir).expanduser())
    if cfg.data.cache_dir:
        cfg.data.cache_dir = str(Path(cfg.data.cache_dir).expanduser())
    _check_values(cfg, problems, check_output_dir)  # fields with a bad type fell back to defaults, which pass
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
            build_config(raw, check_output_dir=True)
        except ConfigError as exc:
            problems += exc.problems
        raise ConfigError(problems)
    return build_config(raw, check_output_dir=True)


def annotated_yaml(cfg: RunConfig) -> str:
    """The config as YAML, each key followed by its one-line doc as a comment (`lorafit config`); it loads back
    to `cfg.to_dict()`, except that a source shows only the settings its kind reads (one set but not read is a
    comment line)."""
    lines: list[str] = []

    def scalar(value: Any) -> str:
        plain = str(value) if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).split("\n")[0]
        if re.fullmatch(r"[A-Za-z0-9_./~+-][A-Za-z0-9_./~+ -]*", plain) and yaml.safe_load(plain) == value:
            return plain.strip() if plain.strip() == plain else json.dumps(value)
        return json.dumps(value)  # JSON is YAML: quotes and escapes that load back to the same value

    def walk(obj: Any, depth: int) -> None:
        pad = "  " * depth
        for f in dataclasses.fields(obj):
            value, note = getattr(obj, f.name), f"  # {f.metadata['doc']}" if f.metadata.get("doc") else ""
            name = key_of(f.name)
            if isinstance(obj, SourceConfig) and not applies(obj, f.name):  # a setting other kinds of source read
                if value != f.default:  # set (a recipe's text_field, say) but not read: said so, as a comment
                    lines.append(f"{pad}# {name}: {scalar(value)}  # not read by a {obj.kind} source")
                continue
            if dataclasses.is_dataclass(value):
                lines.append(f"{pad}{name}:{note}")
                walk(value, depth + 1)
            elif isinstance(value, dict) and value and all(dataclasses.is_dataclass(v) for v in value.values()):
                lines.append(f"{pad}{name}:{note}")
                for name, item in value.items():
                    lines.append(f"{pad}  {scalar(name)}:")
                    walk(item, depth + 2)
            else:
                lines.append(f"{pad}{name}: {scalar(value)}{note}")

    walk(cfg, 0)
    return "\n".join(lines) + "\n"


class _ReadableDumper(yaml.SafeDumper):
    """safe_dump, but a string holding a line break or a control character is written double-quoted with escapes
    (`join: "\\n"`), not as the folded block PyYAML picks, which reads as a blank line."""


def _represent_str(dumper: yaml.SafeDumper, value: str):
    if any(c in value for c in "\n\r\t") or not value.isprintable():
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"')
    return dumper.represent_str(value)


_ReadableDumper.add_representer(str, _represent_str)


def save_config(cfg: RunConfig, path: Path) -> None:
    atomic_write_text(path, yaml.dump(cfg.to_dict(), Dumper=_ReadableDumper, sort_keys=False, allow_unicode=True))


def run_config(run: Path, recipe: str | None, overrides: list[str]):
    """The run's recorded config (or a recipe's, or the defaults for a bare adapter), with overrides."""
    path = run / CONFIG_FILE
    if path.is_file():
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    elif recipe:
        raw, name = read_recipe(recipe)
        raw.setdefault("recipe", name)
    else:
        raw = {}  # a plain adapter directory: lorafit's defaults (seq_len 64, truncate), overridable
        print(f"note: '{run}' has no {CONFIG_FILE}; using lorafit's defaults (data.seq_len=64, "
              "data.long_examples=truncate). Override them, or pass --recipe.", file=sys.stderr)
    problems: list[str] = []
    raw = apply_overrides(raw, overrides, problems)
    cfg = build_config(raw)
    if problems:
        raise ConfigError(problems)
    return cfg

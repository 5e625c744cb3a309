"""Checks that decide whether a run may start or continue: values used only late in a run, settings that
may change on --resume, and a fingerprint of the data a checkpoint was trained on.

All of them run before the run directory is touched (or, for a resume, before training goes on), so a
mistake costs seconds, not a training run.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import yaml

from lorafit.checkpoint import newest_checkpoint, read_state
from lorafit.config import RunConfig, build_config, load_yaml
from lorafit.errors import ConfigError, LorafitError
from lorafit.generate import check_generation
from lorafit.rundir import CONFIG_FILE

# Settings that change what is logged, evaluated, sampled or kept, never the weights: a resume may change them
# (recorded in the run's marker, config.yaml updated). A trailing dot means the whole section.
RESUME_MAY_CHANGE = (
    "recipe", "output_dir", "data.cache_dir", "eval.",
    "train.log_every", "train.eval_every", "train.save_every", "train.keep_checkpoints", "train.report_to",
)
# Settings a resume may raise, to train a finished or unfinished run for longer. The LR schedule is then the one
# of the longer run (as if it had been planned so from the start): the steps already taken keep the rates they had.
RESUME_MAY_RAISE = ("train.max_steps", "train.epochs")


def may_change_on_resume(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_MAY_CHANGE)


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


CONFIG_KEY = "config"  # in a checkpoint's state.json: the resolved config it was trained with


def resolved_config(cfg: RunConfig) -> dict:
    """The config as config.yaml holds it (the same YAML round trip), for a checkpoint to record."""
    return yaml.safe_load(yaml.safe_dump(cfg.to_dict()))


def config_changes(saved_path: Path, cfg: RunConfig) -> tuple[dict, list[str]]:
    """(settings that differ and may: {key: [old, new]}, descriptions of those that differ and may not)."""
    try:
        saved = load_yaml(Path(saved_path).read_text(encoding="utf-8"), str(saved_path)) or {}
    except (OSError, UnicodeDecodeError, LorafitError) as exc:
        raise LorafitError(f"Cannot read {saved_path} to resume ({exc}); start again with --overwrite.") from None
    if not isinstance(saved, dict):
        raise LorafitError(f"{saved_path} is not a run configuration (a YAML mapping); start again with --overwrite.")
    return compare_configs(saved, cfg)


def compare_configs(saved: dict, cfg: RunConfig) -> tuple[dict, list[str]]:
    """config_changes for a saved config already read (config.yaml's, or the one a checkpoint recorded)."""
    saved = flatten(with_defaults(saved))
    now = flatten(resolved_config(cfg))
    allowed, refused = {}, []
    for k in sorted(saved.keys() | now.keys()):
        if saved.get(k) == now.get(k):
            continue
        if may_change_on_resume(k) or (k in RESUME_MAY_RAISE and raised(saved.get(k), now.get(k))):
            allowed[k] = [saved.get(k), now.get(k)]
        else:
            hint = " (a resume may only raise it)" if k in RESUME_MAY_RAISE else ""
            refused.append(f"{k}: {_short(saved.get(k))} in the run, {_short(now.get(k))} now{hint}")
    return allowed, refused


def check_same_config(run, cfg: RunConfig) -> dict:
    """A resume must use the config the run (a RunDir) started with, or it would silently train something else.
    Settings that do not change the training (RESUME_MAY_CHANGE) may differ: returns them, {key: [old, new]}."""
    allowed, changed = config_changes(run.file(CONFIG_FILE), cfg)
    # config.yaml can be edited by hand (and `--resume RUN_DIR` reads it): the newest checkpoint's own record of
    # the config it was trained with is what the weights depend on.
    newest = newest_checkpoint(run.checkpoints)
    try:
        recorded = read_state(newest).get(CONFIG_KEY) if newest else None
    except (OSError, ValueError, RecursionError):
        recorded = None  # an unreadable checkpoint is reported, with what to do, when it is loaded
    if isinstance(recorded, dict):
        changed += [c for c in compare_configs(recorded, cfg)[1] if c not in changed]
    if changed:
        raise LorafitError(
            f"--resume: the config differs from the one the run in '{run.path}' started with:\n"
            + "\n".join(f"  - {c}" for c in changed)
            + "\nResume with the same recipe and overrides, or start a new run (--overwrite or another output_dir)."
        )
    return allowed


def raised(old, new) -> bool:
    """A longer run: a larger number, or no cap (null) where there was one."""
    return isinstance(old, int | float) and (new is None or (isinstance(new, int | float) and new > old))


def extends_run(changed: dict) -> bool:
    """Did a resume raise the run's length (so a finished run trains on)?"""
    return any(k in changed for k in RESUME_MAY_RAISE)


def with_defaults(raw: dict) -> dict:
    """A saved config with the keys a newer lorafit added filled in with their defaults (which are what the
    run used), so a resume compares settings, not versions. A config that no longer builds is compared as saved."""
    try:
        return yaml.safe_load(yaml.safe_dump(build_config(raw).to_dict()))
    except ConfigError:
        return raw


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:75] + " ...'"


# ---------------------------------------------------------------- the data a checkpoint was trained on


def split_fingerprint(split) -> str:
    """sha256 of a tokenised split's arrays: any change of text, tokenizer, order or length policy shows."""
    h = hashlib.sha256()
    for array in (split.ids, split.offsets, split.sources):
        h.update(str(array.dtype).encode())
        h.update(np.ascontiguousarray(array))
    return h.hexdigest()[:32]


def data_fingerprint(data, cfg: RunConfig) -> dict:
    # eval.max_examples may change on resume and cuts the validation set: the val fingerprint holds for that cut.
    return {"train": split_fingerprint(data.train), "val": split_fingerprint(data.val),
            "eval_max_examples": cfg.eval.max_examples}


def same_data(checkpoint: Path, state: dict, n_train: int, total_steps: int, now: dict) -> None:
    """Refuse to resume on data other than the checkpoint's (`state`: its state.json): other training examples,
    fewer steps (a longer run, with train.max_steps / epochs raised, has more, never fewer), or other tokens
    (a checkpoint of an older lorafit has no fingerprint)."""
    then = (state["train_examples"], state["total_steps"])
    if then[0] != n_train or total_steps < then[1]:
        raise LorafitError(
            f"Checkpoint {checkpoint} was made with {then[0]:,} training examples and {then[1]:,} steps; the data now "
            f"gives {n_train:,} and {total_steps:,}. Did the data files change? Resume needs the same data, or start "
            "again with --overwrite."
        )
    saved = state.get("data_fingerprint")
    if saved is None:
        return
    which = None
    if saved["train"] != now["train"]:
        which = "training"
    elif saved.get("eval_max_examples") == now["eval_max_examples"] and saved["val"] != now["val"]:
        which = "validation"
    if which:
        raise LorafitError(
            f"Checkpoint {checkpoint} was trained on other data: the tokenised {which} examples differ from those "
            "the data gives now (same number of examples, different text or tokenizer). Did the data files change? "
            "Resume needs the same data; restore it, or start again with --overwrite."
        )


# ---------------------------------------------------------------- values used only late in a run


def check_before_training(trainer) -> None:
    """The eval sample is generated after every eval: a prompt plus new tokens beyond the model's context
    would fail only then, after the training."""
    e = trainer.cfg.eval
    if e.sample_prompt:
        check_generation(trainer.model, trainer.tokenizer, e.sample_prompt, e.sample_max_new_tokens,
                         tokens_name="eval.sample_max_new_tokens", prompt_name="eval.sample_prompt")

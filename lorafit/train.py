"""Training: set-up, the loop, and what a finished run leaves behind.

`train(cfg)` prepares everything (model, data, optimizer, run directory) and calls `fit`, a flat
loop over optimizer steps. One optimizer step takes `batch_size * grad_accum` examples, packed
into micro-batches by a token budget; the loss of the step is the summed NLL of all its target
tokens divided by their count, so how the step is cut into micro-batches never changes it.
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import get_scheduler

from lorafit import checkpoint as ckpt
from lorafit import distributed as dist
from lorafit import trackers
from lorafit.atomic import atomic_dir, atomic_path
from lorafit.config import RunConfig, save_config
from lorafit.console import log, progress_bar
from lorafit.data.packing import default_micro_tokens, micro_batches, shape_multiple
from lorafit.data.prepare import Data, masked_sources, prepare_data, share_data
from lorafit.data.sources import offline_hint
from lorafit.data.templates import describe_source
from lorafit.data.tokenize import policy_summary
from lorafit.errors import LorafitError, Stopped
from lorafit.evaluate import Scoring, evaluate_run, scoring_for
from lorafit.fast import prepare_for_speed
from lorafit.fastpath import fast_paths_for
from lorafit.fingerprint import FINGERPRINT_KEY
from lorafit.forward import FastPaths, Forward
from lorafit.generate import SamplingConfig, resolve_adapter_dir, sample
from lorafit.localpaths import looks_like_a_path
from lorafit.lora import (
    apply_lora, check_same_base, format_counts, load_adapter, loaded_fingerprint, resolve_targets, unwrapped,
    write_base_signature,
)
from lorafit.measure import device_name, peak_memory_bytes, sync
from lorafit.modeling import (
    Precision, default_device, load_base_model, load_settings, load_tokenizer, max_positions, out_of_memory, resolve_precision,
)
from lorafit.preflight import check_local_paths
from lorafit.preference import PreferenceObjective, evaluate_pairs, pair_costs, pair_sequences, settings
from lorafit.reference import Reference, attach as attach_reference, write as write_reference
from lorafit.progress import Progress, StepPlan, Window, progress_line
from lorafit.rundir import (
    ADAPTER_DIR, CONFIG_FILE, LOSS_PLOT, REFERENCE_FILE, SOURCE_PLOT, SUMMARY_FILE, RunDir, saving,
)
from lorafit.report import model_card, plot_by_source, plot_losses
from lorafit.runcheck import (
    CONFIG_KEY, check_before_training, check_same_config, data_fingerprint, extends_run, resolved_config, same_data,
)


# ---------------------------------------------------------------- the loop


@dataclass
class Trainer:
    cfg: RunConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    data: Data
    plan: StepPlan
    run: RunDir
    device: torch.device
    precision: Precision
    tokenizer: object
    forward: Forward  # the one forward of this model: its checked fast paths, autocast, the head loss
    lora_targets: list[str]
    micro_tokens: int
    scoring: Scoring  # how validation is scored (the same forward, eval.batch_tokens)
    scaler: torch.amp.GradScaler | None = None
    ddp: torch.nn.Module | None = None  # data parallel: the forward's NLL under DistributedDataParallel
    progress: Progress = field(default_factory=Progress)
    stop_signal: int | None = None  # set by SIGINT/SIGTERM: stop after this step
    fingerprint: dict | None = None  # of the tokenised data, computed once for the checkpoints
    objective: PreferenceObjective | None = None  # a preference objective (train.objective); None: SFT
    reference: Reference | None = None  # DPO, IPO: the reference's keys, and which splits' values were computed here
    force_base: bool = False  # --force-base: resume a checkpoint made on a base with other weights

    @property
    def fast(self) -> FastPaths:
        return self.forward.fast

    # -- one optimizer step
    def step_examples(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(all examples of step `step`, the scored targets of each): a function of the step alone, the same on
        every rank. (A preference step takes pairs: these are their sequences.)"""
        examples = self.plan.examples(step)
        if self.objective is not None:
            examples = pair_sequences(examples)
        return examples, self.data.train.targets_per_example()[examples]

    def unit_costs(self, units: np.ndarray) -> np.ndarray:
        """Positions each unit of a step (an example, or a pair) costs to compute: what ranks are balanced by."""
        if self.objective is not None:
            return pair_costs(self.data.train, units)
        return self.data.train.lengths()[units] - 1

    def step_batches(self, step: int) -> list:
        """This rank's packed micro-batches of optimizer step `step`: its share of the step, balanced by the
        positions each example (or pair) costs to compute."""
        units = self.plan.examples(step)
        return self._micro_batches(dist.my_share(units, self.unit_costs(units)))

    def _micro_batches(self, indices: np.ndarray) -> list:
        return micro_batches(self.data.train, indices, self.fast.layout, self.micro_tokens, self.tokenizer.pad_token_id,
                             shape_multiple(self.device), pairs=self.objective is not None)

    def train_step(self) -> torch.Tensor:
        """One optimizer step: forward and backward over this rank's micro-batches, each loss divided by the whole
        step's scored targets (so the split into micro-batches never changes the step), then clip and update. A
        preference step: each micro-batch's loss is its pairs' part of the step's objective (lorafit/preference.py)."""
        units = self.plan.examples(self.progress.step)  # examples, or pairs
        examples, targets = self.step_examples(self.progress.step)
        n_targets = int(targets.sum())  # the whole step's, over every rank: the loss is normalised by it
        if self.objective is not None:  # a preference loss is normalised by the step's pairs
            self.objective.begin_step(units, self.device)
        batches = self.step_batches(self.progress.step)
        work = batches + self.idle_batches(units, len(batches))
        scale = dist.world().size / n_targets  # DDP averages the ranks' gradients; the step's gradient is their sum
        step_nll = torch.zeros((), device=self.device, dtype=torch.float64)
        for i, batch in enumerate(work):
            with self.gradient_sync(last=i == len(work) - 1):
                batch = batch.to(self.device)
                nll = self.ddp(batch) if self.ddp else self.forward.token_nll(batch)[0]  # per-token NLL, this step's
                if self.objective is None:
                    nll_sum = nll.sum() if i < len(batches) else nll.sum() * 0.0  # an idle batch: weight 0
                    loss = nll_sum * scale
                else:  # already normalised by the whole step's pairs
                    nll_sum = self.objective.micro_loss(nll, batch, counted=i < len(batches))
                    loss = nll_sum * dist.world().size
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            step_nll += nll_sum.detach().double()
        dist.all_reduce_sum(step_nll)  # every rank judges (and logs) the same step loss
        self.count_rank_tokens(units, targets)
        grad_norm = self.clip_gradients()
        if self.apply_update(step_nll, grad_norm, 1 if self.objective else n_targets):
            if self.objective is not None:
                self.objective.end_step(step_nll)
            self.progress.window.nll = self.progress.window.nll + step_nll
            self.progress.window.tokens += n_targets
            self.progress.window.examples += len(examples)
            self.progress.train_tokens += n_targets
            processed = int((self.data.train.lengths()[examples] - 1).sum())  # scored or not, every position computed
            self.progress.window.processed += processed
            self.progress.train_processed_tokens += processed
        self.scheduler.step()  # a skipped step still counts: lr and data stay aligned with the step number
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.window.steps += 1
        return grad_norm

    def idle_batches(self, examples: np.ndarray, n_mine: int) -> list:
        """Batches this rank runs with a loss of weight 0: a rank with no example of its own still joins the
        gradient all-reduce; with a sharded model every forward is a collective, so each rank runs as many
        micro-batches as the busiest."""
        n_work = dist.common_count(n_mine) if dist.sharded() else max(1, n_mine)
        return self._micro_batches(examples[:1]) * (n_work - n_mine) if n_work > n_mine else []

    def gradient_sync(self, last: bool):
        """DDP all-reduces the gradients in the step's last backward only."""
        return self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()

    def count_rank_tokens(self, units: np.ndarray, targets: np.ndarray) -> None:
        """Data parallel: the scored targets in each rank's share of the step (the shares balance positions;
        a preference step's units are pairs, whose two sequences' targets are consecutive in `targets`)."""
        world = dist.world()
        if world.parallel:
            shares = dist.shares(self.unit_costs(units), world.size)
            per_unit = targets.reshape(len(units), -1).sum(1)
            step_ranks = [int(per_unit[s].sum()) for s in shares]
            self.progress.window.rank_tokens = [a + b for a, b in zip(self.progress.window.rank_tokens or [0] * world.size, step_ranks)]

    def clip_gradients(self) -> torch.Tensor:
        """The gradient norm (unscaled first under fp16), clipped to train.max_grad_norm."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.train.max_grad_norm or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # sharded gradients: the norm over all shards
            grad_norm = grad_norm.full_tensor()
        return grad_norm

    def apply_update(self, step_nll: torch.Tensor, grad_norm: torch.Tensor, n_targets: int) -> bool:
        """Step the optimizer; False when a non-finite loss or gradient made this step a skipped one."""
        loss_ok = bool(torch.isfinite(step_nll))  # one sync a step; cheap next to a step
        if loss_ok and self.scaler:  # fp16: the scaler skips overflowed steps itself and lowers its scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return True
        if loss_ok and bool(torch.isfinite(grad_norm)):
            self.optimizer.step()
            return True
        self.handle_nonfinite(float(step_nll / n_targets), float(grad_norm))
        return False

    def handle_nonfinite(self, loss: float, grad_norm: float) -> None:
        """Count the step as skipped (train.skip_nonfinite) or stop the run, leaving the checkpoints as they are."""
        if self.cfg.train.skip_nonfinite:
            self.progress.nonfinite_skipped += 1
            log(f"step {self.progress.step + 1}: non-finite loss/gradient (loss {loss}, grad norm {grad_norm}); step skipped")
            return
        newest = ckpt.newest_checkpoint(self.run.checkpoints)
        kept = f"The last good checkpoint, {newest}, is the newest." if newest else "No checkpoint was saved yet."
        raise LorafitError(
            f"Non-finite loss or gradient at step {self.progress.step + 1} (loss {loss}, grad norm {grad_norm}). "
            "Likely causes: a learning rate too high (train.lr), fp16 overflow (try model.precision=bf16 or fp32), "
            f"or bad data. {kept} Set train.skip_nonfinite=true to skip such steps instead."
        )

    # -- logging, evaluation, checkpoints
    def log_window(self, grad_norm, bar) -> None:
        w = self.progress.window
        loss = float(w.nll) / w.tokens if w.tokens else None  # None: every step of the window was skipped
        extra = self.objective.window_record() if self.objective is not None else {}  # the objective's loss, rewards
        loss = extra.pop("loss", loss)
        if "pairs" in extra:  # a preference run's throughput in its own unit
            extra["pairs_per_second"] = extra.pop("pairs") / w.seconds if w.seconds else None
        self.progress.last_train_loss = loss if loss is not None else self.progress.last_train_loss
        record = {
            "step": self.progress.step,
            "epoch": round(self.plan.epoch(self.progress.step), 4),
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "tokens_per_second": w.tokens / w.seconds if w.seconds else None,  # scored tokens (the loss's)
            "processed_tokens_per_second": w.processed / w.seconds if w.seconds else None,
            "examples_per_second": w.examples / w.seconds if w.seconds else None,
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "train_seconds": self.progress.train_seconds,
            **extra,
        }
        if w.rank_tokens:
            record["rank_tokens"] = w.rank_tokens
        if dist.world().is_main:
            self.run.append_metrics(record)
        if bar is not None:
            bar.set_postfix(loss=f"{loss or 0:.4f}", scored_tok_s=f"{record['tokens_per_second'] or 0:,.0f}",
                            processed_tok_s=f"{record['processed_tokens_per_second'] or 0:,.0f}", refresh=False)
        else:  # no bar (not a terminal, or --no-progress): a line a log window, for nohup and CI logs
            log(progress_line(record, self.plan.total_steps, w.seconds / w.steps if w.steps else 0.0))
        self.progress.window = Window()

    def run_eval(self, label: str) -> dict:
        if self.objective is None:
            result = evaluate_run(self.model, self.data.val, self.data.source_names, self.scoring)
        else:  # preference accuracy and margin on held-out pairs; val_loss etc. of the chosen responses
            result = evaluate_pairs(self.model, self.data.val, self.data.source_names, self.scoring,
                                    self.objective.objective, self.objective.settings)
        record = {"step": self.progress.step, **result}
        # Rank 0 samples; with a sharded model every rank does (each forward is a collective), alike.
        prompt = self.cfg.eval.sample_prompt if dist.world().is_main or dist.sharded() else None
        if prompt:
            self.model.eval()
            text = sample(self.model, self.tokenizer, prompt, SamplingConfig(self.cfg.eval.sample_max_new_tokens, seed=self.cfg.train.seed))[0]
            self.model.train()
            record["sample"] = prompt + text
        if dist.world().is_main:
            self.run.append_metrics(record)
        log(
            f"[{label}] step {self.progress.step}: val_loss {result['val_loss']:.4f}, ppl {result['val_ppl']:.2f}, "
            f"{result['eval_samples_per_second']:.1f} samples/s"
            + (", preference accuracy {accuracy:.3f}, margin {margin:.4f}".format(**result["val_preference"])
               if "val_preference" in result else "")
            + (f"\n  sample: {record['sample']!r}" if prompt else "")
        )
        return result

    def save_checkpoint(self) -> Path:
        """Rank 0 writes; every rank holds the same weights and optimizer state (the gradients were all-reduced)."""
        gathered = dist.full_state(self.model, self.optimizer) if dist.sharded() else None  # a collective
        if not dist.world().is_main:
            return self.run.checkpoints / f"step-{self.progress.step}"
        state = {
            **self.progress.to_state(),
            # metrics.jsonl records written so far: a resume drops later ones, so none is doubled or lost
            "metrics_records": self.run.metrics_records,
            "train_examples": self.plan.n_train, "total_steps": self.plan.total_steps,
            "data_fingerprint": self.data_fingerprint(),
            FINGERPRINT_KEY: loaded_fingerprint(self.model),  # the base's weights (lorafit/fingerprint.py)
            CONFIG_KEY: resolved_config(self.cfg),  # what --resume compares, whatever config.yaml says by then
            "scaler": self.scaler.state_dict() if self.scaler else None,  # fp16 loss scale: part of the exact state
            "preference": self.objective.state() if self.objective else None,  # its logging window
        }
        path = ckpt.save_checkpoint(self.run.checkpoints, self.progress.step, self.model, self.optimizer, self.scheduler,
                                    state, self.cfg.train.keep_checkpoints, gathered)
        self.run.wrote(path.relative_to(self.run.path).as_posix())
        return path

    def data_fingerprint(self) -> dict:
        if self.fingerprint is None:
            self.fingerprint = data_fingerprint(self.data, self.cfg)
        return self.fingerprint

    def restore(self, path: Path) -> None:
        apply = (lambda w, o: dist.load_full_state(self.model, self.optimizer, w, o)) if dist.sharded() else None
        state = ckpt.load_checkpoint(path, self.model, self.optimizer, self.scheduler, apply)
        try:
            self._restore_state(path, state)
        except ckpt.TAMPERED as exc:  # a tampered state.json
            raise ckpt.unreadable(path / ckpt.STATE, exc) from None

    def _restore_state(self, path: Path, state: dict) -> None:
        same_data(path, state, self.plan.n_train, self.plan.total_steps, self.data_fingerprint())
        check_same_base(state.get(FINGERPRINT_KEY), loaded_fingerprint(self.model), self.force_base,
                        lambda why: LorafitError(
                            f"Checkpoint {path} was trained on another base than '{self.cfg.model.name}' is now: {why} "
                            "(other weights of the same shapes). Restore the run's base, start again with --overwrite, "
                            "or pass --force-base to continue on this one anyway."),
                        f"checkpoint {path}")
        self.progress = Progress.from_state(state, self.device, dist.world().size)
        if self.objective is not None:
            self.objective.load_state(state.get("preference"))
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if self.plan.total_steps != state["total_steps"]:
            # A longer run: its schedule from this step on (the next step's rate included).
            lrs = [base * fn(self.scheduler.last_epoch) for base, fn in zip(self.scheduler.base_lrs, self.scheduler.lr_lambdas)]
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group["lr"] = lr
            self.scheduler._last_lr = lrs
        if dist.world().is_main:
            self.run.keep_metrics(state["metrics_records"])

    # -- the loop
    def fit(self, show_bar: bool = True) -> None:
        t = self.cfg.train
        # No bar where none can draw (not a terminal, a 0-column one) or none is wanted: log lines instead
        bar = progress_bar(self.plan.total_steps, "training", "step", show_bar, initial=self.progress.step)
        self.model.train()
        with stop_signals(self):
            while self.progress.step < self.plan.total_steps:
                start = time.perf_counter()
                grad_norm = self.train_step()
                sync(self.device)  # honest step timing
                elapsed = time.perf_counter() - start
                self.progress.window.seconds += elapsed
                self.progress.train_seconds += elapsed
                self.progress.step += 1
                if bar is not None:
                    bar.update(1)
                last = self.progress.step == self.plan.total_steps
                if self.progress.step % t.log_every == 0 or last:
                    self.log_window(grad_norm, bar)
                if t.eval_every and self.progress.step % t.eval_every == 0 and not last:
                    self.run_eval("eval")
                # Read once: a signal arriving from here on is handled after the next step. All ranks stop together.
                stopping = self.stop_signal if not dist.world().parallel else self.agreed_stop()
                # The last step is saved too: a crash in the final eval or save then resumes without redoing steps.
                if (t.save_every and self.progress.step % t.save_every == 0) or last or stopping:
                    path = self.save_checkpoint()
                if stopping:
                    raise Stopped(stopping, f"stopped at step {self.progress.step} of {self.plan.total_steps}; saved {path}.")
        if bar is not None:
            bar.close()


    def agreed_stop(self) -> int | None:
        """A signal any rank received stops every rank after this same step (SIGTERM if it was not this one's)."""
        flag = torch.tensor([self.stop_signal or 0], dtype=torch.int64)
        flag = dist.all_reduce_sum(flag.to(self.device) if self.device.type == "cuda" else flag)
        return (self.stop_signal or signal.SIGTERM) if int(flag.item()) else None


class stop_signals:
    """SIGINT/SIGTERM finish the current step, save a checkpoint, and stop (see Trainer.fit)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.previous = {}

    def _handler(self, signum, frame):
        if self.trainer.stop_signal:  # a second signal stops at once; the newest complete checkpoint stays
            raise KeyboardInterrupt
        self.trainer.stop_signal = signum
        log(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint (press Ctrl-C again to abort)...")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


# ---------------------------------------------------------------- set-up and results


def build_optimizer(model, cfg: RunConfig, total_steps: int, device: torch.device):
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay,
        fused=device.type == "cuda",
    )
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[t.schedule]
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=total_steps)
    return optimizer, scheduler


def save_adapter(model, tokenizer, path: Path, load: dict, weights: dict | None = None,
                 keep: tuple[str, ...] = ()) -> list[str]:
    """The adapter in PEFT's format (its config names the base as the user gave it), the tokenizer,
    and lorafit's metadata: the base's signature and how to load it again (`load`). `weights`: the
    trainable weights gathered whole from a sharded model. `keep`: entries of an existing `path` that lorafit
    did not write, carried into the new one. Returns the files written (relative to `path`)."""
    for adapter in model.peft_config.values():  # PEFT writes it into adapter_config.json
        adapter.base_model_name_or_path = load["name"]
    with atomic_dir(path, keep=keep) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, state_dict=weights)
        tokenizer.save_pretrained(str(tmp))
        write_base_signature(tmp, model.get_base_model(), load)
        written = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    return written


def check_seq_len(cfg: RunConfig, model) -> None:
    limit = max_positions(model)
    if limit is not None and cfg.data.seq_len > limit:
        raise LorafitError(
            f"data.seq_len={cfg.data.seq_len} is longer than the maximum of {limit} positions of model "
            f"'{cfg.model.name}'; set data.seq_len={limit} or less."
        )


def setup(cfg: RunConfig, run: RunDir, progress: bool = True, resume: bool = False) -> Trainer:
    """Tokenizer, model, LoRA, fast paths, data and optimizer: every input is checked here, the model's
    before any data is read, and nothing is written. `resume`: the run's stored reference values are read
    (where their key still matches) instead of computed."""
    device = dist.device() if dist.world().parallel else default_device()
    precision = resolve_precision(cfg.model.precision, device)
    local_model = looks_like_a_path(cfg.model.name)
    hint = offline_hint(cfg.data, None if local_model else cfg.model.name)
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.revision, cfg.model.trust_remote_code, hint=hint)
    # Sharded: the base is loaded on the CPU and each rank moves only its shard to its device.
    model = load_base_model(cfg.model, precision, torch.device("cpu") if cfg.train.fsdp else device, hint=hint)
    check_seq_len(cfg, model)
    model, targets, fast = prepare_model(cfg, model, device, precision)
    data = share_data(prepare_data(cfg, tokenizer, progress=progress) if dist.world().is_main else None)  # read and tokenised once
    return assemble(cfg, model, tokenizer, data, fast, targets, device, precision, run, reuse_reference=resume)


def prepare_model(cfg: RunConfig, model, device: torch.device, precision: Precision):
    """LoRA on the resolved targets and the speed-ups, then the fast paths checked on the result:
    (PEFT model, LoRA target names, FastPaths). Also what `lorafit bench` times."""
    seed_everything(cfg.train.seed)  # LoRA A matrices are initialised from this
    if cfg.model.adapter:  # continue training a saved adapter (e.g. DPO after SFT): its own LoRA settings
        adapter_dir = resolve_adapter_dir(cfg.model.adapter)
        model = load_adapter(model, adapter_dir, cfg.model.name, is_trainable=True)
        targets = sorted(model.peft_config["default"].target_modules)
        log(f"continuing the adapter in {adapter_dir}")
    else:
        targets, note = resolve_targets(model, cfg.lora.targets)
        if note:
            log(note)
        model = apply_lora(model, cfg.lora, targets)
    log(f"LoRA on {', '.join(targets)}: {format_counts(*model.get_nb_trainable_parameters())}")
    if cfg.train.gradient_checkpointing:
        # Non-reentrant: correct with LoRA, whose layer inputs (the frozen base's activations) need no gradient.
        base = unwrapped(model)
        enable = getattr(base, "activation_checkpointing_enable", None)  # transformers >= 5.x's name
        if enable:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    prepare_for_speed(model, cfg.train.compile)
    if cfg.train.fsdp:
        dist.shard(unwrapped(model))  # onto this rank's device, a shard of every block each
    fast = fast_paths_for(model, cfg, device, precision.autocast, log=log)
    return model, targets, fast


def assemble(cfg: RunConfig, model, tokenizer, data: Data, fast: FastPaths, targets: list[str], device: torch.device,
             precision: Precision, run: RunDir | None, reuse_reference: bool = False) -> Trainer:
    """Optimizer and schedule around a prepared model and data (also what `lorafit bench` times).
    `reuse_reference`: read the reference values `run` stored, where they still hold."""
    pairs = cfg.train.objective != "sft"  # a preference step takes pairs, each two sequences of the split
    forward = Forward(model, fast, precision.autocast, device=device)  # built once: training and validation share it
    scoring = scoring_for(cfg, forward, tokenizer)
    objective = reference = None
    if pairs:  # the reference (DPO, IPO) once, before training: read back or computed (lorafit/reference.py)
        stored = run.file(REFERENCE_FILE) if run is not None and reuse_reference else None
        reference = attach_reference(cfg, model, {"train": data.train, "val": data.val}, scoring, precision, stored)
        objective = PreferenceObjective(cfg.train.objective, settings(cfg), data.train,
                                        reference_seconds=reference.seconds if reference else 0.0)
    plan = StepPlan(len(data.train) // (1 + pairs), cfg.train.batch_size * cfg.train.grad_accum, cfg.train.epochs, cfg.train.max_steps, cfg.train.seed)
    optimizer, scheduler = build_optimizer(model, cfg, plan.total_steps, device)
    scaler = torch.amp.GradScaler("cuda") if precision.autocast == torch.float16 and device.type == "cuda" else None
    return Trainer(
        cfg, model, optimizer, scheduler, data, plan, run, device, precision, tokenizer, forward, targets,
        micro_tokens=cfg.train.micro_batch_tokens or default_micro_tokens(device),
        scoring=scoring,
        scaler=scaler,
        ddp=forward.data_parallel() if dist.world().parallel and not dist.sharded() else None,
        objective=objective,
        reference=reference,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start(trainer: Trainer, resume: bool, changed: dict | None = None) -> dict | None:
    """Restore the newest checkpoint (with --resume) or begin afresh; return the eval before training.
    `changed`: settings that differ from the run's and may (recorded in the run, config.yaml updated)."""
    run = trainer.run
    if trainer.reference is not None and trainer.reference.computed and dist.world().is_main:
        # after the claim: --overwrite has emptied the directory by now; a resume rereads it
        write_reference(run, trainer.reference, {"train": trainer.data.train, "val": trainer.data.val})
    newest = ckpt.newest_checkpoint(run.checkpoints) if resume else None
    if newest:
        trainer.restore(newest)
        log(f"resumed from {newest} (step {trainer.progress.step} of {trainer.plan.total_steps})")
        if changed:
            log("settings changed on resume: " + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))
            if dist.world().is_main:
                run.record_resume(trainer.progress.step, changed)
                save_config(trainer.cfg, run.file(CONFIG_FILE))
                run.wrote(CONFIG_FILE)
                if extends_run(changed):  # a longer run is unfinished until it ends: its outputs are written anew
                    run.file(SUMMARY_FILE).unlink(missing_ok=True)
        return next((r for r in run.read_metrics() if r["step"] == 0 and "val_loss" in r), None)
    if resume:
        log(f"--resume: no checkpoint in {run.checkpoints}; starting from the beginning.")
    if dist.world().is_main:
        save_config(trainer.cfg, run.file(CONFIG_FILE))
        run.wrote(CONFIG_FILE)
        run.keep_metrics(0)  # a start over keeps no stale records
    return trainer.run_eval("before training") if trainer.cfg.eval.before_training else None


def train(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          force_base: bool = False, checked: RunDir | None = None) -> dict:
    """Check everything, then take the run's lock, then decide again under it (a new run, a resume, or an
    overwrite: only now is an old run deleted), then train. `checked`: the run directory when the caller
    already ran its `check_new_run` (the CLI does, before torch loads); None: it is checked here."""
    overwrite = overwrite and not resume  # --resume wins: it never deletes
    run = checked or RunDir(Path(cfg.output_dir))
    if checked is None:
        run.check_new_run(resume, overwrite)  # cheap and read-only: a plain mistake fails before minutes of set-up
        check_local_paths(cfg)  # so does a missing data file or local model directory
    if resume_state(run, cfg, resume)[1]:
        return run.read_summary()
    try:
        trainer = setup(cfg, run, progress, resume)
        trainer.force_base = force_base
        check_before_training(trainer)  # values used only later (the eval sample) fail now, not after training
        # Only rank 0 holds and writes the run directory; the others read checkpoints from it on a resume.
        claim = run.claim(resume, overwrite) if dist.world().is_main else contextlib.nullcontext()
        with claim:  # decided again under the lock: another run may have come meanwhile
            dist.barrier()  # the directory is claimed (and emptied for --overwrite) before any rank reads it
            changed, finished = resume_state(run, cfg, resume)
            if finished:
                return run.read_summary()
            reporting = trackers.opened(cfg.train.report_to, run, cfg.to_dict()) if dist.world().is_main \
                else contextlib.nullcontext()
            with reporting:  # the trackers get what metrics.jsonl gets (rank 0 writes it)
                with saving(f"the run's files in {run.path}", lambda: resume_advice(run)):
                    before = start(trainer, resume, changed)
                    trainer.fit(show_bar=progress)
                return finish(trainer, before)
    except torch.OutOfMemoryError:
        newest = ckpt.newest_checkpoint(run.checkpoints)
        kept = f" The newest complete checkpoint, {newest}, resumes with --resume." if newest else ""
        raise LorafitError(str(out_of_memory(default_device(), "training")) + kept) from None


def resume_state(run: RunDir, cfg: RunConfig, resume: bool) -> tuple[dict, bool]:
    """(the settings a --resume changes, whether the run already finished and they do not extend it: then
    there is nothing to do, which is logged). A change a resume may not make is an error here."""
    if not (resume and run.is_run()):
        return {}, False
    changed = check_same_config(run, cfg)
    finished = run.is_finished() and not extends_run(changed)
    if finished:
        log(f"The run in {run.path} has already finished; nothing to do.")
    return changed, finished


def resume_advice(run: RunDir) -> str:
    newest = ckpt.newest_checkpoint(run.checkpoints)
    kept = f"The newest complete checkpoint is {newest}" if newest else "No checkpoint was saved yet"
    return f"{kept}; free space, then run the same command with --resume."


def finish(trainer: Trainer, before: dict | None) -> dict:
    """Final eval, the adapter, and the reports; summary.json last, so its presence means finished."""
    cfg, run, device = trainer.cfg, trainer.run, trainer.device
    after = trainer.run_eval("final")
    lora_weights = dist.full_state(trainer.model)[0] if dist.sharded() else None  # a collective: every rank
    if not dist.world().is_main:
        return after
    advice = resume_advice(run)  # the last step is checkpointed: a resume redoes only the eval and the saves
    with saving(f"the adapter in {run.adapter}", advice):
        # A file of the user's in adapter/ (lorafit never wrote it) is carried into the new adapter, never deleted.
        users = tuple(e[len(ADAPTER_DIR) + 1:].rstrip("/") for e in run.foreign_entries() if e.startswith(ADAPTER_DIR + "/"))
        written = save_adapter(trainer.model, trainer.tokenizer, run.adapter,
                               load_settings(cfg.model, trainer.model.get_base_model()), lora_weights, keep=users)
        run.wrote(*(f"{ADAPTER_DIR}/{name}" for name in written))
    trainable, total = trainer.model.get_nb_trainable_parameters()
    summary = {
        "recipe": cfg.recipe,
        "base_model": cfg.model.name,
        "device": device_name(device),
        "precision": str(trainer.precision.weights).replace("torch.", ""),
        "lora_targets": trainer.lora_targets,
        "packing": trainer.fast.layout.kind,
        "fast_paths": trainer.fast.record(),
        "attn_implementation": getattr(unwrapped(trainer.model).config, "_attn_implementation", None),
        "trainable_params": trainable,
        "total_params": total,
        "objective": cfg.train.objective,
        "train_examples": len(trainer.data.train),  # preference: sequences (two a pair)
        "val_examples": len(trainer.data.val),  # evaluated (at most eval.max_examples of those held out)
        "val_held_out": trainer.data.val_held_out,
        "sources": {name: describe_source(src) for name, src in cfg.data.sources.items()},  # kind, fields, scored
        "train_tokens": trainer.progress.train_tokens,
        "optimizer_steps": trainer.progress.step,
        "epochs": round(trainer.plan.epoch(trainer.progress.step), 4),
        "train_seconds": trainer.progress.train_seconds,
        "train_tokens_per_second": trainer.progress.train_tokens / trainer.progress.train_seconds if trainer.progress.train_seconds else None,
        "train_processed_tokens": trainer.progress.train_processed_tokens,  # scored or context: what was computed
        "train_processed_tokens_per_second": (trainer.progress.train_processed_tokens / trainer.progress.train_seconds
                                              if trainer.progress.train_seconds else None),
        "final_train_loss": trainer.progress.last_train_loss,
        "nonfinite_steps_skipped": trainer.progress.nonfinite_skipped,
        # what data.long_examples did, per source: truncated, dropped_too_long, completion_truncated, ...
        "length_policy": {name: policy_summary(split.policy_counts, trainer.data.source_names, cfg.data.long_examples,
                                               masked_sources(cfg.data))
                          for name, split in (("train", trainer.data.train), ("val", trainer.data.val))},
        **after,
        "val_before_training": before_summary(before),
        "peak_memory_bytes": peak_memory_bytes(device),
        "world_size": dist.world().size,
    }
    with saving(f"the reports in {run.path}", advice):
        write_reports(run, cfg, summary, before, after)
    log(f"done: {run.path} (val_loss {after['val_loss']:.4f}, ppl {after['val_ppl']:.2f})")
    return summary


def before_summary(before: dict | None) -> dict | None:
    """summary.json's `val_before_training`: the same object as the final figures (a preference run: its
    `val_preference`), measured at step 0."""
    if not before:
        return None
    if "val_preference" in before:
        return before["val_preference"]
    return {k: before[k] for k in ("val_loss", "val_ppl", "val_bits_per_token", "val_bits_per_byte")}


def write_reports(run: RunDir, cfg: RunConfig, summary: dict, before: dict | None, after: dict) -> None:
    with atomic_path(run.file(LOSS_PLOT)) as tmp:
        plot_losses(run.read_metrics(), tmp)
    run.wrote(LOSS_PLOT)
    if len(after["val_by_source"]) > 1:
        with atomic_path(run.file(SOURCE_PLOT)) as tmp:
            plot_by_source((before or {}).get("val_by_source", {}), after["val_by_source"], tmp)
        run.wrote(SOURCE_PLOT)
    run.write_model_card(model_card(cfg, summary))
    run.write_json(SUMMARY_FILE, summary)

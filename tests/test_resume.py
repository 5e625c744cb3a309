"""Runs that survive (DESIGN invariant 7): checkpoints, exact resume after SIGKILL at several points,
SIGINT/SIGTERM, atomic saves, a full disk, and bitwise determinism on CPU.

The killed runs are real `lorafit train` processes. A small driver (DRIVER below) runs the CLI and,
when told, SIGKILLs itself at a precise point: half-way through a metrics line, inside a checkpoint
save, inside the final adapter save. One more kill comes from outside at whatever moment it lands.
"""

from __future__ import annotations

import errno
import shutil
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lorafit import checkpoint as ckpt
from lorafit.cli import main
from lorafit.errors import LorafitError

RUN = ["train.max_steps=10", "train.save_every=3", "train.log_every=2", "train.eval_every=4",
       "train.keep_checkpoints=2", "eval.sample_max_new_tokens=5", "--no-progress"]
TRAIN_STEPS, EVAL_STEPS = [2, 4, 6, 8, 10], [0, 4, 8, 10]
SAME_IN_EVERY_RUN = ("step", "epoch", "loss", "lr", "grad_norm", "val_loss", "val_by_source", "sample")

DRIVER = r"""
import os, signal, sys, time
from lorafit import checkpoint, rundir, train
from lorafit.cli import main

point, _, arg = os.environ.get("KILL_AT", "").partition(":")
calls = [0]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def nth_call():
    calls[0] += 1
    return calls[0] == int(arg or 1)

if point == "metrics":  # die half-way through writing a metrics line
    real_append = rundir.RunDir.append_metrics
    def append_metrics(self, record):
        if nth_call():
            with open(self.file(rundir.METRICS_FILE), "a") as f:
                f.write(rundir.to_json(record)[:25])
            die()
        real_append(self, record)
    rundir.RunDir.append_metrics = append_metrics
elif point == "checkpoint":  # die inside a checkpoint save: weights written, the rest not
    real_save_file = checkpoint.save_file
    def save_file(tensors, filename, *a, **k):
        real_save_file(tensors, filename, *a, **k)
        if nth_call():
            die()
    checkpoint.save_file = save_file
elif point == "adapter":  # die inside the final adapter save: all files written, not yet renamed
    real_signature = train.write_base_signature
    def write_base_signature(*a, **k):
        real_signature(*a, **k)
        die()
    train.write_base_signature = write_base_signature
elif point == "slow":  # slow steps, so a signal lands mid-run
    real_step = train.Trainer.train_step
    def train_step(self):
        time.sleep(float(arg))
        return real_step(self)
    train.Trainer.train_step = train_step
sys.exit(main(sys.argv[1:]))
"""


def train_args(model, data, out, cache, *extra) -> list[str]:
    return ["train", "quotes", f"model.name={model}", f"data.sources.quotes.path={data}", f"output_dir={out}",
            f"data.cache_dir={cache}", *RUN, *extra]


def launch(args: list[str], kill_at: str = "") -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "KILL_AT": kill_at}
    return subprocess.Popen([sys.executable, "-c", DRIVER, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_killed(args: list[str], kill_at: str) -> None:
    proc = launch(args, kill_at)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL, err


def wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 240) -> None:
    """Poll metrics.jsonl until a record of `step` or later is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and any(r.get("step", 0) >= step for r in records(metrics)):
            return
        time.sleep(0.01)
    pytest.fail(f"run never logged step {step}: {proc.communicate()[1]}")


def records(metrics: Path) -> list[dict]:
    out = []
    for line in metrics.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def comparable(run: Path) -> list[dict]:
    """metrics.jsonl without timings: what must match an uninterrupted run exactly."""
    return [{k: r[k] for k in SAME_IN_EVERY_RUN if k in r} for r in records(run / "metrics.jsonl")]


def adapter_bytes(run: Path) -> bytes:
    return (run / "adapter" / "adapter_model.safetensors").read_bytes()


def checkpoint_steps(run: Path) -> list[int]:
    return [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, texts_file, cache) -> Path:
    """An uninterrupted run of the config every test here uses."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(train_args(tiny_model_dir, texts_file, out, cache)) == 0
    return out


def test_reference_run_logs_each_step_once_and_keeps_the_newest_checkpoints(reference):
    rs = records(reference / "metrics.jsonl")
    assert [r["step"] for r in rs if "loss" in r] == TRAIN_STEPS
    assert [r["step"] for r in rs if "val_loss" in r] == EVAL_STEPS
    assert checkpoint_steps(reference) == [9, 10]  # every 3 steps and the last; 2 kept
    assert not [p for p in (reference / "checkpoints").iterdir() if p.name.startswith(".")]


def test_same_config_and_seed_give_a_bitwise_identical_adapter(reference, tmp_path, tiny_model_dir, texts_file, cache):
    assert main(train_args(tiny_model_dir, texts_file, tmp_path / "again", cache)) == 0
    assert adapter_bytes(tmp_path / "again") == adapter_bytes(reference)
    assert comparable(tmp_path / "again") == comparable(reference)


def test_sigkill_at_any_point_then_resume_ends_as_the_uninterrupted_run(reference, tmp_path, tiny_model_dir, texts_file, cache):
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, texts_file, out, cache)
    resume = [*args, "--resume"]

    run_killed(args, "metrics:2")  # half-way through the step-2 log line, before any checkpoint
    assert checkpoint_steps(out) == []

    run_killed(resume, "checkpoint:2")  # starts over, dies inside the step-6 checkpoint save
    assert checkpoint_steps(out) == [3]
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".step-6.tmp-")]

    proc = launch(resume)  # from step 3; killed from outside once step 8 is logged, wherever it is then
    wait_for_step(proc, out / "metrics.jsonl", 8)
    proc.kill()
    proc.communicate(timeout=60)

    run_killed(resume, "adapter")  # dies inside the final adapter save
    assert checkpoint_steps(out)[-1] == 10 and not (out / "summary.json").exists()

    assert main(resume) == 0
    assert adapter_bytes(out) == adapter_bytes(reference)
    assert comparable(out) == comparable(reference)  # no step logged twice or missing
    assert not [p for d in (out, out / "checkpoints") for p in d.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_resuming_a_finished_run_changes_nothing(reference, tiny_model_dir, texts_file, cache, capsys):
    before = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    assert main(train_args(tiny_model_dir, texts_file, reference, cache, "--resume")) == 0
    assert "already finished" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_finishes_the_step_saves_and_says_how_to_resume(sig, reference, tmp_path, tiny_model_dir, texts_file, cache):
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, texts_file, out, cache)
    proc = launch(args, "slow:0.3")
    wait_for_step(proc, out / "metrics.jsonl", 2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err
    stopped_at = checkpoint_steps(out)[-1]
    assert 2 <= stopped_at < 10 and f"stopped at step {stopped_at}" in err
    assert "Resume with: lorafit train quotes" in err and err.rstrip().endswith("--resume")
    assert not (out / "summary.json").exists()
    if sig == signal.SIGINT:  # and the resumed run is the uninterrupted one
        assert main([*args, "--resume"]) == 0
        assert adapter_bytes(out) == adapter_bytes(reference)
        assert comparable(out) == comparable(reference)


def test_disk_full_during_a_checkpoint_keeps_the_previous_one_newest(
    tmp_path, tiny_model_dir, texts_file, cache, monkeypatch, capsys
):
    real_save_file, calls = ckpt.save_file, []

    def save_file(tensors, filename, *a, **k):
        calls.append(filename)
        if len(calls) == 2:  # the step-6 checkpoint: a partial file, then no space
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        real_save_file(tensors, filename, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, texts_file, out, cache)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "the disk is full" in err
    assert "step-3" in err and "--resume" in err
    assert checkpoint_steps(out) == [3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3"]  # the partial one is gone
    assert (out / "checkpoints" / "step-3" / ckpt.WEIGHTS).stat().st_size > 1000


# ---------------------------------------------------------------- checkpoint files, without training


def tiny_state():
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer, scheduler


def test_a_save_interrupted_midway_leaves_the_old_checkpoint_newest_and_complete(tmp_path, monkeypatch):
    model, optimizer, scheduler = tiny_state()
    ckpt.save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {"note": "one"}, keep=2)
    real_save, calls = torch.save, []

    def interrupted(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:  # the scheduler file: half written, then Ctrl-C
            Path(f).write_bytes(b"PK\x03\x04")
            raise KeyboardInterrupt
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {"note": "two"}, keep=2)
    monkeypatch.undo()
    assert ckpt.list_checkpoints(tmp_path) == [(1, tmp_path / "step-1")]
    assert [p.name for p in tmp_path.iterdir()] == ["step-1"]
    assert ckpt.load_checkpoint(tmp_path / "step-1", *tiny_state())["note"] == "one"


def test_a_checkpoint_of_another_model_names_what_differs(tmp_path):
    model, optimizer, scheduler = tiny_state()
    ckpt.save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {}, keep=1)
    wider = torch.nn.Linear(4, 5)  # same names, other shapes
    with pytest.raises(LorafitError) as info:
        ckpt.load_checkpoint(tmp_path / "step-1", wider, torch.optim.AdamW(wider.parameters()), scheduler)
    assert f"Checkpoint {tmp_path / 'step-1'} does not match this run's model" in str(info.value)
    assert "shape (checkpoint vs model): bias (3,) vs (5,), weight (3, 4) vs (5, 4)" in str(info.value)
    other = torch.nn.Sequential(torch.nn.Linear(4, 3))  # other names: 0.weight, 0.bias
    with pytest.raises(LorafitError) as info:
        ckpt.load_checkpoint(tmp_path / "step-1", other, torch.optim.AdamW(other.parameters()), scheduler)
    assert "missing from the checkpoint: 0.bias, 0.weight; not in the model: bias, weight" in str(info.value)


def test_checkpoints_restore_weights_optimizer_and_rngs_and_only_the_newest_are_kept(tmp_path):
    model, optimizer, scheduler = tiny_state()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, optimizer, scheduler, {}, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-3"]
    expected_draw = torch.rand(3)  # the RNG state saved is the one before this draw
    other, other_opt, other_sched = tiny_state()
    ckpt.load_checkpoint(tmp_path / "step-3", other, other_opt, other_sched)
    assert torch.equal(torch.rand(3), expected_draw)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], other_opt.state_dict()["state"][0]["exp_avg"])


# ---------------------------------------------------------------- issue 21: --resume pins the config and the base


def test_a_hand_edited_config_yaml_is_refused_on_resume(reference, tmp_path, capsys):
    """`--resume RUN_DIR` reads the run's config.yaml: the checkpoint's own record of the config is what counts."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    import yaml

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["train"]["lr"] != 0.5
    config["train"]["lr"] = 0.5
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (out / "summary.json").unlink()
    before = checkpoint_steps(out)
    assert main(["train", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--resume: the config differs" in err and "train.lr:" in err and "0.5 now" in err
    assert checkpoint_steps(out) == before


@pytest.mark.parametrize("key, value", [
    ("step", -1), ("step", 2.5), ("step", 10**30), ("step", "3"), ("step", True), ("metrics_records", -1),
    ("total_steps", "10"), ("train_tokens", None),
])
def test_tampered_state_values_are_an_unreadable_checkpoint(reference, tmp_path, key, value):
    step_dir = tmp_path / "step-9"
    shutil.copytree(ckpt.list_checkpoints(reference / "checkpoints")[-1][1], step_dir)
    state = json.loads((step_dir / ckpt.STATE).read_text())
    ckpt.read_state(step_dir)  # as written: fine
    state[key] = value
    (step_dir / ckpt.STATE).write_text(json.dumps(state))
    with pytest.raises(ValueError, match=key):
        ckpt.read_state(step_dir)


def test_a_huge_step_in_state_json_is_unreadable_not_done(reference, tiny_model_dir, texts_file, cache, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "summary.json").unlink()
    newest = ckpt.newest_checkpoint(out / "checkpoints")
    state = json.loads((newest / ckpt.STATE).read_text())
    state["step"] = 10**30
    (newest / ckpt.STATE).write_text(json.dumps(state))
    assert main([*train_args(tiny_model_dir, texts_file, out, cache), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"Checkpoint {newest} is unreadable" in err and "step=" in err
    assert not (out / "summary.json").exists()


def test_resume_on_a_base_of_other_weights_is_refused_unless_forced(tmp_path, tiny_model_dir, tiny_tokenizer_dir, texts_file,
                                                                     cache, capsys):
    from lorafit.init_model import init_model

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    out = tmp_path / "run"
    short = ["train.max_steps=3", "train.save_every=3", "eval.before_training=false", "eval.sample_prompt=null"]
    assert main([*train_args(base, texts_file, out, cache), *short]) == 0
    shutil.rmtree(base)
    init_model("tiny", str(tiny_tokenizer_dir), base, seed=1)  # same path, same shapes, other weights
    longer = [*train_args(base, texts_file, out, cache), *short, "train.max_steps=4", "--resume"]
    assert main(longer) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "was trained on another base" in err and "--force-base" in err
    assert checkpoint_steps(out) == [3]
    assert main([*longer, "--force-base"]) == 0
    assert json.loads((out / "summary.json").read_text())["optimizer_steps"] == 4


# ---------------------------------------------------------------- issue 21: a full disk under torch.save


def test_a_full_disk_under_torch_save_is_the_same_clean_message(tmp_path, tiny_model_dir, texts_file, cache, monkeypatch,
                                                                 capsys):
    """torch.save reports a full disk as `RuntimeError: basic_ios::clear` (no errno): the same message as any
    other writer's, and the previous checkpoint stays the newest, complete."""
    real_save, calls = ckpt.torch.save, []

    def save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 4:  # the step-6 checkpoint's optimizer state (3 torch.save calls a checkpoint)
            Path(f).write_bytes(b"\0" * 10)
            raise RuntimeError("basic_ios::clear: iostream error")
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", save)
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, texts_file, out, cache)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error: ") == 1
    assert f"Could not write checkpoint {out / 'checkpoints' / 'step-6'}" in err and "the disk is full" in err
    assert "step-3" in err and "--resume" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3"]
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert main([*train_args(tiny_model_dir, texts_file, out, cache), "--resume"]) == 0


def test_write_error_reads_every_writer_s_failure():
    from safetensors import SafetensorError

    from lorafit.rundir import write_error

    for exc in (OSError(errno.ENOSPC, "No space left on device", "f"), SafetensorError("I/O error: No space left on "
                "device (os error 28)"), Exception("Os { code: 28, kind: StorageFull }"),
                RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
                             "data/0: file write failed"), RuntimeError("basic_ios::clear: iostream error")):
        error = write_error(exc, "x", "advice")
        assert error is not None and "disk is full" in str(error), exc
    assert write_error(RuntimeError("shape mismatch"), "x", "advice") is None  # a bug keeps its traceback

"""Data parallel on torch.distributed (gloo on CPU): N processes train as one.

The 2-process runs are real `torchrun` launches, in the multi-node form of the README (an explicit
rendezvous endpoint), so the documented command is the tested one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lorafit.cli import main

# No dropout: N processes then compute exactly what one does, up to summation order.
SAME = ["train.max_steps=4", "train.log_every=1", "train.save_every=1", "lora.dropout=0", "model.dropout=0",
        "eval.sample_prompt=null", "train.lr=2e-3", "--no-progress"]

DRIVER = r"""
import os, signal, sys
from lorafit import train
from lorafit.cli import main

kill_rank, _, kill_step = os.environ.get("KILL_RANK_AT", "").partition(":")
if kill_rank and os.environ.get("RANK") == kill_rank:  # one rank dies mid-run, as a lost node would
    real_step = train.Trainer.train_step
    def train_step(self):
        if self.progress.step == int(kill_step):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(self)
    train.Trainer.train_step = train_step
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path: Path, args: list[str], env: dict | None = None, nproc: int = 2) -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(driver), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=300)


def train_args(model, data, out, *extra) -> list[str]:
    return ["train", "quotes", f"model.name={model}", f"data.sources.quotes.path={data}", f"output_dir={out}", *SAME, *extra]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def one_process_run(tiny_model_dir, texts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    assert main(train_args(tiny_model_dir, texts_file, out)) == 0
    return out


def test_two_processes_make_the_updates_one_process_makes(one_process_run, tiny_model_dir, texts_file, tmp_path):
    two = tmp_path / "two"
    proc = torchrun(tmp_path, train_args(tiny_model_dir, texts_file, two))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one_steps = [r for r in records(one_process_run) if "loss" in r]
    two_steps = [r for r in records(two) if "loss" in r]
    assert [r["step"] for r in two_steps] == [1, 2, 3, 4]  # written once, by rank 0 alone
    for a, b in zip(one_steps, two_steps):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
        # Each rank computed about half of the step's target tokens: within one example (seq_len 64) of each other.
        r0, r1 = b["rank_tokens"]
        assert min(r0, r1) > 0 and abs(r0 - r1) <= 64
    summary_one, summary_two = (json.loads((r / "summary.json").read_text()) for r in (one_process_run, two))
    assert summary_two["world_size"] == 2 and summary_two["train_tokens"] == summary_one["train_tokens"]
    assert sum(sum(r["rank_tokens"]) for r in two_steps) == summary_one["train_tokens"]  # disjoint and complete
    assert abs(summary_one["val_loss"] - summary_two["val_loss"]) <= 1e-5 * summary_one["val_loss"]
    for name, w in adapter(one_process_run).items():
        torch.testing.assert_close(adapter(two)[name], w, atol=1e-6, rtol=1e-4)
    assert proc.stderr.count("done:") == 1  # one voice for the whole job


def test_a_rank_that_dies_stops_the_job_and_a_one_process_resume_ends_as_the_uninterrupted_run(
        one_process_run, tiny_model_dir, texts_file, tmp_path):
    out = tmp_path / "killed"
    proc = torchrun(tmp_path, train_args(tiny_model_dir, texts_file, out), env={"KILL_RANK_AT": "1:2"})
    assert proc.returncode != 0
    from lorafit import checkpoint as ckpt

    saved = ckpt.list_checkpoints(out / "checkpoints")
    assert saved and saved[-1][0] <= 2 and not (out / "summary.json").exists()
    assert main(train_args(tiny_model_dir, texts_file, out, "--resume")) == 0  # one process now
    steps = [r["step"] for r in records(out) if "loss" in r]
    assert steps == [1, 2, 3, 4]  # none doubled, none lost
    summary_one, resumed = (json.loads((r / "summary.json").read_text()) for r in (one_process_run, out))
    assert abs(summary_one["val_loss"] - resumed["val_loss"]) <= 1e-5 * summary_one["val_loss"]
    for name, w in adapter(one_process_run).items():
        torch.testing.assert_close(adapter(out)[name], w, atol=1e-6, rtol=1e-4)


def test_step_shares_are_disjoint_complete_and_token_balanced():
    from lorafit.distributed import shares

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=33)
    parts = shares(lengths, 3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(33))
    loads = [int(lengths[p].sum()) for p in parts]
    assert max(loads) - min(loads) <= lengths.max()
    assert [len(p) for p in shares(lengths[:1], 2)] == [1, 0]  # fewer examples than ranks: one rank idles


def test_fsdp_on_two_processes_trains_as_one_saves_a_peft_adapter_and_resumes(one_process_run, tiny_model_dir, texts_file,
                                                                             tmp_path):
    """train.fsdp: the base sharded over 2 gloo processes (torch FSDP2). A rank killed mid-run, then a
    sharded resume: the same per-step losses and adapter as one process, and PEFT loads the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "fsdp"
    args = train_args(tiny_model_dir, texts_file, out, "train.fsdp=true")
    assert torchrun(tmp_path, args, env={"KILL_RANK_AT": "1:2"}).returncode != 0
    assert not (out / "summary.json").exists()
    proc = torchrun(tmp_path, [*args, "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fast_paths"]["fused_head"] is False and "train.fsdp" in summary["fast_paths"]["why_not"]["fused_head"]
    one_steps = [r for r in records(one_process_run) if "loss" in r]
    steps = [r for r in records(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for a, b in zip(one_steps, steps):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
    for name, w in adapter(one_process_run).items():
        torch.testing.assert_close(adapter(out)[name], w, atol=1e-6, rtol=1e-4)
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(out / "adapter"))
        ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(one_process_run / "adapter"))
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- memory options


def _one_step(tiny_model_dir, checkpointing: bool):
    """Loss, LoRA gradients and the bytes autograd saves for the backward, for one long-sequence step."""
    from lorafit.config import load_config
    from lorafit.data.packing import micro_batches
    from test_invariants import token_nll
    from lorafit.modeling import load_base_model, resolve_precision
    from lorafit.train import prepare_model
    from test_invariants import make_split

    cpu = torch.device("cpu")
    cfg = load_config("quotes", [f"model.name={tiny_model_dir}", "data.seq_len=256", "lora.dropout=0", "model.dropout=0",
                                 f"train.gradient_checkpointing={str(checkpointing).lower()}"])
    model, _, fast = prepare_model(cfg, load_base_model(cfg.model, resolve_precision("fp32", cpu), cpu), cpu,
                                   resolve_precision("fp32", cpu))
    rng = np.random.default_rng(0)
    split = make_split([list(rng.integers(0, 250, size=256)) for _ in range(2)])
    (batch,) = micro_batches(split, np.arange(2), fast.layout, 10_000, 0)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nll, _ = token_nll(model, batch, fused=fast.fused_head)
    loss = nll.sum() / batch.n_targets
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, saved[0], fast


def test_gradient_checkpointing_keeps_the_step_and_saves_less_for_the_backward(tiny_model_dir):
    loss, grads, saved, _ = _one_step(tiny_model_dir, False)
    loss_ckpt, grads_ckpt, saved_ckpt, fast = _one_step(tiny_model_dir, True)
    assert fast.layout.kind != "segments"  # recomputed layers would not attend example by example
    assert abs(loss - loss_ckpt) <= 1e-6 * abs(loss)
    for name, g in grads.items():
        torch.testing.assert_close(grads_ckpt[name], g, atol=1e-7, rtol=1e-5)
    assert saved_ckpt < 0.6 * saved  # activations are recomputed, not kept


def test_quantized_bases_need_cuda_and_say_so(tiny_model_dir, texts_file, tmp_path, capsys):
    code = main(["train", "quotes", f"model.name={tiny_model_dir}", f"data.sources.quotes.path={texts_file}",
                 f"output_dir={tmp_path / 'run'}", "model.quantize=nf4", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "model.quantize=nf4 needs a CUDA GPU" in err and not (tmp_path / "run").exists()


def test_out_of_memory_is_one_line_naming_the_memory_knobs(tiny_model_dir, texts_file, tmp_path, capsys, monkeypatch):
    from lorafit import train

    def no_memory(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(train.Trainer, "train_step", no_memory)
    code = main(["train", "quotes", f"model.name={tiny_model_dir}", f"data.sources.quotes.path={texts_file}",
                 f"output_dir={tmp_path / 'run'}", "eval.before_training=false", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    for knob in ("train.micro_batch_tokens", "train.gradient_checkpointing", "model.quantize"):
        assert knob in err


def test_nproc_relaunches_the_same_command_through_torchrun(monkeypatch):
    import lorafit.cli as cli

    launched = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr("subprocess.call", lambda command, env=None: launched.append(command) or 0)
    monkeypatch.setattr(cli, "processors", lambda: (4, "CPU core(s)"))  # whatever this machine has
    assert cli.main(["train", "quotes", "--nproc", "3", "train.max_steps=2", "--resume"]) == 0
    (command,) = launched
    assert command[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", "-m"]
    assert command[6:] == ["lorafit", "train", "quotes", "train.max_steps=2", "--resume"]


def test_nproc_beyond_the_machine_is_refused_before_anything_starts(monkeypatch, capsys):
    """12 processes on 2 cores took over 5 GB with no warning: now refused, naming the flag and the limit."""
    import lorafit.cli as cli

    launched = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr("subprocess.call", lambda command: launched.append(command) or 0)
    have, _ = cli.processors()
    assert cli.main(["train", "quotes", "--nproc", str(have + 1), "train.max_steps=2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"--nproc {have + 1}: this machine has {have} " in err and f"Use --nproc {have} or fewer" in err
    assert "Traceback" not in err and launched == []


def test_prompt_completion_data_trains_as_one_on_two_processes(tiny_model_dir, tmp_path):
    """Only the completion is scored: the other rank must receive rank 0's scored mask, and every rank must
    normalise by the step's scored targets (not its positions), or 2 processes would differ from 1."""
    from conftest import make_texts

    data = tmp_path / "pairs.jsonl"
    texts = make_texts(60, seed=5, max_words=14)
    data.write_text("".join(json.dumps({"prompt": a, "completion": b}) + "\n" for a, b in zip(texts[::2], texts[1::2])))
    pairs = ["data.sources.quotes.kind=prompt_completion", "data.sources.quotes.prompt_field=prompt",
             "data.sources.quotes.completion_field=completion"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(train_args(tiny_model_dir, data, one, *pairs)) == 0
    proc = torchrun(tmp_path, train_args(tiny_model_dir, data, two, *pairs))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for a, b in zip([r for r in records(one) if "loss" in r], [r for r in records(two) if "loss" in r]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
    summary_one, summary_two = (json.loads((r / "summary.json").read_text()) for r in (one, two))
    assert summary_two["train_tokens"] == summary_one["train_tokens"]
    assert abs(summary_one["val_loss"] - summary_two["val_loss"]) <= 1e-5 * summary_one["val_loss"]

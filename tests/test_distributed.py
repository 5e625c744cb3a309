"""Data parallel on torch.distributed (gloo on CPU): N processes train as one.

The 2-process runs are real `torchrun` launches, in the multi-node form of the README (an explicit
rendezvous endpoint), so the documented command is the tested one."""

from __future__ import annotations

import json
import os
import signal
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
        if self.step == int(kill_step):
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

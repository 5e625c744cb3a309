"""Issue 11, tried as a hostile user would: --overwrite and the run directory, start-up races, full disks,
late values, resume with other settings or other data, `lorafit generate` arguments, config and data
holes, tampered files. Every case: exit 2 with one message and no traceback (or it works), and the files on
disk compared before and after where something could be lost. (The config and data-file cases that fit the
one-line pattern are in test_bad_input.py's CASES.)
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lorafit import checkpoint as ckpt
from lorafit.cli import main
from lorafit.errors import LorafitError
from lorafit.rundir import MARKER_FILE

QUICK = ["train.max_steps=3", "train.save_every=1", "train.keep_checkpoints=3", "train.log_every=1",
         "eval.before_training=false", "eval.sample_prompt=null", "--no-progress"]


def train_args(model, data, out, *extra) -> list[str]:
    return ["train", "quotes", f"model.name={model}", f"data.sources.quotes.path={data}", f"output_dir={out}", *QUICK, *extra]


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(Path(path).rglob("*"))}


def refused(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, texts_file) -> Path:
    """A finished run of 3 steps with a checkpoint after each."""
    out = tmp_path_factory.mktemp("robust") / "run"
    assert main(train_args(tiny_model_dir, texts_file, out)) == 0
    return out


def unfinished_copy(run: Path, dest: Path, newest_step: int = 1) -> Path:
    """The run as if killed after the checkpoint of `newest_step`."""
    shutil.copytree(run, dest)
    for name in ("summary.json", "README.md", "loss.png"):
        (dest / name).unlink()
    shutil.rmtree(dest / "adapter")
    for step, path in ckpt.list_checkpoints(dest / "checkpoints"):
        if step > newest_step:
            shutil.rmtree(path)
    return dest


# ---------------------------------------------------------------- 1. --overwrite deletes only a lorafit run


def test_a_run_directory_carries_lorafit_s_marker(run):
    marker = json.loads((run / MARKER_FILE).read_text())
    assert marker["lorafit_run"] == 1 and marker["resumes"] == []


def test_overwrite_refuses_a_directory_that_merely_holds_a_config_yaml(tmp_path, tiny_model_dir, texts_file, capsys):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('years of work')\n")
    (project / "config.yaml").write_text("name: my project\n")
    before = snapshot(project)
    code = main(train_args(tiny_model_dir, texts_file, project, "--overwrite"))
    refused(code, capsys.readouterr().err, "--overwrite refused", "not recognisably a lorafit run", MARKER_FILE)
    assert snapshot(project) == before


def test_overwrite_refuses_a_run_directory_that_holds_other_files_too(run, tmp_path, tiny_model_dir, texts_file, capsys):
    mixed = tmp_path / "run"
    shutil.copytree(run, mixed)
    (mixed / "src").mkdir()
    (mixed / "src" / "main.py").write_text("print('years of work')\n")
    (mixed / "checkpoints" / "notes.txt").write_text("mine\n")
    before = snapshot(mixed)
    code = main(train_args(tiny_model_dir, texts_file, mixed, "--overwrite"))
    refused(code, capsys.readouterr().err, "--overwrite refused", "checkpoints/notes.txt, src", "which no run writes")
    assert snapshot(mixed) == before


def test_overwrite_replaces_a_run_with_a_fresh_one(run, tmp_path, tiny_model_dir, texts_file):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    assert main(train_args(tiny_model_dir, texts_file, out, "--overwrite", "train.max_steps=1")) == 0
    assert json.loads((out / "summary.json").read_text())["optimizer_steps"] == 1
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [1]  # none of the old run's
    assert (out / MARKER_FILE).is_file()


@pytest.mark.parametrize("value, why", [
    ("", "it is empty"), (".", "it is the current directory"), ("CWD", "it is the current directory"),
    ("..", "it holds the current directory"), ("/", "root of the file system"), ("~", "it is your home directory"),
    ("HOME", "it is your home directory"),
])
def test_directories_that_can_never_hold_a_run(value, why, tmp_path, monkeypatch, tiny_model_dir, texts_file, capsys):
    home, cwd = tmp_path / "home", tmp_path / "home" / "work" / "project"
    cwd.mkdir(parents=True)
    (cwd / "config.yaml").write_text("mine\n")  # what once made --overwrite take the directory for a run
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    value = {"CWD": str(cwd), "HOME": str(home), "~": "'~'"}.get(value, value)  # quoted: a bare ~ is YAML's null
    before = snapshot(home)
    code = main(train_args(tiny_model_dir, texts_file, "x", "--overwrite", f"output_dir={value}"))
    refused(code, capsys.readouterr().err, "can never hold a run", why)
    assert snapshot(home) == before


def test_tilde_in_output_dir_is_the_home_directory(tmp_path, monkeypatch, tiny_model_dir, texts_file):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert main(train_args(tiny_model_dir, texts_file, "~/runs/r", "train.max_steps=1")) == 0
    assert (tmp_path / "home" / "runs" / "r" / "summary.json").is_file()
    assert not Path("~").exists()


# ---------------------------------------------------------------- 2/3. lock first, then decide, then replace


def test_overwrite_of_a_run_in_progress_is_refused_and_deletes_nothing(run, tmp_path, tiny_model_dir, texts_file, capsys):
    busy = tmp_path / "run"
    shutil.copytree(run, busy)
    with open(busy / ".lorafit.lock", "a") as held:  # the other process's lock (a finished run has none)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = snapshot(busy)
        code = main(train_args(tiny_model_dir, texts_file, busy, "--overwrite"))
    refused(code, capsys.readouterr().err, "Another lorafit process is using")
    assert snapshot(busy) == before


def test_a_run_that_arrives_during_set_up_is_seen_under_the_lock(tmp_path, tiny_model_dir, texts_file, monkeypatch, capsys):
    """Two runs started together into one new output_dir: both pass the early check; the one that takes the
    lock second must find the other's run and stop, leaving it exactly as it is (no mixed files)."""
    import lorafit.train

    out = tmp_path / "run"
    real_setup, other = lorafit.train.setup, {}

    def setup_while_another_run_finishes(cfg, run, *rest):
        trainer = real_setup(cfg, run, *rest)
        if not other:  # the other process wins the race while this one loads the model
            monkeypatch.setattr(lorafit.train, "setup", real_setup)
            other["code"] = main(train_args(tiny_model_dir, texts_file, out, "train.max_steps=1"))
            other["files"] = snapshot(out)
        return trainer

    monkeypatch.setattr(lorafit.train, "setup", setup_while_another_run_finishes)
    code = main(train_args(tiny_model_dir, texts_file, out))
    assert other["code"] == 0
    refused(code, capsys.readouterr().err, "already holds a run")
    assert snapshot(out) == other["files"]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 1


# ---------------------------------------------------------------- 4. a full disk while saving


DISK_FULL_SAFETENSORS = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


@pytest.mark.parametrize("writer", ["adapter-weights", "tokenizer"])
def test_a_full_disk_during_the_adapter_save_names_the_newest_checkpoint(writer, tmp_path, tiny_model_dir, texts_file,
                                                                         monkeypatch, capsys):
    import peft.peft_model
    from safetensors import SafetensorError
    from transformers import PreTrainedTokenizerBase

    owner, name = (PreTrainedTokenizerBase, "save_pretrained") if writer == "tokenizer" else (peft.peft_model, "safe_save_file")
    real, disk = getattr(owner, name), {"full": True}

    def writes(*a, **k):
        if not disk["full"]:
            return real(*a, **k)
        if writer == "tokenizer":
            raise Exception("No space left on device (os error 28)")  # what the Rust tokenizer raises
        raise SafetensorError(DISK_FULL_SAFETENSORS)

    monkeypatch.setattr(owner, name, writes)
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, texts_file, out, "train.max_steps=1")
    code = main(args)
    refused(code, capsys.readouterr().err, "the disk is full", f"{out / 'checkpoints' / 'step-1'}", "--resume")
    assert not (out / "adapter").exists() and not [p for p in out.iterdir() if ".tmp-" in p.name]
    disk["full"] = False
    assert main([*args, "--resume"]) == 0 and (out / "adapter" / "adapter_model.safetensors").is_file()


def test_a_full_disk_while_logging_names_the_newest_checkpoint(tmp_path, tiny_model_dir, texts_file, monkeypatch, capsys):
    import errno

    from lorafit.rundir import RunDir

    real_append, calls = RunDir.append_metrics, []

    def append_metrics(self, record):
        calls.append(record)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.file("metrics.jsonl")))
        real_append(self, record)

    monkeypatch.setattr(RunDir, "append_metrics", append_metrics)
    out = tmp_path / "run"
    refused(main(train_args(tiny_model_dir, texts_file, out, "train.max_steps=2")), capsys.readouterr().err,
            "the disk is full", f"{out / 'checkpoints' / 'step-1'}", "--resume")


# ---------------------------------------------------------------- 5/6. resume: other settings, other data


def test_resume_may_change_what_does_not_change_training_and_records_it(run, tmp_path, tiny_model_dir, texts_file, capsys):
    out = unfinished_copy(run, tmp_path / "run", newest_step=1)
    changed = ["train.log_every=2", "train.save_every=2", "eval.sample_prompt=The", "eval.sample_max_new_tokens=3"]
    assert main(train_args(tiny_model_dir, texts_file, out, *changed, "--resume")) == 0
    assert "settings changed on resume" in capsys.readouterr().err
    # the training is the one the run started: the adapter is bitwise that of the uninterrupted run
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == (run / "adapter" / "adapter_model.safetensors").read_bytes()
    (resume,) = json.loads((out / MARKER_FILE).read_text())["resumes"]
    assert resume["step"] == 1
    assert resume["changed"]["train.log_every"] == [1, 2] and resume["changed"]["eval.sample_prompt"] == [None, "The"]
    assert yaml.safe_load((out / "config.yaml").read_text())["eval"]["sample_max_new_tokens"] == 3
    assert "sample" in [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]


def test_resume_still_refuses_a_change_of_the_training(run, tmp_path, tiny_model_dir, texts_file, capsys):
    out = unfinished_copy(run, tmp_path / "run")
    before = snapshot(out)
    code = main(train_args(tiny_model_dir, texts_file, out, "train.lr=1e-3", "eval.max_examples=5", "--resume"))
    err = capsys.readouterr().err
    refused(code, err, "the config differs", "train.lr: 0.0002 in the run, 0.001 now")
    assert "eval.max_examples" not in err
    assert snapshot(out) == before


def data_moved_in_checkpoint(run: Path, old: Path, new: Path) -> None:
    """The checkpoints' own record of the config with the data's path changed too, as if the file had been
    edited in place: a changed path alone is refused by the config check (test_resume.py::
    test_a_hand_edited_config_yaml_is_refused_on_resume); what is tested here is the data fingerprint."""
    for _, step_dir in ckpt.list_checkpoints(run / "checkpoints"):
        state = (step_dir / ckpt.STATE).read_text()
        (step_dir / ckpt.STATE).write_text(state.replace(json.dumps(str(old))[1:-1], json.dumps(str(new))[1:-1]))


def test_resume_on_other_data_with_as_many_rows_is_refused(run, tmp_path, tiny_model_dir, texts_file, capsys):
    out = unfinished_copy(run, tmp_path / "run")
    other = tmp_path / "other.jsonl"  # the run's data file, as if edited since: as many rows, other text
    rows = [json.loads(line) for line in texts_file.read_text().splitlines()]
    other.write_text("".join(json.dumps({**r, "quote": r["quote"].upper()}) + "\n" for r in rows))
    config = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(config.replace(str(texts_file), str(other)))
    data_moved_in_checkpoint(out, texts_file, other)
    before = snapshot(out)
    code = main(train_args(tiny_model_dir, other, out, "--resume"))
    refused(code, capsys.readouterr().err, "was trained on other data", "training examples differ", "--overwrite")
    assert snapshot(out) == before


@pytest.mark.parametrize("override, named", [
    ("lora.r=4", "lora.r: 8 in the run, 4 now"),
    ("lora.targets=[c_attn, c_proj]", "lora.targets: 'auto' in the run, ['c_attn', 'c_proj'] now"),
    ("train.warmup_steps=2", "train.warmup_steps: 0 in the run, 2 now"),
    ("data.seq_len=32", "data.seq_len: 64 in the run, 32 now"),
], ids=["lora.r", "lora.targets", "train.warmup_steps", "data.seq_len"])
def test_resume_refuses_a_changed_training_setting_and_names_it(override, named, run, tmp_path, tiny_model_dir,
                                                                 texts_file, capsys):
    out = unfinished_copy(run, tmp_path / "run")
    before = snapshot(out)
    code = main(train_args(tiny_model_dir, texts_file, out, override, "--resume"))
    refused(code, capsys.readouterr().err, "the config differs", named, "--overwrite")
    assert snapshot(out) == before


def test_resume_on_other_validation_data_is_refused(run, tmp_path, tiny_model_dir, texts_file, capsys):
    """Only the held-out rows edited: the training examples are the checkpoint's, the validation ones are not."""
    from lorafit.data.sources import split_indices

    out = unfinished_copy(run, tmp_path / "run")
    rows = [json.loads(line) for line in texts_file.read_text().splitlines()]
    _, val = split_indices(len(rows), 0.1, 42)  # the quotes recipe's split
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({**r, "quote": r["quote"].upper()} if i in set(val.tolist()) else r) + "\n"
                             for i, r in enumerate(rows)))
    (out / "config.yaml").write_text((out / "config.yaml").read_text().replace(str(texts_file), str(other)))
    data_moved_in_checkpoint(out, texts_file, other)
    before = snapshot(out)
    code = main(train_args(tiny_model_dir, other, out, "--resume"))
    refused(code, capsys.readouterr().err, "was trained on other data", "validation examples differ", "--overwrite")
    assert snapshot(out) == before


# ---------------------------------------------------------------- 7. lorafit generate


@pytest.mark.parametrize("args, fragments", [
    (["--max-new-tokens", "0"], ["--max-new-tokens must be at least 1, got 0"]),
    (["--max-new-tokens", "-5"], ["--max-new-tokens must be at least 1, got -5"]),
    (["--max-new-tokens", "100000"], ["--max-new-tokens=100000", "context of 256 positions", "or less"]),
    (["--temperature", "-1"], ["--temperature must be a finite number >= 0"]),
    (["--temperature", "nan"], ["--temperature must be a finite number >= 0", "got nan"]),
    (["--top-p", "0"], ["--top-p must be in (0, 1], got 0.0"]),
    (["--top-p", "1.5"], ["--top-p must be in (0, 1], got 1.5"]),
    (["--top-p", "nan"], ["--top-p must be in (0, 1], got nan"]),
    (["--top-k", "-1"], ["--top-k must be >= 0"]),
    (["--num-return-sequences", "0"], ["--num-return-sequences must be at least 1, got 0"]),
    (["--num-return-sequences", "2", "--temperature", "0"], ["needs sampling"]),
    (["--num-return-sequences", "20000"], ["--num-return-sequences must be at most 128", "got 20000"]),
    (["--seed", "-1"], ["--seed must be in [0, 2^63), got -1"]),
    (["--prompt-too-long"], ["the prompt is 300 tokens", "256 positions"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("--") else None)
def test_generate_refuses_what_it_cannot_do(args, fragments, run, capsys):
    prompts = ["x" * 300] if args == ["--prompt-too-long"] else ["Hello"]  # no merge joins x's: 300 tokens
    args = [] if args == ["--prompt-too-long"] else args
    code = main(["generate", str(run), *prompts, *args])
    captured = capsys.readouterr()
    refused(code, captured.err, *fragments)
    assert captured.out == ""


def test_generate_from_an_empty_prompt_and_with_markup_in_prompts_and_outputs(run, capsys, monkeypatch):
    assert main(["generate", str(run), "", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert main(["generate", str(run), "[/i] and [b]bold[/b] [red]", "--max-new-tokens", "2", "--top-k", "0"]) == 0
    assert "[/i] and [b]bold[/b] [red]" in capsys.readouterr().out
    import lorafit.generate

    monkeypatch.setattr(lorafit.generate, "sample", lambda *a, **k: [" [/i]out[b]"])
    monkeypatch.setattr(lorafit.generate, "sample_base", lambda *a, **k: [" [/b]base"])
    assert main(["generate", str(run), "[i]p", "--max-new-tokens", "2"]) == 0
    assert "[i]p [/i]out[b]" in capsys.readouterr().out
    assert main(["generate", str(run), "[i]p", "--max-new-tokens", "2", "--compare-base"]) == 0
    out = capsys.readouterr().out
    assert "[i]p [/b]base" in out and "[i]p [/i]out[b]" in out


# ---------------------------------------------------------------- 8. recipes that cost minutes, or crash


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    from lorafit.config import load_config

    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")  # 10^9 strings expanded
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    with pytest.raises(LorafitError) as info:
        load_config(str(recipe))
    assert time.perf_counter() - start < 2
    assert "holds more than 10,000 values" in str(info.value) and len(str(info.value)) < 500


@pytest.mark.parametrize("content, fragment", [
    (b"train:\n  lr: caf\xe9\n", "is not UTF-8 text (byte offset 16"),
    (b"train:\n  seed: " + b"9" * 5000 + b"\n", "a number in it has thousands of digits"),
    (b"model:\n  name: " + b"[" * 700 + b"]" * 700 + b"\n", "nested too deeply"),
    (b"train:\n  lr: " + b"x" * 1_000_000 + b"\n", "train.lr: expected a number, got 'xxxxxxxx"),
    (b"eval:\n  sample_prompt: [" + b"x, " * 10_001 + b"x]\n", "holds more than 10,000 values"),
], ids=["latin1", "huge-integer", "deep", "huge-value", "huge-list"])
def test_recipe_files_that_once_crashed_or_flooded_the_terminal(content, fragment, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(content)
    code = main(["train", str(recipe)])
    err = capsys.readouterr().err
    refused(code, err, fragment)
    assert len(err) < 2000


# ---------------------------------------------------------------- 9. a line of many megabytes


def test_a_huge_line_is_cut_before_tokenising_and_keeps_exactly_the_first_tokens(tiny_tokenizer, monkeypatch):
    import random

    from lorafit.data import tokenize as tk

    rng = random.Random(0)
    pieces = ["the", " a", "  ", "   ", "\n", "\n\n ", "12", " 345", ",", "é", "😀", "'s", " word", "xyz"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(50, 1500))) for _ in range(100)]
    huge = "the quick brown fox " * 100_000  # 2 MB, one line
    seen = []
    real_call = type(tiny_tokenizer).__call__

    def recording(self, batch, *a, **k):
        seen.extend(len(t) for t in (batch if isinstance(batch, list) else [batch]))
        return real_call(self, batch, *a, **k)

    monkeypatch.setattr(type(tiny_tokenizer), "__call__", recording)
    for seq_len in (8, 64):
        seen.clear()
        got = tk.tokenize_texts([huge, *texts], [0] * (len(texts) + 1), tiny_tokenizer, seq_len, "truncate")
        assert max(seen) <= seq_len * tk.CHARS_PER_TOKEN  # the 2 MB line never reached the tokenizer whole
        # The reference: tokenise the whole text, then truncate (for the repeated line, a prefix of 100
        # characters a token, cut at a word boundary, stands in for the whole: 2 MB would take seconds).
        for i, text in enumerate([huge[: seq_len * 100], *texts]):
            full = [*real_call(tiny_tokenizer, text, add_special_tokens=False)["input_ids"], tiny_tokenizer.eos_token_id]
            assert got.example(i).tolist() == full[:seq_len], (seq_len, i)
        assert got.truncated.all()
        seen.clear()
        kept = tk.tokenize_texts([huge, *texts], [0] * (len(texts) + 1), tiny_tokenizer, seq_len, "drop")
        assert max(seen) <= seq_len * tk.CHARS_PER_TOKEN
        assert kept.ids.tolist() == [t for text in texts if len(full := [*real_call(
            tiny_tokenizer, text, add_special_tokens=False)["input_ids"], tiny_tokenizer.eos_token_id]) <= seq_len for t in full]


# ---------------------------------------------------------------- 10. tampered files, Ctrl-C twice, init-model


@pytest.mark.parametrize("content", ['{"step": "one"}', "[1, 2]", "{not json"], ids=["wrong-values", "not-an-object", "not-json"])
def test_a_tampered_state_json_is_reported_as_unreadable(content, run, tmp_path, tiny_model_dir, texts_file, capsys):
    out = unfinished_copy(run, tmp_path / "run")
    newest = ckpt.list_checkpoints(out / "checkpoints")[-1][1]
    (newest / ckpt.STATE).write_text(content)
    code = main(train_args(tiny_model_dir, texts_file, out, "--resume"))
    refused(code, capsys.readouterr().err, f"Checkpoint {newest} is unreadable", "Delete it")


def test_a_tampered_summary_or_metrics_file_on_resume(run, tmp_path, tiny_model_dir, texts_file, capsys):
    finished = tmp_path / "finished"
    shutil.copytree(run, finished)
    (finished / "summary.json").write_text("{cut")
    refused(main(train_args(tiny_model_dir, texts_file, finished, "--resume")), capsys.readouterr().err,
            "summary.json is unreadable", "Delete it", "--resume")
    out = unfinished_copy(run, tmp_path / "run", newest_step=3)
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'\xff\xfe[1, 2]\n[3]\n{"no": "step"}\n')  # damaged bytes, and lines that are no records
    assert main(train_args(tiny_model_dir, texts_file, out, "--resume")) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 3]


@pytest.mark.parametrize("name, content", [
    ("adapter_config.json", "{cut sho"), ("adapter_config.json", "[]"), ("lorafit_base.json", "\xff\xfe"),
    ("lorafit_base.json", '"a string"'),
])
def test_a_tampered_adapter_file_is_reported_as_unreadable(name, content, run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "adapter" / name).write_text(content, encoding="latin-1")
    code = main(["generate", str(copy), "Hello", "--max-new-tokens", "2"])
    refused(code, capsys.readouterr().err, f"{copy / 'adapter' / name} is unreadable", "--resume")


def test_init_model_with_an_empty_or_foreign_tokenizer_directory(tmp_path, capsys):
    empty, foreign = tmp_path / "empty", tmp_path / "foreign"
    empty.mkdir()
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a tokenizer")
    refused(main(["init-model", "--config", "tiny", "--tokenizer", str(empty), str(tmp_path / "m")]),
            capsys.readouterr().err, "is empty")
    refused(main(["init-model", "--config", "tiny", "--tokenizer", str(foreign), str(tmp_path / "m")]),
            capsys.readouterr().err, "holds no tokenizer that loads", "vocab.json + merges.txt")
    assert not (tmp_path / "m").exists()


def test_a_model_directory_without_weights_gets_a_complete_message(tmp_path, tiny_model_dir, texts_file, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").unlink()
    code = main(train_args(model, texts_file, tmp_path / "out"))
    err = capsys.readouterr().err
    refused(code, err, "holds no weights", "config.json", "lorafit init-model")
    assert err.rstrip().endswith(".")


SHUTDOWN_DRIVER = r"""
import atexit, os, time
from pathlib import Path
from lorafit import train

real_step = train.Trainer.train_step
def slow_step(self):
    time.sleep(0.3)
    return real_step(self)
train.Trainer.train_step = slow_step

def slow_shutdown():  # a process that takes its time to exit: the second Ctrl-C lands here
    Path(os.environ["IN_SHUTDOWN"]).touch()
    time.sleep(30)
atexit.register(slow_shutdown)

from lorafit.__main__ import run
run()
"""


def test_a_second_ctrl_c_during_shutdown_ends_quietly(tmp_path, tiny_model_dir, texts_file):
    out, flag = tmp_path / "run", tmp_path / "in-shutdown"
    env = {**os.environ, "IN_SHUTDOWN": str(flag)}
    args = train_args(tiny_model_dir, texts_file, out, "train.max_steps=100")
    proc = subprocess.Popen([sys.executable, "-c", SHUTDOWN_DRIVER, *args], stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    while not flag.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)  # at once, not after the 30 s the shutdown would take
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Resume with:" in err
    assert ckpt.list_checkpoints(out / "checkpoints")


# ---------------------------------------------------------------- issue 21: --overwrite deletes only what lorafit wrote


def test_overwrite_refuses_files_of_the_user_inside_the_run_s_directories(run, tmp_path, tiny_model_dir, texts_file, capsys):
    mixed = tmp_path / "run"
    shutil.copytree(run, mixed)
    (mixed / "eval").mkdir()
    (mixed / "eval" / "notes.txt").write_text("mine\n")
    (mixed / "adapter" / "my_backup").mkdir()
    (mixed / "adapter" / "my_backup" / "adapter_model.safetensors").write_bytes(b"an older adapter")
    (mixed / "checkpoints" / "step-2" / "NOTES.txt").write_text("step 2 was the good one\n")
    before = snapshot(mixed)
    code = main(train_args(tiny_model_dir, texts_file, mixed, "--overwrite"))
    refused(code, capsys.readouterr().err, "--overwrite refused", "adapter/my_backup/", "checkpoints/step-2/NOTES.txt",
            "eval/notes.txt", "which no run writes")
    assert snapshot(mixed) == before


def test_overwrite_names_at_most_ten_foreign_paths(run, tmp_path, tiny_model_dir, texts_file, capsys):
    mixed = tmp_path / "run"
    shutil.copytree(run, mixed)
    for i in range(12):
        (mixed / "adapter" / f"mine-{i:02d}.txt").write_text("mine\n")
    code = main(train_args(tiny_model_dir, texts_file, mixed, "--overwrite"))
    err = capsys.readouterr().err
    refused(code, err, "adapter/mine-00.txt", "adapter/mine-09.txt", "(and 2 more)")
    assert "mine-10" not in err


def test_the_manifest_lists_what_lorafit_wrote_and_only_that(run):
    from lorafit.rundir import MANIFEST_FILE, RunDir

    files = set(json.loads((run / MANIFEST_FILE).read_text())["files"])
    on_disk = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()} - {MARKER_FILE, MANIFEST_FILE}
    assert on_disk <= files  # every file of the run was recorded when it was written
    assert {"config.yaml", "metrics.jsonl", "summary.json", "adapter/adapter_model.safetensors",
            "checkpoints/step-3/state.json"} <= files
    assert RunDir(run).foreign_entries() == []


def test_checkpoint_rotation_leaves_the_user_s_files(tmp_path):
    model, optimizer, scheduler = tiny_state()
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, model, optimizer, scheduler, {}, keep=5)
    (tmp_path / "step-1" / "NOTES.txt").write_text("mine\n")
    ckpt.save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {}, keep=1)
    assert (tmp_path / "step-1" / "NOTES.txt").read_text() == "mine\n"
    assert sorted(p.name for p in (tmp_path / "step-1").iterdir()) == ["NOTES.txt"]  # lorafit's files are gone
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3]


def tiny_state():
    import torch

    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model, optimizer, scheduler


def test_a_resumed_run_s_new_adapter_keeps_the_user_s_files_in_adapter(run, tmp_path, tiny_model_dir, texts_file):
    """The final save replaces adapter/ whole (atomically): files of the user's inside it are carried over, never
    deleted, and stay out of the manifest (so --overwrite still refuses to delete them)."""
    from lorafit.rundir import MANIFEST_FILE

    extended = tmp_path / "run"
    shutil.copytree(run, extended)
    (extended / "adapter" / "my_backup").mkdir()
    (extended / "adapter" / "my_backup" / "old.safetensors").write_bytes(b"an older adapter")
    (extended / "adapter" / "NOTES.txt").write_text("mine\n")
    old_weights = (extended / "adapter" / "adapter_model.safetensors").read_bytes()
    assert main(train_args(tiny_model_dir, texts_file, extended, "train.max_steps=4", "--resume")) == 0
    assert (extended / "adapter" / "adapter_model.safetensors").read_bytes() != old_weights  # a new adapter
    assert (extended / "adapter" / "NOTES.txt").read_text() == "mine\n"
    assert (extended / "adapter" / "my_backup" / "old.safetensors").read_bytes() == b"an older adapter"
    files = set(json.loads((extended / MANIFEST_FILE).read_text())["files"])
    assert "adapter/NOTES.txt" not in files and "adapter/my_backup/old.safetensors" not in files
    assert "adapter/adapter_model.safetensors" in files


def test_a_huge_single_word_is_cut_inside_itself_before_tokenising(tiny_tokenizer, monkeypatch):
    """A 2 MB "word" of one letter has no pre-token boundary to cut at: before, it reached BPE whole (a 200 MB
    one took over 7 GB). Now no text of more than a bounded size reaches the tokenizer, text that fits is
    untouched, and the kept tokens are those of tokenising a long prefix of the word."""
    from lorafit.data import tokenize as tk

    real_call = type(tiny_tokenizer).__call__
    seen = []

    def recording(self, batch, *a, **k):
        seen.extend(len(t) for t in (batch if isinstance(batch, list) else [batch]))
        return real_call(self, batch, *a, **k)

    monkeypatch.setattr(type(tiny_tokenizer), "__call__", recording)
    seq_len = 16
    word = "a" * 2_000_000
    fits = "aaaa bbb"  # short: never cut
    texts = [word, "hello world " + word, " " * 2_000_000 + "x", fits]
    got = tk.tokenize_texts(texts, [0] * len(texts), tiny_tokenizer, seq_len, "truncate")
    assert max(seen) <= 200_000, max(seen)  # bounded (seq_len x the longest token, doubled), never the 2 MB
    for i, text in enumerate(texts[:3]):
        reference = real_call(tiny_tokenizer, text[:100_000], add_special_tokens=False)["input_ids"]
        assert got.example(i).tolist() == reference[:seq_len], i
    assert got.example(3).tolist() == [*real_call(tiny_tokenizer, fits, add_special_tokens=False)["input_ids"],
                                       tiny_tokenizer.eos_token_id]
    assert got.truncated.tolist() == [True, True, True, False]
    seen.clear()
    dropped = tk.tokenize_texts(texts, [0] * len(texts), tiny_tokenizer, seq_len, "drop")
    assert max(seen) <= 200_000 and len(dropped) == 1


def test_a_checkpoint_file_torch_refuses_to_unpickle_keeps_the_warning(tmp_path):
    """torch's weights_only refusal starts by suggesting weights_only=False and warns about code execution only
    after: cut to its first 200 characters, the message kept the advice and lost the warning."""
    import torch

    class RunsCode:
        def __reduce__(self):
            return (os.getcwd, ())

    step = tmp_path / "checkpoints" / "step-2"
    step.mkdir(parents=True)
    torch.save({"state": RunsCode()}, step / ckpt.OPTIMIZER)
    with pytest.raises(Exception) as refused_load:
        torch.load(step / ckpt.OPTIMIZER, weights_only=True)
    message = str(ckpt.unreadable(step / ckpt.OPTIMIZER, refused_load.value))
    assert f"Checkpoint {step} is unreadable (optimizer.pt" in message
    assert "arbitrary code" in message and "getcwd" in message and "Delete it" in message
    assert "weights_only` set to `False` will likely succeed" not in message


def test_a_generate_prompt_not_in_utf8_is_one_message(run, capsys):
    """argv hands bytes that are not UTF-8 over as lone surrogates; the tokenizer then raised a traceback."""
    code = main(["generate", str(run), "fine", "caf\udce9", "--max-new-tokens", "2"])
    refused(code, capsys.readouterr().err, "prompt 2: byte 0xe9 at character 4 is not valid UTF-8")

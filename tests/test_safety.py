"""Safety: adapters never load onto a base they do not fit, no file is unpickled, no foreign code
runs, numerical faults stop the run cleanly, and existing directories are never clobbered."""

from __future__ import annotations

import builtins
import fcntl
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafit import checkpoint as ckpt
from lorafit.cli import main
from lorafit.errors import LorafitError
from lorafit.generate import load_for_inference
from lorafit.lora import BASE_SIGNATURE

QUICK = ["train.max_steps=3", "train.save_every=1", "train.log_every=1", "eval.before_training=false",
         "eval.sample_prompt=null", "--no-progress"]


def train_args(model, data, out, *extra) -> list[str]:
    return ["train", "quotes", f"model.name={model}", f"data.sources.quotes.path={data}", f"output_dir={out}", *QUICK, *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, texts_file) -> Path:
    out = tmp_path_factory.mktemp("safety") / "run"
    assert main(train_args(tiny_model_dir, texts_file, out)) == 0
    return out


class Payload:
    """Unpickling this creates `marker`: proof that a file was unpickled with full pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


def assert_clean_failure(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# ---------------------------------------------------------------- adapter onto the wrong base


def save_base(path: Path, arch: str = "gpt2", **sizes) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(**{"vocab_size": 267, "n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 256, **sizes})
        GPT2LMHeadModel(config).save_pretrained(str(path))
    else:
        config = LlamaConfig(vocab_size=267, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
        LlamaForCausalLM(config).save_pretrained(str(path))
    return path


@pytest.mark.parametrize(
    "arch, sizes, signature, fragments",
    [
        ("gpt2", {"n_embd": 32}, True, ["hidden_size 64 vs 32"]),
        ("gpt2", {"vocab_size": 300}, True, ["vocab_size 267 vs 300"]),
        ("llama", {}, True, ["model_type gpt2 vs llama"]),
        ("gpt2", {"n_layer": 3}, False, ["missing from the adapter", "transformer.h.2.attn.c_attn.lora_A.weight"]),
        ("gpt2", {"n_layer": 1}, False, ["not in the base", "transformer.h.1.attn.c_attn.lora_A.weight"]),
        ("gpt2", {"n_embd": 32}, False, ["shape (adapter vs base)", "(8, 64) vs (8, 32)"]),
        ("llama", {}, False, ["c_attn"]),
    ],
    ids=["sizes", "vocabulary", "architecture", "plain-peft-missing-keys", "plain-peft-unexpected-keys",
         "plain-peft-shapes", "plain-peft-architecture"],
)
def test_adapter_on_a_base_it_was_not_trained_for_names_both(run, tmp_path, tiny_model_dir, arch, sizes, signature, fragments):
    adapter = tmp_path / "adapter"
    shutil.copytree(run / "adapter", adapter)
    if not signature:  # a plain PEFT adapter: only its keys and shapes can tell
        (adapter / BASE_SIGNATURE).unlink()
    base = save_base(tmp_path / "other-base", arch, **sizes)
    with pytest.raises(LorafitError) as info:
        load_for_inference(adapter, base=str(base), precision="fp32", device=torch.device("cpu"))
    message = str(info.value)
    for fragment in [f"trained on base '{Path(tiny_model_dir).resolve()}'", f"given base '{base}'", *fragments]:
        assert fragment in message, (fragment, message)


def test_generate_with_a_wrong_base_exits_2(run, tmp_path, capsys):
    base = save_base(tmp_path / "other-base", vocab_size=300)
    code = main(["generate", str(run), "Hello", "--base", str(base), "--max-new-tokens", "2"])
    assert_clean_failure(code, capsys.readouterr().err, "does not fit the given base", "vocab_size")


# ---------------------------------------------------------------- no pickle, no foreign code


def test_a_base_with_only_pickled_weights_is_refused_unopened(tmp_path, tiny_model_dir, texts_file, capsys):
    base = tmp_path / "pickled-base"
    shutil.copytree(tiny_model_dir, base)
    (base / "model.safetensors").unlink()
    torch.save({"weights": Payload(tmp_path / "unpickled")}, base / "pytorch_model.bin")
    code = main(train_args(base, texts_file, tmp_path / "out"))
    assert_clean_failure(code, capsys.readouterr().err, "no .safetensors weights", "safetensors")
    assert not (tmp_path / "unpickled").exists()


def test_a_tampered_checkpoint_is_never_unpickled(run, tmp_path, tiny_model_dir, texts_file, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "summary.json").unlink()  # not finished: --resume loads the newest checkpoint
    newest = ckpt.list_checkpoints(copy / "checkpoints")[-1][1]
    torch.save({"state": Payload(tmp_path / "unpickled")}, newest / ckpt.OPTIMIZER)
    code = main(train_args(tiny_model_dir, texts_file, copy, "--resume"))
    assert_clean_failure(code, capsys.readouterr().err, f"Checkpoint {newest} is unreadable", "Delete it")
    assert not (tmp_path / "unpickled").exists()


def test_an_adapter_with_only_pickled_weights_is_refused(run, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(run / "adapter", adapter)
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({"w": Payload(tmp_path / "unpickled")}, adapter / "adapter_model.bin")
    code = main(["generate", str(adapter), "Hello", "--max-new-tokens", "2"])
    assert_clean_failure(code, capsys.readouterr().err, "only from safetensors")
    assert not (tmp_path / "unpickled").exists()


def test_remote_code_never_runs_unless_trusted(tmp_path, tiny_model_dir, texts_file, capsys):
    model = tmp_path / "custom-model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="custom-arch", auto_map={"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "custom.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    code = main(train_args(model, texts_file, tmp_path / "out"))
    assert_clean_failure(code, capsys.readouterr().err, "model.trust_remote_code=true")
    assert not (tmp_path / "ran").exists()


# ---------------------------------------------------------------- numerical faults


def test_a_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, texts_file, capsys):
    out = tmp_path / "run"
    code = main(train_args(tiny_model_dir, texts_file, out, "train.lr=1e30", "train.max_steps=6"))
    err = capsys.readouterr().err
    assert_clean_failure(code, err, "Non-finite loss or gradient at step", "train.lr", "fp16", "train.skip_nonfinite")
    bad_step = int(err.split("Non-finite loss or gradient at step ")[1].split()[0])
    newest_step, newest = ckpt.list_checkpoints(out / "checkpoints")[-1]
    assert newest_step == bad_step - 1 and f"{newest}, is the newest" in err
    assert all(torch.isfinite(t).all() for t in load_file(str(newest / ckpt.WEIGHTS)).values())


def test_skip_nonfinite_skips_and_counts(tmp_path, tiny_model_dir, texts_file, monkeypatch):
    from lorafit.forward import Forward

    real, training_calls = Forward.token_nll, []

    def nan_on_step_two(self, batch):
        nll, example = real(self, batch)
        if torch.is_grad_enabled():
            training_calls.append(1)
            if len(training_calls) == 2:
                nll = nll * float("nan")
        return nll, example

    monkeypatch.setattr(Forward, "token_nll", nan_on_step_two)
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, texts_file, out, "train.skip_nonfinite=true", "train.log_every=2",
                           "train.max_steps=4")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nonfinite_steps_skipped"] == 1 and summary["optimizer_steps"] == 4
    losses = [json.loads(line).get("loss") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x for x in losses if x is not None] and all(math.isfinite(x) for x in losses if x is not None)
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "adapter" / "adapter_model.safetensors")).values())


# ---------------------------------------------------------------- existing directories


def test_an_existing_run_needs_resume_or_overwrite(run, tiny_model_dir, texts_file, capsys):
    code = main(train_args(tiny_model_dir, texts_file, run))
    assert_clean_failure(code, capsys.readouterr().err, "already holds a run", "--resume", "--overwrite")


def test_overwrite_never_deletes_a_directory_that_is_not_a_run(tmp_path, tiny_model_dir, texts_file, capsys):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    code = main(train_args(tiny_model_dir, texts_file, precious, "--overwrite"))
    assert_clean_failure(code, capsys.readouterr().err, "holds no lorafit run")
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_a_run_in_use_by_another_process_is_refused(run, tmp_path, tiny_model_dir, texts_file, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "summary.json").unlink()
    with open(copy / ".lorafit.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code = main(train_args(tiny_model_dir, texts_file, copy, "--resume"))
    assert_clean_failure(code, capsys.readouterr().err, "Another lorafit process is using")


# ---------------------------------------------------------------- issue 21: foreign code and the base's identity


def remote_code_base(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A copy of the tiny base that asks for its own code; running that code creates tmp_path/ran."""
    model = tmp_path / "custom-model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="custom-arch", auto_map={"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "custom.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    return model


@pytest.mark.parametrize("command", ["generate", "merge", "eval", "serve"])
def test_an_adapter_cannot_switch_on_remote_code(command, run, tmp_path, tiny_model_dir, capsys):
    """A downloaded adapter whose lorafit_base.json says trust_remote_code: true runs no code: the flag is the
    user's alone, and the refusal names it."""
    base = remote_code_base(tmp_path, tiny_model_dir)
    adapter = tmp_path / "downloaded"
    shutil.copytree(run / "adapter", adapter)
    record = json.loads((adapter / BASE_SIGNATURE).read_text())
    record["load"].update(resolved=str(base), name=str(base), trust_remote_code=True)
    (adapter / BASE_SIGNATURE).write_text(json.dumps(record))
    if command == "serve":
        from lorafit.serve.models import ModelHost

        with pytest.raises(LorafitError, match="--trust-remote-code"):
            ModelHost([("a", str(adapter))])
    else:
        args = {"generate": ["generate", str(adapter), "Hi", "--max-new-tokens", "2"],
                "merge": ["merge", str(adapter), str(tmp_path / "merged")],
                "eval": ["eval", str(adapter), "--recipe", "quotes"]}[command]
        assert_clean_failure(main(args), capsys.readouterr().err, "trust_remote_code", "pass --trust-remote-code")
    assert not (tmp_path / "ran").exists()
    assert not (tmp_path / "merged").exists()


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A base of the very shapes of tiny_model_dir, with other weights (another seed)."""
    from lorafit.init_model import init_model

    return init_model("tiny", str(tiny_tokenizer_dir), tmp_path_factory.mktemp("other") / "tiny", seed=1)


def test_an_adapter_on_a_base_of_other_weights_is_refused_unless_forced(run, other_weights, capsys):
    record = json.loads((run / "adapter" / BASE_SIGNATURE).read_text())
    assert len(record["base_fingerprint"]["sha256"]) == 64
    args = ["generate", str(run), "Hello", "--base", str(other_weights), "--max-new-tokens", "2", "--temperature", "0"]
    assert_clean_failure(main(args), capsys.readouterr().err, "does not fit the given base", "weights (sha256",
                         "--force-base")
    assert main([*args, "--force-base"]) == 0
    assert "--force-base: using the adapter" in capsys.readouterr().err


def test_serve_refuses_an_adapter_of_other_weights_also_at_run_time(run, other_weights):
    from lorafit.serve.models import ModelHost

    with pytest.raises(LorafitError, match="another base|does not fit"):
        ModelHost([("a", str(run))], base=str(other_weights))
    host = ModelHost([], base=str(other_weights))  # POST /v1/adapters loads through host.add: a 400 (app.load)
    with pytest.raises(LorafitError, match="--force-base"):
        host.add("a", run / "adapter")
    assert not host.adapters
    ModelHost([], base=str(other_weights), force_base=True).add("a", run / "adapter")


def test_an_adapter_of_an_older_lorafit_loads_with_a_warning(run, tmp_path, other_weights, capsys):
    adapter = tmp_path / "old"
    shutil.copytree(run / "adapter", adapter)
    record = json.loads((adapter / BASE_SIGNATURE).read_text())
    del record["base_fingerprint"]
    (adapter / BASE_SIGNATURE).write_text(json.dumps(record))
    assert main(["generate", str(adapter), "Hello", "--max-new-tokens", "2", "--temperature", "0"]) == 0
    assert "records no fingerprint of its base" in capsys.readouterr().err


def test_the_base_fingerprint_is_cached_by_path_size_and_mtime(tiny_model_dir, tmp_path, monkeypatch):
    import os

    from lorafit import fingerprint

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))
    first = fingerprint.local_fingerprint(base)
    cache_file = tmp_path / "cache" / fingerprint.CACHE_FILE
    cache = json.loads(cache_file.read_text())
    (entry,) = cache.values()
    entry["sha256"] = "0" * 64  # a cached hash is used as it is: the file is not read again
    cache_file.write_text(json.dumps(cache))
    assert fingerprint.local_fingerprint(base) != first
    weights = base / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # touched: hashed again
    assert fingerprint.local_fingerprint(base) == first
    monkeypatch.delenv("LORAFIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fingerprint.user_cache_dir() == tmp_path / "xdg" / "lorafit"


def test_fingerprints_with_nothing_in_common_are_a_warning_not_a_silent_pass(capsys):
    """Trained on a Hub id (its commit), loaded from a local copy (a sha256): nothing can be compared, and
    lorafit says so instead of passing the base as checked."""
    from lorafit.lora import check_same_base

    def refuse(why):
        return LorafitError(why)

    check_same_base({"revision": "a" * 40}, {"sha256": "b" * 64}, False, refuse, "the adapter in 'x'")
    assert "cannot check that it has the same weights" in capsys.readouterr().err
    check_same_base({"sha256": "b" * 64}, {"sha256": "b" * 64}, False, refuse, "the adapter in 'x'")
    assert capsys.readouterr().err == ""  # the same weights: nothing to say
    with pytest.raises(LorafitError, match="sha256"):
        check_same_base({"sha256": "b" * 64}, {"sha256": "c" * 64}, False, refuse, "the adapter in 'x'")


# ---------------------------------------------------------------- issue 21: outputs never inside a run's own directories


def test_merge_into_a_run_s_own_directories_is_refused(run, tmp_path, capsys):
    for inside in ("adapter/merged", "checkpoints/merged", "eval/m"):
        code = main(["merge", str(run), str(run / inside)])
        assert_clean_failure(code, capsys.readouterr().err, "which lorafit manages for the run", "would be lost")
        assert not (run / inside).exists()


def test_merge_over_a_symlink_is_refused_and_the_link_kept(run, tmp_path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    assert_clean_failure(main(["merge", str(run), str(link)]), capsys.readouterr().err, "is a symbolic link")
    assert link.is_symlink() and not any(target.iterdir())
    assert [p.name for p in tmp_path.iterdir() if ".old-" in p.name or ".tmp-" in p.name] == []


def test_check_output_path_guards_eval_and_export_outputs(run, tmp_path):
    from lorafit.rundir import check_output_path

    with pytest.raises(LorafitError, match="adapter"):
        check_output_path(run / "adapter", "the evaluation results (eval/)", replaces=False)  # RUN=run/adapter
    with pytest.raises(LorafitError, match="checkpoints"):
        check_output_path(run / "checkpoints" / "step-3" / "model.gguf", "the GGUF file")
    assert check_output_path(run, "the evaluation results (eval/)", replaces=False) == run
    assert check_output_path(tmp_path / "new" / "merged", "the merged model") == tmp_path / "new" / "merged"

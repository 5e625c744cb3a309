"""`lorafit bench` end to end on a tiny model: the JSON it writes, what it compares, and the checks that
keep it from misleading (too few examples, an existing result, single-shot generation numbers)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_texts
from lorafit.cli import main


@pytest.fixture
def quotes(tmp_path, monkeypatch):
    from lorafit.bench import baseline

    monkeypatch.setattr(baseline, "GEN_NEW_TOKENS", 8)  # 70 on the real bench; the repetitions are what is tested
    data = tmp_path / "quotes.jsonl"
    data.write_text("".join(json.dumps({"quote": t}) + "\n" for t in make_texts(120, seed=5, max_words=5)), encoding="utf-8")
    return data


def bench_args(model, tokenizer, data, out, *extra):
    return ["bench", "--warmup-steps", "1", "--model", str(model), "--tokenizer", str(tokenizer), "--data", str(data),
            "--device", "cpu", "--json", str(out), *extra]


def test_bench_smoke_writes_the_documented_json(tmp_path, tiny_model_dir, tiny_tokenizer_dir, quotes, capsys):
    out = tmp_path / "bench.json"
    code = main(bench_args(tiny_model_dir, tiny_tokenizer_dir, quotes, out, "--examples", "32"))
    assert code == 0
    result = json.loads(out.read_text())
    for side in ("baseline", "lorafit"):
        for key in ("examples_per_second", "real_tokens_per_second", "peak_memory_bytes", "val_loss",
                    "eval_samples_per_second", "generation_tokens_per_second_batch1",
                    "generation_tokens_per_second_batch16", "mfu"):
            assert result[side][key] is not None and result[side][key] > 0, (side, key)
        assert result[side]["examples"] == 24  # 4 steps of 8, the first untimed
        # Generation: the median of 3 timed calls (CPU), with the spread beside it.
        for bs in (1, 16):
            spread = result[side][f"generation_tokens_per_second_batch{bs}_spread"]
            assert spread["repetitions"] == 3
            assert spread["min"] <= result[side][f"generation_tokens_per_second_batch{bs}"] <= spread["max"]
    assert "peers" not in result and "speedup_vs" not in result
    # The baseline pads every example to 64 slots: slots/s is far above its real tokens/s on short texts.
    assert result["baseline"]["token_slots_per_second"] > 1.5 * result["baseline"]["real_tokens_per_second"]
    # lorafit on CPU (segment layout) computes no padding at all: every slot is a scored position.
    assert result["lorafit"]["token_slots_per_second"] == result["lorafit"]["real_tokens_per_second"]
    assert result["flop_ceiling"] > 0 and result["flops_per_token"] > 0
    # Trainer's metrics dicts ({'train_runtime': ...}, {'eval_loss': ...}) stay out of the output.
    printed = capsys.readouterr()
    assert "train_runtime" not in printed.out + printed.err and "eval_loss" not in printed.out + printed.err


def test_bench_peers_trl_side_by_side(tmp_path, tiny_model_dir, tiny_tokenizer_dir, quotes, monkeypatch, capsys):
    """`--peers trl`: TRL's SFTTrainer on the same examples, reported beside the others, its val_loss from
    lorafit's evaluator applied to the very model TRL trained."""
    from lorafit.bench import peers, run

    # Longer texts (~2 a packed row of 64, as real quotes): 48 examples make 3 TRL steps, the first untimed.
    quotes.write_text("".join(json.dumps({"quote": t}) + "\n" for t in make_texts(80, seed=5, max_words=18)), encoding="utf-8")

    trained = {}
    real_run_trl = peers.run_trl

    def keep_model(*args, **kwargs):
        res, model, settings = real_run_trl(*args, **kwargs)
        trained["model"] = model
        return res, model, settings

    monkeypatch.setattr(run, "run_trl", keep_model)  # bench.run imports it at its top
    out = tmp_path / "bench.json"
    code = main(bench_args(tiny_model_dir, tiny_tokenizer_dir, quotes, out, "--examples", "48", "--peers", "trl",
                           "--skip-generation", "--skip-eval"))
    assert code == 0
    result = json.loads(out.read_text())
    trl = result["peers"]["trl"]
    for key in ("examples_per_second", "real_tokens_per_second", "peak_memory_bytes", "val_loss"):
        assert trl[key] is not None and trl[key] > 0, key
    # Packing: a row holds one example or more, so a TRL step of 8 rows holds at least lorafit's 8.
    assert trl["optimizer_steps"] >= 1 and 8 * trl["optimizer_steps"] <= trl["examples"] <= 48
    s = trl["settings"]
    assert (s["packing"], s["packing_strategy"], s["padding_free"], s["gradient_checkpointing"]) == (True, "bfd", True, False)
    assert (s["bf16"], s["use_liger_kernel"], s["model_dtype"]) == (False, False, "float32")  # CPU: fp32, no Liger
    assert (s["learning_rate"], s["per_device_train_batch_size"], s["gradient_accumulation_steps"], s["max_length"]) == (2e-4, 4, 2, 64)
    assert s["lora"] == {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["c_attn"]}
    # The val_loss is lorafit's evaluator on the peer's trained model...
    from lorafit.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_tokenizer_dir))
    _, val = run.quotes_split(str(quotes))
    model = trained["model"]
    assert trl["val_loss"] == pytest.approx(run.quotes_evaluator(tokenizer, val, torch.device("cpu"))(model)["val_loss"], rel=1e-6)
    # ... which is the token-weighted NLL of text + EOS, as plain transformers computes it.
    nll = n = 0.0
    model.eval()
    with torch.no_grad():
        for text in val:
            ids = torch.tensor([tokenizer(text)["input_ids"][:63] + [tokenizer.eos_token_id]])
            logits = model(input_ids=ids).logits.double()
            nll += torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
            n += ids.shape[1] - 1
    assert trl["val_loss"] == pytest.approx(nll / n, rel=1e-4)
    printed = capsys.readouterr()
    assert "train_runtime" not in printed.out + printed.err


def test_bench_refuses_too_few_examples_with_the_minimum(tmp_path, tiny_model_dir, tiny_tokenizer_dir, quotes, capsys):
    out = tmp_path / "bench.json"
    assert main(bench_args(tiny_model_dir, tiny_tokenizer_dir, quotes, out, "--examples", "12")) == 2
    err = capsys.readouterr().err
    assert "--examples 12 is too few" in err and "minimum is 16" in err and "Traceback" not in err
    assert main(bench_args(tiny_model_dir, tiny_tokenizer_dir, quotes, out, "--examples", "16", "--peers", "trl")) == 2
    err = capsys.readouterr().err
    assert "too few for --peers trl" in err and "minimum here is about" in err
    assert not out.exists()


def test_bench_never_overwrites_a_result(tmp_path, tiny_model_dir, tiny_tokenizer_dir, quotes, capsys):
    from lorafit.bench.run import free_path, results_path, write_new

    out = tmp_path / "bench.json"
    out.write_text("committed\n")
    assert main(bench_args(tiny_model_dir, tiny_tokenizer_dir, quotes, out, "--examples", "16")) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == "committed\n"
    # The default path: a new name next to the one that is there.
    assert results_path(None, out) == tmp_path / "bench-2.json"
    (tmp_path / "bench-2.json").write_text("second\n")
    assert free_path(out) == tmp_path / "bench-3.json"
    # A file that appears between the check and the write is not replaced either.
    assert write_new(out, "new\n") == tmp_path / "bench-3.json"
    assert out.read_text() == "committed\n" and (tmp_path / "bench-3.json").read_text() == "new\n"


def test_bench_peer_names_are_checked(tmp_path, tiny_model_dir, tiny_tokenizer_dir, quotes, capsys):
    out = tmp_path / "bench.json"
    assert main(bench_args(tiny_model_dir, tiny_tokenizer_dir, quotes, out, "--examples", "32", "--peers", "unsloth")) == 2
    assert "unknown peer unsloth" in capsys.readouterr().err
    assert main(bench_args(tiny_model_dir, tiny_tokenizer_dir, quotes, out, "--examples", "32", "--peers", "trl,liger")) == 2
    assert "need CUDA" in capsys.readouterr().err


def test_bench_names_the_extra_when_trl_is_missing(monkeypatch):
    import importlib.util

    from lorafit.bench.peers import parse_peers
    from lorafit.errors import LorafitError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    with pytest.raises(LorafitError, match=r'pip install -e "\.\[bench\]"'):
        parse_peers("trl", torch.device("cpu"))


def test_bench_names_the_extra_when_accelerate_is_missing(tmp_path, tiny_model_dir, tiny_tokenizer_dir, quotes,
                                                         monkeypatch, capsys):
    """accelerate is not a lorafit dependency: only the re-created original pipeline (transformers' Trainer) needs
    it, so `lorafit bench` says which extra to install, before any work."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    assert main(bench_args(tiny_model_dir, tiny_tokenizer_dir, quotes, tmp_path / "b.json", "--examples", "32")) == 2
    err = capsys.readouterr().err
    assert "needs accelerate" in err and 'pip install -e ".[bench]"' in err and not (tmp_path / "b.json").exists()


def test_generation_rates_one_per_call_each_of_exactly_max_new_tokens(tiny_model_dir, tiny_tokenizer_dir):
    from transformers import AutoModelForCausalLM

    from lorafit.bench.baseline import generation_rates
    from lorafit.modeling import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    calls, real_generate = [], model.generate

    def generate(**kwargs):
        out = real_generate(**kwargs)
        calls.append(out[:, kwargs["input_ids"].shape[1]:])  # the new tokens
        return out

    model.generate = generate
    rates = generation_rates(model, load_tokenizer(str(tiny_tokenizer_dir)), ["Hi", "Life is", "A"], 1, max_new_tokens=4)
    assert len(rates) == 3 and all(r > 0 and math.isfinite(r) for r in rates)
    assert [tuple(new.shape) for new in calls] == [(1, 4)] * 4  # an untimed warm-up, then one call a prompt
    # every row counts 4 real tokens: no EOS ended a row early and padded the rest
    eos = load_tokenizer(str(tiny_tokenizer_dir)).eos_token_id
    assert all(eos not in new.flatten().tolist() for new in calls)


def test_bench_help_says_how_long_a_run_takes(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "minutes on a shared 2-core CPU" in text and "--peers" in text

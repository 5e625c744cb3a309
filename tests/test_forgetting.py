"""Did the adapter forget? `lorafit eval RUN --data` (lorafit's evaluator) and `--tasks` (lm-evaluation-harness).

A tiny run trained a few steps at a high learning rate, so the adapter clearly moves the model; two
local lm-eval tasks over 20 records each (multiple choice, rolling loglikelihood), offline.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys

import pytest
import torch
import yaml

from lorafit.cli import main
from conftest import make_texts

WORDS = "the a of to and in is it you that he was for on are with".split()


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory, tiny_model_dir, texts_file):
    out = tmp_path_factory.mktemp("forget") / "run"
    code = main(["train", "quotes", f"model.name={tiny_model_dir}", f"data.sources.quotes.path={texts_file}",
                 f"output_dir={out}", "--no-progress", "train.max_steps=5", "train.lr=1e-2", "train.log_every=5",
                 "eval.sample_prompt=null",
                 "model.precision=fp32"])  # fp32 on a GPU too: lm-eval's figures are compared with a CPU fp32 forward
    assert code == 0
    return out


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Two lm-eval tasks of the test's own: multiple choice and rolling loglikelihood, 20 records each."""
    root = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    mc = [{"question": words(5), "choices": [words(3) for _ in range(3)], "label": rng.randrange(3)} for _ in range(20)]
    docs = [{"text": words(rng.randint(3, 30))} for _ in range(20)]
    for name, records in (("mc", mc), ("docs", docs)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    data = lambda name: {"data_files": {"test": str(root / f"{name}.jsonl")}}  # noqa: E731
    tasks = {
        "forget_mc": {
            "task": "forget_mc", "dataset_path": "json", "dataset_kwargs": data("mc"), "test_split": "test",
            "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_choice": "{{choices}}", "doc_to_target": "label",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        },
        "forget_docs": {
            "task": "forget_docs", "dataset_path": "json", "dataset_kwargs": data("docs"), "test_split": "test",
            "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
            "metric_list": [{"metric": m, "aggregation": a, "higher_is_better": False}
                            for m, a in (("word_perplexity", "weighted_perplexity"), ("bits_per_byte", "bits_per_byte"))],
        },
        "forget_hub": {  # a task whose data only the Hub has
            "task": "forget_hub", "dataset_path": "lorafit-tests/not-on-this-machine", "test_split": "test",
            "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
            "metric_list": [{"metric": "word_perplexity"}],
        },
    }
    for name, spec in tasks.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    return root


def printed_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_data_on_the_validation_examples_gives_the_summarys_val_loss(tuned_run, tmp_path, capsys):
    from lorafit.config import build_config
    from lorafit.data.sources import load_corpus

    cfg = build_config(yaml.safe_load((tuned_run / "config.yaml").read_text()))
    val = tmp_path / "val.jsonl"  # exactly the run's validation examples, written from its split
    val.write_text("".join(json.dumps({"text": t}) + "\n" for t in load_corpus(cfg.data).val_texts), encoding="utf-8")
    other = tmp_path / "other.txt"  # text the adapter was not trained on
    other.write_text("\n".join(t.upper() for t in make_texts(15, seed=9)) + "\n", encoding="utf-8")
    summary_before = (tuned_run / "summary.json").read_bytes()

    assert main(["eval", str(tuned_run), "--data", str(val), "--data", str(other)]) == 0
    result = printed_json(capsys)
    summary = json.loads(summary_before)
    on_val = result["data"][str(val)]
    assert on_val["examples"] == summary["val_examples"]
    assert on_val["adapter"]["loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
    assert on_val["adapter"]["bits_per_byte"] == pytest.approx(summary["val_bits_per_byte"], rel=1e-6)
    assert on_val["base"]["loss"] == pytest.approx(summary["val_before_training"]["val_loss"], rel=1e-6)
    assert on_val["difference"]["loss"] == pytest.approx(on_val["adapter"]["loss"] - on_val["base"]["loss"])
    on_other = result["data"][str(other)]
    assert on_other["examples"] == 15 and abs(on_other["difference"]["loss"]) > 1e-3
    assert json.loads((tuned_run / "eval" / "forgetting.json").read_text()) == result
    card = (tuned_run / "README.md").read_text()
    assert "## Did it forget?" in card and f"{on_other['adapter']['loss']:.4f}" in card
    assert (tuned_run / "summary.json").read_bytes() == summary_before


def lm_eval_pieces(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokens as lm-eval splits a request: trailing spaces of the context move
    to the continuation, and the continuation is what encoding both adds to the context's tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def logprob_of(model, ctx: list[int], cont: list[int]) -> float:
    """Summed log-probability of `cont` after `ctx`: one plain forward."""
    ids = torch.tensor([ctx + cont])
    logp = model(input_ids=ids[:, :-1]).logits.float().log_softmax(-1)[0]
    return float(logp[len(ctx) - 1:].gather(-1, ids[0, len(ctx):, None]).sum())


def read_samples(run, side: str, task: str) -> list[dict]:
    lines = (run / "eval" / f"lm_eval_{side}_samples_{task}.jsonl").read_text().splitlines()
    return sorted((json.loads(line) for line in lines), key=lambda s: s["doc_id"])


def test_lm_eval_logs_the_loglikelihoods_lorafit_computes(tuned_run, task_dir, capsys):
    from lorafit.generate import load_for_inference

    summary_before = (tuned_run / "summary.json").read_bytes()
    assert main(["eval", str(tuned_run), "--tasks", "forget_mc,forget_docs", "--include-path", str(task_dir),
                 "--batch-size", "4"]) == 0
    result = printed_json(capsys)

    results = {side: json.loads((tuned_run / "eval" / f"lm_eval_{side}.json").read_text()) for side in ("base", "adapter")}
    for side, res in results.items():  # lm-eval's own layout
        assert {"results", "configs", "versions", "n-shot", "n-samples", "config", "higher_is_better"} <= set(res)
        assert res["n-samples"]["forget_mc"]["effective"] == 20
    assert results["adapter"]["config"]["model_args"]["peft"] == str((tuned_run / "adapter").resolve())
    assert "peft" not in results["base"]["config"]["model_args"]

    model, tok, _ = load_for_inference(tuned_run, precision="fp32", device=torch.device("cpu"))
    for side in ("base", "adapter"):
        with model.disable_adapter() if side == "base" else contextlib.nullcontext():
            mc = read_samples(tuned_run, side, "forget_mc")
            assert len(mc) == 20
            for sample in mc:
                for args, resp in zip(sample["arguments"].values(), sample["resps"]):
                    want = logprob_of(model, *lm_eval_pieces(tok, args["arg_0"], args["arg_1"]))
                    assert float(resp[0][0]) == pytest.approx(want, rel=1e-4, abs=1e-4)
            docs = read_samples(tuned_run, side, "forget_docs")
            assert len(docs) == 20
            for sample in docs:  # rolling: every token scored after lm-eval's prefix token (EOS)
                tokens = tok(sample["arguments"]["gen_args_0"]["arg_0"], add_special_tokens=False)["input_ids"]
                assert len(tokens) < 255  # one window of the tiny model's 256 positions
                want = logprob_of(model, [tok.eos_token_id], tokens)
                assert float(sample["resps"][0][0]) == pytest.approx(want, rel=1e-4, abs=1e-4)

    # Five steps at lr 1e-2 moved the model: lm-eval sees a different model with the adapter.
    base_ll = [float(s["resps"][0][0]) for s in read_samples(tuned_run, "base", "forget_docs")]
    tuned_ll = [float(s["resps"][0][0]) for s in read_samples(tuned_run, "adapter", "forget_docs")]
    assert min(abs(a - b) for a, b in zip(base_ll, tuned_ll)) > 1e-3
    ppl = result["tasks"]["forget_docs"]["word_perplexity"]
    assert ppl["base"] == results["base"]["results"]["forget_docs"]["word_perplexity,none"]
    assert ppl["adapter"] == results["adapter"]["results"]["forget_docs"]["word_perplexity,none"]
    assert ppl["difference"] == pytest.approx(ppl["adapter"] - ppl["base"]) and abs(ppl["difference"]) > 1e-3
    assert set(result["tasks"]["forget_mc"]) == {"acc"}

    card = (tuned_run / "README.md").read_text()
    assert "lm-evaluation-harness" in card and "| forget_docs | word_perplexity |" in card
    assert (tuned_run / "summary.json").read_bytes() == summary_before


def test_a_task_that_needs_the_hub_fails_with_the_offline_message(tuned_run, task_dir, capsys):
    assert main(["eval", str(tuned_run), "--tasks", "forget_hub", "--include-path", str(task_dir)]) == 2
    err = capsys.readouterr().err
    assert "Hugging Face Hub" in err and "--include-path DIR" in err and "dataset_path: json" in err
    assert "Traceback" not in err


def test_without_lm_eval_the_message_names_the_extra(tuned_run, task_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    assert main(["eval", str(tuned_run), "--tasks", "forget_mc", "--include-path", str(task_dir)]) == 2
    assert 'pip install -e ".[lm-eval]"' in capsys.readouterr().err


def test_bad_data_sources_name_the_flags(tuned_run, tmp_path, capsys):
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"body": "some text"}) + "\n", encoding="utf-8")
    assert main(["eval", str(tuned_run), "--data", str(records)]) == 2
    assert "no field 'text'" in (err := capsys.readouterr().err) and "--text-field" in err
    assert main(["eval", str(tuned_run), "--data", "lorafit-tests/not-on-this-machine"]) == 2
    assert "--data FILE" in (err := capsys.readouterr().err) and "Traceback" not in err


def test_task_options_need_tasks(tuned_run, capsys):
    assert main(["eval", str(tuned_run), "--limit", "5"]) == 2
    assert "--limit only applies with --tasks" in capsys.readouterr().err

"""Preference tuning: pairs as data (rendering, scoring mask, validation, length policy, split), per-sequence
log-probabilities against plain transformers + PEFT, gradient accumulation, the objectives' own properties,
metrics in summary.json and `lorafit eval`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lorafit.config import load_config
from lorafit.errors import ConfigError, DataError

PAIRS = [
    {"prompt": "Rate the soup", "chosen": " it was warm and kind", "rejected": " cold"},
    {"prompt": "Rate the staff", "chosen": " kind people", "rejected": " rude people at the desk"},
]


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def many_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = "the food was great awful slow kind rude tasty cold warm staff place again never".split()
    say = lambda: " " + " ".join(rng.choice(words, rng.integers(2, 9)))  # noqa: E731
    return [{"prompt": f"Review {i}:", "chosen": say(), "rejected": say()} for i in range(n)]


def config(tmp_path, path, objective="dpo", *overrides):
    return load_config("quotes", [f"data.sources.quotes.path={path}", "data.sources.quotes.kind=preference",
                                  f"train.objective={objective}", f"output_dir={tmp_path / 'run'}",
                                  "eval.sample_prompt=null", *overrides])


def prepared(tmp_path, tokenizer, rows, *overrides, objective="dpo"):
    from lorafit.data.prepare import prepare_data

    cfg = config(tmp_path, write_jsonl(tmp_path / "pairs.jsonl", rows), objective, *overrides)
    return prepare_data(cfg, tokenizer)


# ---------------------------------------------------------------- data


def test_a_pair_is_two_sequences_sharing_the_prompt_with_the_response_and_one_eos_scored(tmp_path, tiny_tokenizer):
    from lorafit.data.templates import Rendered, render_pair
    from lorafit.data.tokenize import tokenize_texts

    cfg = config(tmp_path, "unused.jsonl")
    chosen, rejected = render_pair({"prompt": {"prompt": "Rate it"}, "chosen": " warm", "rejected": " cold"},
                                   cfg.data.sources["quotes"], tiny_tokenizer)
    assert chosen == Rendered((("Rate it\n", False), (" warm", True)))  # plain: "{prompt}\n", then the response
    split = tokenize_texts([chosen, rejected], [0, 0], tiny_tokenizer, 64, "truncate", pairs=True)
    eos = tiny_tokenizer.eos_token_id
    prompt = tiny_tokenizer("Rate it\n", add_special_tokens=False)["input_ids"]
    for i, response in enumerate([" warm", " cold"]):
        ids = tiny_tokenizer(response, add_special_tokens=False)["input_ids"]
        assert split.example(i).tolist() == prompt + ids + [eos]
        assert split.example(i)[split.example_scored(i)].tolist() == ids + [eos]


def test_conversational_pairs_render_the_prompt_turns_unscored_and_the_response_turn_scored(tmp_path, tiny_tokenizer):
    from lorafit.data.examples import from_record
    from lorafit.data.templates import render_pair

    cfg = config(tmp_path, "unused.jsonl", "dpo", "data.sources.quotes.template=roles")
    src = cfg.data.sources["quotes"]
    record = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
              "rejected": json.dumps([{"role": "assistant", "content": "go"}])}  # a JSON string, as in a CSV
    chosen, rejected = render_pair(from_record(record, src, lambda: "r"), src, tiny_tokenizer)
    assert chosen.segments == (("user: hi\n", False), ("assistant:", False), (" hello\n", True))
    assert rejected.segments[-1] == (" go\n", True)


def test_bad_pairs_are_refused_or_counted_and_left_out(tmp_path, tiny_tokenizer, capsys):
    rows = many_pairs(12) + [{"prompt": "p", "chosen": "  ", "rejected": "x"}, {"prompt": "p", "chosen": "same", "rejected": "same"}]
    data = prepared(tmp_path, tiny_tokenizer, rows)
    assert (len(data.train) + len(data.val)) // 2 == 12
    err = capsys.readouterr().err
    assert "1 pair(s) with an empty chosen or rejected response" in err and "1 pair(s) with chosen == rejected" in err
    with pytest.raises(DataError, match="no field 'rejected'"):
        prepared(tmp_path, tiny_tokenizer, [{"prompt": "p", "chosen": "a", "reject": "b"}])


def test_long_pairs_keep_the_boundary_and_are_dropped_whole(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "p" * 50, "chosen": " a", "rejected": " b"}] + many_pairs(20)  # the first: a prompt of 50 tokens
    data = prepared(tmp_path, tiny_tokenizer, rows, "data.seq_len=20", "data.val_fraction=0.05")
    for split in (data.train, data.val):
        assert len(split) % 2 == 0 and len(split) // 2 <= 20  # the too-long pair went whole
        for i in range(len(split)):
            assert split.example_scored(i).any()
        prompts = [tiny_tokenizer.decode(split.example(i)[~split.example_scored(i)]) for i in range(len(split))]
        assert prompts[0::2] == prompts[1::2]  # each sequence 2i + 1 is its chosen's pair: the same prompt
    counts = data.train.policy_counts or {}
    assert sum(c.get("pairs_dropped", 0) for c in counts.values()) + \
        sum(c.get("pairs_dropped", 0) for c in (data.val.policy_counts or {}).values()) == 1
    with pytest.raises(ConfigError, match="chunk"):
        config(tmp_path, "x.jsonl", "dpo", "data.long_examples=chunk")


def test_pairs_split_like_every_other_source(tmp_path):
    from lorafit.data.sources import load_corpus

    rows = many_pairs(40)
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    pairs = load_corpus(config(tmp_path, path).data)
    completions = load_corpus(load_config("quotes", [f"data.sources.quotes.path={path}", "data.sources.quotes.kind=prompt_completion",
                                                     "data.sources.quotes.completion_field=chosen"]).data)
    assert [p["prompt"] for p in pairs.val_texts] == [c["prompt"] for c in completions.val_texts]
    assert {p["prompt"]["prompt"] for p in pairs.val_texts}.isdisjoint(p["prompt"]["prompt"] for p in pairs.train_texts)


def test_config_interfaces(tmp_path):
    from lorafit.config import annotated_yaml, build_config, load_yaml

    cfg = config(tmp_path, "x.jsonl", "orpo", "preference.lambda=0.25", "preference.beta=0.3")
    assert (cfg.preference.lambda_, cfg.preference.beta, cfg.to_dict()["preference"]["lambda"]) == (0.25, 0.3, 0.25)
    assert build_config(load_yaml(annotated_yaml(cfg), "x")).to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match="kind must be preference"):
        load_config("quotes", ["train.objective=dpo"])
    with pytest.raises(ConfigError, match="train.objective"):
        load_config("quotes", ["train.objective=ppo"])


# ---------------------------------------------------------------- log-probabilities and the step


def trainer_for(tmp_path, model_dir, rows, objective="dpo", *overrides):
    from lorafit.rundir import RunDir
    from lorafit.train import setup

    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = config(tmp_path, write_jsonl(tmp_path / "pairs.jsonl", rows), objective, f"model.name={model_dir}",
                 "model.dropout=0", "lora.dropout=0", *overrides)
    return setup(cfg, RunDir(cfg.output_dir))


def plain_logp(model, ids: np.ndarray, scored: np.ndarray) -> float:
    """The sequence alone through plain transformers + PEFT, float64 log-softmax of its logits."""
    x = torch.tensor(ids, dtype=torch.long)[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), -1)
    return float(logp.gather(1, x[0, 1:, None])[:, 0][torch.from_numpy(scored[1:])].sum())


def test_each_sequence_logp_and_the_reference_equal_the_sequence_scored_alone(tmp_path, tiny_model_dir):
    from lorafit.preference import sequence_logps

    trainer = trainer_for(tmp_path, tiny_model_dir, many_pairs(12))
    with torch.no_grad():  # a non-zero adapter, so the policy differs from the reference
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    split, model = trainer.data.train, trainer.model
    trainer.model.train()
    batch = trainer.step_batches(0)[0]
    nll, example = trainer.forward.token_nll(batch)
    sums = torch.zeros(len(split), dtype=torch.float64).index_add_(0, example, -nll.double())
    seen = sorted(set(example.tolist()))
    assert len(seen) >= 4 and trainer.fast.layout.kind in ("segments", "rows")  # packed: several sequences a row
    model.eval()
    for i in seen:
        assert float(sums[i]) == pytest.approx(plain_logp(model, split.example(i), split.example_scored(i)), rel=1e-5)
        with model.disable_adapter():
            assert split.ref_logps[i] == pytest.approx(plain_logp(model, split.example(i), split.example_scored(i)), rel=1e-5)
        assert abs(float(sums[i]) - split.ref_logps[i]) > 1e-3  # policy and reference differ: the check means something
    logps = sequence_logps(model, split, trainer.scoring)
    assert logps[seen] == pytest.approx(sums[seen].detach().numpy(), rel=1e-5)


def step_one_gradients(trainer) -> dict:
    seen = {}
    original = trainer.apply_update

    def capture(step_loss, grad_norm, n):
        seen.update({n_: p.grad.clone() for n_, p in trainer.model.named_parameters() if p.grad is not None})
        seen["loss"] = float(step_loss)
        return original(step_loss, grad_norm, n)

    trainer.apply_update = capture
    trainer.model.train()
    trainer.train_step()
    return seen


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_gradient_accumulation_4x2_equals_8x1(tmp_path, tiny_model_dir, objective):
    rows = many_pairs(20, seed=1)
    one = step_one_gradients(trainer_for(tmp_path / "a", tiny_model_dir, rows, objective, "train.batch_size=8", "train.grad_accum=1"))
    accumulated = trainer_for(tmp_path / "b", tiny_model_dir, rows, objective, "train.batch_size=4", "train.grad_accum=2",
                              "train.micro_batch_tokens=40")
    assert len(accumulated.step_batches(0)) >= 3  # the step really is cut into micro-batches
    two = step_one_gradients(accumulated)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    for k in one:
        if k != "loss":
            torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-5 * float(one[k].abs().max()))


def test_label_smoothing_weighs_the_swapped_pair():
    """Conservative DPO: with a share e of labels flipped, the loss is (1 - e) x the pair's loss + e x the loss of the
    pair with chosen and rejected swapped."""
    from lorafit.objectives import Settings, pair_terms

    g = torch.Generator().manual_seed(0)
    c, r, rc, rr = (torch.randn(5, generator=g, dtype=torch.float64) * 3 - 20 for _ in range(4))
    n = torch.full((5,), 4.0, dtype=torch.float64)
    smooth = pair_terms("dpo", Settings(beta=0.3, label_smoothing=0.2), c, r, n, n, rc, rr).losses
    plain = pair_terms("dpo", Settings(beta=0.3), c, r, n, n, rc, rr).losses
    swapped = pair_terms("dpo", Settings(beta=0.3), r, c, n, n, rr, rc).losses
    torch.testing.assert_close(smooth, 0.8 * plain + 0.2 * swapped)
    assert not torch.allclose(smooth, plain)


# ---------------------------------------------------------------- a whole run


def test_a_dpo_run_reports_val_preference_before_and_after_and_lorafit_eval_agrees(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from lorafit.cli import main
    from lorafit.train import train

    cfg = config(tmp_path, write_jsonl(tmp_path / "pairs.jsonl", many_pairs(24)), "dpo", f"model.name={tiny_model_dir}",
                 "train.max_steps=4", "train.log_every=2", "train.lr=1e-2", "train.batch_size=4",
                 "train.report_to=[tensorboard]")
    summary = train(cfg, progress=False)
    keys = {"loss", "accuracy", "margin", "chosen_logp", "rejected_logp", "chosen_nll", "pairs"}
    after, before = summary["val_preference"], summary["val_before_training"]
    assert keys <= after.keys() and keys <= before.keys()
    assert before["loss"] == pytest.approx(np.log(2)) and before["margin"] == 0  # step 0: the policy is the reference
    assert after["margin"] != 0 and after["pairs"] == before["pairs"] == 3
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    logged = [r for r in records if "rewards/margins" in r]
    assert len(logged) == 2 and all(k in logged[0] for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                                              "logps/chosen", "logps/rejected"))
    check_the_preference_outputs(tmp_path / "run", logged, after)
    check_the_saved_reference(tmp_path, cfg, monkeypatch, capsys)  # and `lorafit eval` below must read it
    assert main(["eval", str(tmp_path / "run")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["val_preference"] == pytest.approx(after, rel=1e-9)
    # forgetting: `lorafit eval RUN --data` compares base and base + DPO adapter as on any other run
    other = tmp_path / "other.txt"
    other.write_text("".join(f"line {i} of some other text\n" for i in range(6)))
    assert main(["eval", str(tmp_path / "run"), "--data", str(other)]) == 0
    compared = json.loads(capsys.readouterr().out)["data"][str(other)]
    assert compared["difference"]["loss"] == compared["adapter"]["loss"] - compared["base"]["loss"] != 0
    # a DPO adapter is just another adapter: merged, it gives the logits of base + adapter
    from transformers import AutoModelForCausalLM

    from lorafit.generate import load_for_inference

    assert main(["merge", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    peft_model, _, _ = load_for_inference(tmp_path / "run", precision="fp32", device=torch.device("cpu"))
    ids = torch.randint(0, 200, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, atol=1e-4, rtol=0)
        with peft_model.disable_adapter():
            assert not torch.allclose(peft_model(ids).logits, merged(ids).logits, atol=1e-4)  # training moved it


def check_the_preference_outputs(run, logged, after) -> None:
    """The per-step preference metrics reach the tracker (TensorBoard read back) and the plots; the final figures
    reach the model card."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for tag in ("rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        scalars = events.Scalars(tag)  # stored as float32
        assert [e.step for e in scalars] == [r["step"] for r in logged]
        assert [e.value for e in scalars] == pytest.approx([r[tag] for r in logged], rel=1e-6)
    assert any(p.suffix == ".png" and p.stat().st_size > 0 for p in run.rglob("*.png"))
    card = (run / "adapter" / "README.md").read_text()
    assert f"{after['accuracy']:.3f}" in card or f"{after['accuracy']:.2f}" in card


def check_the_saved_reference(tmp_path, cfg, monkeypatch, capsys) -> None:
    """The reference's values were saved in the run (in its manifest, so --overwrite may delete them) and equal a
    fresh set-up's no-grad pass; they are read back under the same key, computed again under another (other
    tokens, another starting adapter); from here on computing one fails (the caller's `lorafit eval` reads it)."""
    import lorafit.reference
    from lorafit.rundir import REFERENCE_FILE, RunDir
    from lorafit.train import setup

    run = tmp_path / "run"
    assert REFERENCE_FILE in RunDir(run).written()
    with np.load(run / REFERENCE_FILE) as f:
        stored = {name: f[name] for name in ("train", "val")}
    fresh = setup(cfg, RunDir(tmp_path / "unused"))  # a new run's set-up: one no-grad pass, adapter off
    for name, split in (("train", fresh.data.train), ("val", fresh.data.val)):
        assert np.array_equal(stored[name], split.ref_logps) and len(split) >= 6
    computed = []

    def count(model, cfg_, split, *rest):
        computed.append(len(split))
        return np.zeros(len(split))

    monkeypatch.setattr(lorafit.reference, "compute", count)
    attach = lambda c, splits: lorafit.reference.attach(c, fresh.model, splits, fresh.scoring, fresh.precision,  # noqa: E731
                                                        run / REFERENCE_FILE)
    capsys.readouterr()
    attach(cfg, {"train": fresh.data.train, "val": fresh.data.val})
    assert computed == [] and "read from" in capsys.readouterr().err
    attach(cfg, {"train": fresh.data.train.subset(np.arange(4))})
    assert computed == [4] and "train split: other tokens" in capsys.readouterr().err
    cfg.model.adapter = str(run)  # continuing this run's adapter: another reference
    try:
        attach(cfg, {"val": fresh.data.val})
    finally:
        cfg.model.adapter = None
    assert computed == [4, len(fresh.data.val)] and "another starting adapter" in capsys.readouterr().err

    def refuse(*_):
        raise AssertionError("the stored reference should have been read")

    monkeypatch.setattr(lorafit.reference, "compute", refuse)


def test_the_sentiment_recipe_pairs_positive_over_negative_reviews_under_one_prompt():
    import csv

    from conftest import shared_path
    from lorafit.data.sources import load_corpus

    rows = list(csv.DictReader(open(shared_path("data", "mixture-samples", "yelp_review_full", "yelp_test.csv"), encoding="utf-8")))
    positive = {r["sentence"] for r in rows if r["label"] == "1"}
    negative = {r["sentence"] for r in rows if r["label"] == "0"}
    cfg = load_config("sentiment-dpo-offline")
    assert cfg.train.objective == "dpo"
    corpus = load_corpus(cfg.data)
    pairs = corpus.train_texts + corpus.val_texts
    assert len(pairs) == min(len(positive), len(negative)) == 617 and len(corpus.val_texts) == 62
    assert all(p["chosen"] in positive and p["rejected"] in negative and p["prompt"] == {"prompt": "Review:"} for p in pairs)
    assert len({p["rejected"] for p in pairs}) == 617  # each negative review once


def test_a_dpo_run_killed_in_a_checkpoint_resumes_bitwise(tmp_path, tiny_model_dir):
    """SIGKILL inside the step-4 checkpoint save, then --resume from step 2: the adapter and every logged figure
    (the log window straddles the checkpoint) equal the uninterrupted run's."""
    from test_resume import adapter_bytes, launch, records, run_killed

    from lorafit.cli import main

    data = write_jsonl(tmp_path / "pairs.jsonl", many_pairs(40))
    args = lambda out: ["train", "quotes", f"model.name={tiny_model_dir}", f"data.sources.quotes.path={data}",  # noqa: E731
                        "data.sources.quotes.kind=preference", "train.objective=dpo", f"output_dir={out}",
                        "train.max_steps=5", "train.save_every=2", "train.log_every=3", "train.batch_size=4",
                        "train.lr=1e-2", "eval.sample_prompt=null", "lora.dropout=0.1"]
    assert main(args(tmp_path / "reference")) == 0
    run_killed(args(tmp_path / "run"), "checkpoint:2")
    proc = launch([*args(tmp_path / "run"), "--resume"])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "resumed from" in err
    assert "reference log-probabilities of 80 sequences read from" in err  # the run's own, not computed again
    assert adapter_bytes(tmp_path / "run") == adapter_bytes(tmp_path / "reference")
    timing = lambda k: k.endswith(("_per_second", "_seconds")) or k == "peak_memory_bytes"  # noqa: E731 - not state
    same = lambda run: [{k: v for k, v in r.items() if not timing(k)} for r in records(run / "metrics.jsonl")]  # noqa: E731
    assert same(tmp_path / "run") == same(tmp_path / "reference")
    assert any("rewards/margins" in r for r in records(tmp_path / "run" / "metrics.jsonl"))


def test_dpo_on_two_processes_trains_as_one(tiny_model_dir, tmp_path):
    """Pairs shared over ranks whole: each rank's loss is normalised by the step's pairs, the reference is the same
    on every rank, and the statistics are summed over ranks, so 2 processes log and save what 1 does."""
    from test_distributed import adapter, records, torchrun, train_args

    from lorafit.cli import main

    data = write_jsonl(tmp_path / "pairs.jsonl", many_pairs(36, seed=2))
    dpo = ["data.sources.quotes.kind=preference", "train.objective=dpo"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(train_args(tiny_model_dir, data, one, *dpo)) == 0
    proc = torchrun(tmp_path, train_args(tiny_model_dir, data, two, *dpo))
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps_one, steps_two = ([r for r in records(run) if "rewards/margins" in r] for run in (one, two))
    assert len(steps_two) == len(steps_one) >= 3 and all(min(r["rank_tokens"]) > 0 for r in steps_two)
    for a, b in zip(steps_one, steps_two):
        # A margin is beta x a difference of logps of ~-50 each, summed in fp32 in another packing: 1e-6 absolute.
        for k in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k)
    summaries = [json.loads((run / "summary.json").read_text())["val_preference"] for run in (one, two)]
    assert summaries[1] == pytest.approx(summaries[0], rel=1e-5)
    for name, w in adapter(one).items():
        torch.testing.assert_close(adapter(two)[name], w, atol=1e-6, rtol=1e-4)

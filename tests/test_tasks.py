"""Prompt-completion and chat data (issue 15): the loss on the completion only, exactly.

The references are computed here without lorafit's templates or packing: the prompt rendered by
hand ("{prompt}\\n"), each example alone through plain transformers + PEFT."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import greedy_continuation, make_texts, shared_path
from lorafit.config import ConfigError, SourceConfig, load_config
from lorafit.data.formats import read_local_texts
from lorafit.data.packing import IGNORE, Layout, micro_batches
from lorafit.data.templates import generation_prompt, render, resolve_template
from lorafit.data.tokenize import TokenizedSplit, apply_length_policy_scored, tokenize_texts
from lorafit.errors import DataError


def qa_records(n: int, seed: int = 0) -> list[dict]:
    qs, ans = make_texts(n, seed=seed, max_words=8), make_texts(n, seed=seed + 100, max_words=5)
    return [{"q": q, "a": a, "id": i} for i, (q, a) in enumerate(zip(qs, ans))]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def pc_source(**kw) -> SourceConfig:
    return SourceConfig(path="unused", **{"kind": "prompt_completion", "prompt_field": "q", "completion_field": "a", **kw})


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- the exactness test, end to end


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory, tiny_model_dir):
    from lorafit.train import train

    tmp = tmp_path_factory.mktemp("qa")
    data = write_jsonl(tmp / "qa.jsonl", qa_records(60))
    cfg = load_config("quotes", [
        f"model.name={tiny_model_dir}", f"data.sources.quotes.path={data}", "data.sources.quotes.kind=prompt_completion",
        "data.sources.quotes.prompt_field=q", "data.sources.quotes.completion_field=a", "data.seq_len=128",
        "train.max_steps=2", "train.lr=5e-3", "eval.before_training=false", "eval.sample_prompt=null", f"output_dir={tmp / 'run'}",
    ])
    return cfg, train(cfg, progress=False), tmp / "run"


def test_reported_val_loss_is_the_completion_only_loss_of_each_example_alone(qa_run, tiny_model_dir, tiny_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorafit.data.sources import load_corpus

    cfg, summary, run = qa_run
    val = load_corpus(cfg.data).val_texts
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(run / "adapter")).eval()
    eos = tiny_tokenizer.eos_token_id
    total, count, n_bytes = 0.0, 0, 0
    with torch.no_grad():
        for ex in val:
            prompt = ids_of(tiny_tokenizer, ex["prompt"]["q"] + "\n")
            completion = ids_of(tiny_tokenizer, ex["completion"]) + [eos]
            ids = torch.tensor([prompt + completion])
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            total += nll[len(prompt) - 1 :].sum().item()  # the targets of the completion and the EOS only
            count += len(completion)
            n_bytes += len(ex["completion"].encode())
    assert summary["packing"] == "segments"
    assert summary["val_tokens"] == count and summary["val_bytes"] == n_bytes
    assert summary["val_loss"] == pytest.approx(total / count, abs=1e-5)
    assert summary["val_by_source"]["quotes"]["val_loss"] == pytest.approx(total / count, abs=1e-5)
    nothing = {"truncated": 0, "completion_truncated": 0, "dropped_no_completion": 0}  # nothing was long: zeros
    assert summary["length_policy"] == {"train": {"quotes": nothing}, "val": {"quotes": nothing}}
    # train tokens: every step's scored targets only (2 steps of 8 examples, each answer + EOS)
    assert 0 < summary["train_tokens"] < 2 * 8 * 40


def test_generate_template_renders_the_prompt_as_training_did(qa_run, tiny_tokenizer, capsys):
    from lorafit.cli import main

    cfg, _, run = qa_run
    segments = generation_prompt(resolve_template("plain"), tiny_tokenizer, "Where is it?")
    trained = render({"prompt": {"q": "Where is it?"}, "completion": "Here."}, resolve_template(None), cfg.data.sources["quotes"],
                     tiny_tokenizer)
    assert segments == [trained.segments[0][0]] == ["Where is it?\n"]
    import lorafit.cli
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    shown = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lorafit.cli, "show", lambda *a: shown.append(a))
        assert main(["generate", str(run), "Where is it?", "--template", "plain", "--max-new-tokens", "3",
                     "--temperature", "0"]) == 0
    ((prompt, tuned, _, _),) = shown
    base = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(run / "adapter"))
    # the continuation of the prompt as training rendered it, each segment encoded on its own
    assert prompt == "Where is it?\n"
    assert tuned == [greedy_continuation(model, tiny_tokenizer, ids_of(tiny_tokenizer, "Where is it?\n"), 3)]
    assert main(["generate", str(run), "x", "--template", "no-such-template"]) == 2
    assert "named templates" in capsys.readouterr().err


# ---------------------------------------------------------------- packing keeps the boundary


@pytest.mark.parametrize("layout", [Layout("rows", 64), Layout("segments"), Layout("padded")], ids=str)
def test_packed_completion_loss_equals_each_example_alone(layout):
    from test_invariants import EOS, lora_model

    rng = np.random.default_rng(0)
    examples, masks = [], []
    for _ in range(9):
        n_prompt, n_completion = int(rng.integers(1, 20)), int(rng.integers(1, 10))
        examples.append(list(rng.integers(0, EOS, n_prompt + n_completion)) + [EOS])
        masks.append([False] * n_prompt + [True] * (n_completion + 1))
    lens = np.array([len(e) for e in examples])
    split = TokenizedSplit(
        ids=np.concatenate(examples).astype(np.int32), offsets=np.concatenate([[0], np.cumsum(lens)]),
        sources=np.zeros(9, np.int32), n_bytes=np.ones(9, np.int64), truncated=np.zeros(9, bool),
        scored=np.concatenate(masks),
    )
    assert list(split.targets_per_example()) == [sum(m) for m in masks]
    model = lora_model()
    from test_invariants import token_nll

    got = np.zeros(9)
    with torch.no_grad():
        for batch in micro_batches(split, np.arange(9), layout, 60, EOS):
            assert batch.n_targets == int((batch.targets != IGNORE).sum())
            nll, ex = token_nll(model, batch)
            np.add.at(got, ex.numpy(), nll.double().numpy())
        for i, (e, m) in enumerate(zip(examples, masks)):
            ids = torch.tensor([e])
            logits = model(input_ids=ids).logits[0, :-1].double()
            alone = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")[torch.tensor(m[1:])]
            assert got[i] == pytest.approx(alone.sum().item(), abs=1e-5)


# ---------------------------------------------------------------- tokenisation, train_on, length policy


def test_tokens_are_prompt_then_completion_and_only_the_completion_is_scored(tiny_tokenizer):
    records = qa_records(6, seed=3)
    examples = [{"prompt": {"q": r["q"]}, "completion": r["a"]} for r in records]
    eos = tiny_tokenizer.eos_token_id
    for train_on in ("completion", "all"):
        src = pc_source(train_on=train_on)
        items = [render(e, resolve_template(None), src, tiny_tokenizer) for e in examples]
        split = tokenize_texts(items, [0] * 6, tiny_tokenizer, 1000, "truncate")
        for i, r in enumerate(records):
            prompt, completion = ids_of(tiny_tokenizer, r["q"] + "\n"), ids_of(tiny_tokenizer, r["a"]) + [eos]
            assert split.example(i).tolist() == prompt + completion
            expected = [False] + [train_on == "all"] * (len(prompt) - 1) + [True] * len(completion)
            assert split.example_scored(i).tolist() == expected
        scored_text = [(r["q"] + "\n" if train_on == "all" else "") + r["a"] for r in records]
        first_bytes = [len(tiny_tokenizer.decode(split.example(i)[:1])) if train_on == "all" else 0 for i in range(6)]
        assert split.n_bytes.tolist() == [len(t.encode()) - b for t, b in zip(scored_text, first_bytes)]
        if train_on == "all":
            assert split.targets_per_example().tolist() == (split.lengths() - 1).tolist()


def test_length_policies_keep_the_boundary_and_count_what_they_did():
    ids, scored = list(range(20)), [False] * 14 + [True] * 6  # 14 prompt tokens, 5 completion + EOS
    counts: dict = {}
    # truncate keeps the start: some of the completion survives, or the example is left out
    (piece, mask), = apply_length_policy_scored(ids, scored, 17, "truncate", counts)[0]
    assert piece == ids[:17] and mask == scored[:17] and counts == {"completion_truncated": 1}
    assert apply_length_policy_scored(ids, scored, 14, "truncate", counts) == ([], True)
    assert counts["dropped_no_completion"] == 1
    assert apply_length_policy_scored(ids, scored, 10, "drop", counts) == ([], True) and counts["dropped_too_long"] == 1
    # chunk lays windows from the end: the last holds the whole completion after the end of the prompt
    pieces, lost = apply_length_policy_scored(ids, scored, 8, "chunk", counts)
    assert not lost and pieces == [(ids[12:20], scored[12:20])]
    assert counts["chunks_without_completion"] == 2  # windows 5..12 and 0..5 held prompt only
    # a completion longer than a window: every scored target is in exactly one window, none without one
    scored = [False] * 6 + [True] * 14
    pieces, _ = apply_length_policy_scored(ids, scored, 8, "chunk", {})
    targets = [p[k] for p, m in pieces for k in range(1, len(p)) if m[k]]
    assert targets == ids[6:] and all(any(m[1:]) for _, m in pieces)


def test_length_policy_counts_reach_the_split(tiny_tokenizer):
    long_prompt = {"prompt": {"q": "word " * 40}, "completion": "yes"}
    short = {"prompt": {"q": "Why?"}, "completion": "Because."}
    src = pc_source()
    items = [render(e, resolve_template(None), src, tiny_tokenizer) for e in (long_prompt, short)]
    split = tokenize_texts(items, [0, 1], tiny_tokenizer, 32, "truncate")
    assert len(split) == 1 and split.policy_counts[0] == {"dropped_no_completion": 1}
    chunked = tokenize_texts(items, [0, 1], tiny_tokenizer, 32, "chunk")
    last = chunked.example(0)
    assert len(chunked) == 2 and tiny_tokenizer.decode(last[chunked.example_scored(0)]) == "yes<|endoftext|>"
    assert chunked.policy_counts[0]["chunks_without_completion"] >= 1


# ---------------------------------------------------------------- templates


def test_alpaca_and_chat_templates(tiny_tokenizer):
    alpaca = SourceConfig(path="x", kind="prompt_completion", template="alpaca")
    example = {"prompt": {"instruction": "Add 2 and 2.", "input": ""}, "completion": "4"}
    r = render(example, resolve_template("alpaca"), alpaca, tiny_tokenizer)
    assert r.segments[0][0].endswith("### Instruction:\nAdd 2 and 2.\n\n### Response:\n") and "### Input" not in r.segments[0][0]
    example["prompt"]["input"] = "ints"
    assert "### Input:\nints\n\n### Response:\n" in render(example, resolve_template("alpaca"), alpaca, tiny_tokenizer).segments[0][0]

    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                         {"role": "assistant", "content": "Bye."}]}
    src = SourceConfig(path="x", kind="chat")
    roles = render(chat, resolve_template("roles", "chat"), src, tiny_tokenizer)  # GPT-2 has no chat template: the same
    assert render(chat, resolve_template(None, "chat"), src, tiny_tokenizer) == roles
    assert "".join(t for t, _ in roles.segments) == "system: Be brief.\nuser: Hi\nassistant: Hello.\nuser: Bye\nassistant: Bye.\n"
    assert [t for t, s in roles.segments if s] == [" Hello.\n", " Bye.\n"]
    assert generation_prompt(resolve_template("roles"), tiny_tokenizer, "Hi") == ["user: Hi\n", "assistant:"]

    import copy

    tok = copy.deepcopy(tiny_tokenizer)  # the model's own chat template, when it has one
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</t>\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    own = render(chat, resolve_template("chat"), src, tok)
    assert [t for t, s in own.segments if s] == ["Hello.</t>\n", "Bye.</t>\n"] and own.eos
    assert "".join(t for t, _ in own.segments) == tok.apply_chat_template(chat["messages"], tokenize=False)
    assert generation_prompt(resolve_template("chat"), tok, "Hi") == ["<user>Hi</t>\n<assistant>"]
    split = tokenize_texts([own], [0], tok, 1000, "truncate")
    assert tok.decode(split.example(0)[split.example_scored(0)]) == "Hello.</t>\nBye.</t>\n<|endoftext|>"


def test_template_and_kind_mistakes_are_config_errors(tmp_path):
    base = ["data.sources.quotes.path=x.jsonl"]
    cases = [
        (["data.sources.quotes.kind=qa"], "kind: 'qa' is not one of text, prompt_completion, chat"),
        (["data.sources.quotes.prompt_field=q"], "set data.sources.quotes.kind: prompt_completion"),
        (["data.sources.quotes.kind=chat", "data.sources.quotes.template=alpaca"], "is for prompt_completion sources"),
        (["data.sources.quotes.kind=prompt_completion", "data.sources.quotes.template={nope} x"], "uses {nope}"),
        (["data.sources.quotes.kind=prompt_completion", "data.sources.quotes.template=missing.txt"], "named templates"),
        (["data.sources.quotes.kind=prompt_completion", "data.sources.quotes.train_on=prompt"], "train_on: 'prompt'"),
    ]
    for overrides, fragment in cases:
        with pytest.raises(ConfigError) as e:
            load_config("quotes", base + overrides)
        assert fragment in str(e.value), (overrides, str(e.value))
    (tmp_path / "t.txt").write_text("Q: {q}\nA:", encoding="utf-8")
    cfg = load_config("quotes", base + ["data.sources.quotes.kind=prompt_completion", "data.sources.quotes.prompt_field=q",
                                        f"data.root={tmp_path}", "data.sources.quotes.template=t.txt"])
    assert resolve_template("t.txt", "prompt_completion", str(tmp_path)).text == "Q: {q}\nA:"
    assert cfg.data.sources["quotes"].template == "t.txt"


# ---------------------------------------------------------------- local formats and their errors


def test_prompt_completion_from_every_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = qa_records(5, seed=7)
    expected = [{"prompt": {"q": r["q"]}, "completion": r["a"]} for r in records]
    files = {"qa.jsonl": "".join(json.dumps(r) + "\n" for r in records), "qa.json": json.dumps({"rows": records})}
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["q", "a", "id"])
    w.writeheader()
    w.writerows(records)
    files["qa.csv"] = buf.getvalue()
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "qa.parquet")
    for name in [*files, "qa.parquet"]:
        got = read_local_texts(tmp_path / name, pc_source(records_path="rows" if name == "qa.json" else None), "qa")
        assert got == expected, name
    alpaca = [{"instruction": "Say hi", "input": "", "output": "hi"}]
    got = read_local_texts(tmp_path / "a.jsonl", SourceConfig(path="x", kind="prompt_completion", template="alpaca"), "a") \
        if write_jsonl(tmp_path / "a.jsonl", alpaca) else None
    assert got == [{"prompt": {"instruction": "Say hi", "input": ""}, "completion": "hi"}]


def test_nested_fields_and_fields_of_the_enclosing_record(tmp_path):
    squad = {"data": [{"title": "T", "paragraphs": [{"context": "Ctx one.", "qas": [
        {"question": "Q1?", "answers": [{"text": "A1", "answer_start": 0}, {"text": "other", "answer_start": 3}]},
        {"question": "Q2?", "answers": [{"text": "A2", "answer_start": 1}]}]}]}]}
    (tmp_path / "squad.json").write_text(json.dumps(squad), encoding="utf-8")
    src = SourceConfig(path="x", kind="prompt_completion", records_path="data[].paragraphs[].qas[]",
                       prompt_field=["context", "question"], completion_field="answers[0].text")
    assert read_local_texts(tmp_path / "squad.json", src, "squad") == [
        {"prompt": {"context": "Ctx one.", "question": "Q1?"}, "completion": "A1"},
        {"prompt": {"context": "Ctx one.", "question": "Q2?"}, "completion": "A2"}]
    hub_layout = {"context": "C", "question": "Q", "answers": {"text": ["A", "B"], "answer_start": [0, 0]}}
    write_jsonl(tmp_path / "hub.jsonl", [hub_layout])
    src = SourceConfig(path="x", kind="prompt_completion", prompt_field=["context", "question"], completion_field="answers.text[0]")
    assert read_local_texts(tmp_path / "hub.jsonl", src, "squad")[0]["completion"] == "A"


def test_missing_fields_unknown_roles_and_txt_are_errors_naming_the_record(tmp_path):
    def error(name, records, src) -> str:
        with pytest.raises(DataError) as e:
            read_local_texts(write_jsonl(tmp_path / name, records) and tmp_path / name, src, "demo")
        return str(e.value)

    msg = error("qa.jsonl", [{"q": "x", "a": "y"}, {"q": "x"}], pc_source())
    assert "qa.jsonl line 2" in msg and "no field 'a'" in msg and "q" in msg
    msg = error("nested.jsonl", [{"q": "x", "a": ["y", "z"]}], pc_source())
    assert "line 1" in msg and "holds a list" in msg and "a[0]" in msg
    chat = SourceConfig(path="x", kind="chat")
    msg = error("chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]},
                               {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}], chat)
    assert "chat.jsonl line 2" in msg and "unknown role 'bot'" in msg and "system, user, assistant" in msg
    msg = error("chat2.jsonl", [{"conversation": []}], chat)
    assert "line 1" in msg and "no field 'messages'" in msg and "conversation" in msg
    (tmp_path / "t.txt").write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(DataError, match="a txt file .* has none"):
        read_local_texts(tmp_path / "t.txt", pc_source(), "demo")


def test_a_bad_chat_file_is_exit_2_without_traceback(tmp_path, tiny_model_dir, capsys):
    from lorafit.cli import main

    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "human", "content": "hi"}]}])
    code = main(["train", "quotes", f"model.name={tiny_model_dir}", f"data.sources.quotes.path={data}",
                 "data.sources.quotes.kind=chat", f"output_dir={tmp_path / 'run'}", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "chat.jsonl line 1" in err and "unknown role 'human'" in err and "Traceback" not in err


def test_chat_jsonl_trains_on_assistant_turns(tmp_path, tiny_tokenizer):
    from lorafit.data.sources import load_corpus
    from lorafit.data.templates import render_examples

    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in
            zip(make_texts(20, seed=1, max_words=6), make_texts(20, seed=2, max_words=4))]
    rows.append({"messages": [{"role": "user", "content": "no answer"}]})  # nothing to score: filtered out
    cfg = load_config("quotes", [f"data.sources.quotes.path={write_jsonl(tmp_path / 'c.jsonl', rows)}",
                                 "data.sources.quotes.kind=chat"])
    corpus = load_corpus(cfg.data)
    assert len(corpus.train_texts) + len(corpus.val_texts) == 20
    items = render_examples(corpus.val_texts, corpus.val_sources, cfg.data, tiny_tokenizer)
    split = tokenize_texts(items, corpus.val_sources, tiny_tokenizer, 128, "truncate")
    for i, ex in enumerate(corpus.val_texts):
        answer = ex["messages"][1]["content"]
        assert tiny_tokenizer.decode(split.example(i)[split.example_scored(i)]) == f" {answer}\n<|endoftext|>"


# ---------------------------------------------------------------- the shipped recipes


def test_tasks_recipes_and_the_offline_twin_on_the_shared_samples():
    from lorafit.data.sources import load_corpus

    hub = load_config("mixture8-tasks").data.sources
    assert {n for n, s in hub.items() if s.kind == "prompt_completion"} == {"squad", "cnn_dailymail", "xsum"}
    assert hub["squad"].completion_field == "answers.text[0]" and hub["cnn_dailymail"].completion_field == "highlights"
    root = shared_path("data", "mixture-samples")
    cfg = load_config("mixture8-tasks-offline", [f"data.root={root}"])
    corpus = load_corpus(cfg.data)
    names = corpus.source_names
    squad = [e for e, s in zip(corpus.train_texts, corpus.train_sources) if names[s] == "squad"]
    xsum = [e for e, s in zip(corpus.train_texts, corpus.train_sources) if names[s] == "xsum"]
    assert len(squad) == len(xsum) == 85
    raw = json.loads((root / "squad" / "dev-v1.1.json").read_text(encoding="utf-8"))
    truth: dict[tuple, set] = {}  # a few questions are asked twice of a paragraph, with other answers
    for q, context in ((q, p["context"]) for a in raw["data"] for p in a["paragraphs"] for q in p["qas"]):
        truth.setdefault((context, q["question"]), set()).add(q["answers"][0]["text"])
    assert all(e["completion"] in truth[(e["prompt"]["context"], e["prompt"]["question"])] for e in squad)
    summaries = {json.loads(line)["document"]: json.loads(line)["summary"]
                 for line in (root / "xsum" / "test.jsonl").read_text(encoding="utf-8").splitlines()}
    assert all(summaries[e["prompt"]["document"]] == e["completion"] for e in xsum)
    assert all(isinstance(e, str) for e, s in zip(corpus.train_texts, corpus.train_sources) if names[s] == "cnn_dailymail")


def test_hub_prompt_completion_with_nested_answers_streamed_or_not_and_cached(monkeypatch, tmp_path):
    import datasets

    from lorafit.data.sources import read_source

    rows = [{"context": f"Paragraph {i}.", "question": f"Question {i}?", "answers": {"text": [f"answer {i}", "x"], "answer_start": [0, 1]}}
            for i in range(40)]
    rows[5]["answers"] = {"text": [""], "answer_start": [0]}  # an empty answer: nothing to score, filtered out
    calls = []

    def load_dataset(path, name=None, split=None, revision=None, streaming=False):
        calls.append(streaming)
        ds = datasets.Dataset.from_list(rows)
        return ds.to_iterable_dataset() if streaming else ds

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    src = SourceConfig(path="someone/squad", kind="prompt_completion", prompt_field=["context", "question"],
                       completion_field="answers.text[0]")
    whole = read_source("squad", src, None, seed=0)
    assert calls == [False] and len(whole) == 39
    assert whole[0] == {"prompt": {"context": "Paragraph 0.", "question": "Question 0?"}, "completion": "answer 0"}
    src.max_examples = 10
    sample = read_source("squad", src, None, seed=0, cache_dir=tmp_path)
    assert calls == [False, True] and len(sample) == 10 and all(e in whole for e in sample)
    assert read_source("squad", src, None, seed=0, cache_dir=tmp_path) == sample and calls == [False, True]  # from the cache
    src.completion_field = "answers.label"
    with pytest.raises(DataError, match="row 1: no field 'answers.label'"):
        read_source("squad", src, None, seed=0, cache_dir=tmp_path)


def test_a_training_step_is_normalised_by_its_scored_targets(tiny_model_dir, tiny_tokenizer, tmp_path):
    """The step's loss divides by the completion tokens (and EOS) it scores, not by every position."""
    import json as _json

    from conftest import make_texts
    from lorafit.config import load_config
    from lorafit.data.prepare import prepare_data
    from lorafit.progress import StepPlan
    from lorafit.train import train

    data = tmp_path / "pairs.jsonl"
    texts = make_texts(40, seed=6, max_words=14)
    data.write_text("".join(_json.dumps({"prompt": a, "completion": b}) + "\n" for a, b in zip(texts[::2], texts[1::2])))
    cfg = load_config("quotes", [f"model.name={tiny_model_dir}", f"data.sources.quotes.path={data}", "train.max_steps=1",
                                 "data.sources.quotes.kind=prompt_completion", "data.sources.quotes.prompt_field=prompt",
                                 "data.sources.quotes.completion_field=completion", "eval.before_training=false",
                                 "eval.sample_prompt=null", f"output_dir={tmp_path / 'run'}"])
    split = prepare_data(cfg, tiny_tokenizer).train
    step = StepPlan(len(split), 8, cfg.train.epochs, 1, cfg.train.seed).examples(0)
    scored, positions = int(split.targets_per_example()[step].sum()), int((split.lengths()[step] - 1).sum())
    assert scored < positions  # the prompts are not scored
    assert train(cfg, progress=False)["train_tokens"] == scored


def test_a_prompt_completion_run_describes_itself(qa_run):
    """summary.json, the card: the kind, fields, template and what is scored, not `text_field: text`; tokens/s of
    both the positions computed and the targets scored."""
    _, summary, run = qa_run
    assert summary["sources"] == {"quotes": {"kind": "prompt_completion", "prompt_field": ["q"], "completion_field": ["a"],
                                             "template": "plain", "train_on": "completion",
                                             "scored": "the completion and the EOS"}}
    card = (run / "README.md").read_text()
    assert "prompt_completion: `q` -> `a`, template plain, scored: the completion and the EOS" in card
    assert "`quote`" not in card and "`text`" not in card
    assert summary["train_processed_tokens"] > summary["train_tokens"] > 0  # the prompts are computed, not scored
    assert "tokens/s processed" in card and "of them scored" in card

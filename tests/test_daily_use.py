"""Daily use, second pass (issue #25): generate's output is exactly what the model said, local paths checked before
the model loads, progress where it can draw and log lines where it cannot, `eval --data PATH:FIELD` and sources
files, runs that describe their data, numbers that agree, `--nproc` threads, and the small things."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import greedy_continuation, make_texts
from lorafit.cli import main

RUN_ARGS = ["train.max_steps=2", "train.log_every=1", "eval.sample_prompt=null",
            "eval.before_training=false", "eval.max_examples=5", "data.seq_len=256"]


class ZeroColumns(io.StringIO):
    """stderr as `script` or some CI runners give it: a terminal, 0 columns wide."""

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return 2


@pytest.fixture(scope="module")
def run2(tmp_path_factory, tiny_model_dir, texts_file):
    """A 2-step run on 120 texts: 12 held out, 5 of them evaluated (eval.max_examples=5), trained with a bar
    wanted on a 0-column terminal (its stderr in stderr.txt beside it)."""
    out = tmp_path_factory.mktemp("daily-use") / "run"
    err = ZeroColumns()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stderr", err)
        mp.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((0, 24)))
        code = main(["train", "quotes", f"model.name={tiny_model_dir}", f"data.sources.quotes.path={texts_file}",
                     f"output_dir={out}", *RUN_ARGS])
    (out.parent / "stderr.txt").write_text(err.getvalue())
    assert code == 0, err.getvalue()
    return out


def peft_model(run: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(run / "adapter")).eval(), \
        AutoTokenizer.from_pretrained(str(run / "adapter"))


class Terminal:
    """sys.stderr as a terminal `columns` wide (what a bar decides on), still captured."""

    def __init__(self, monkeypatch, columns: int):
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
        monkeypatch.setattr(sys.stderr, "fileno", lambda: 2, raising=False)
        monkeypatch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((columns, 24)))


# ---------------------------------------------------------------- 1. generate: exactly what the model said


def test_piped_generate_prints_the_prompt_and_the_continuation_byte_for_byte(run2, capsys):
    prompt = "The " + "x" * 120 + " and a prompt far longer than eighty columns, so a wrapping printer would break it"
    assert main(["generate", str(run2), prompt, "--max-new-tokens", "12", "--temperature", "0"]) == 0
    model, tok = peft_model(run2)
    assert capsys.readouterr().out == prompt + greedy_continuation(model, tok, tok(prompt)["input_ids"], 12) + "\n"


def test_compare_base_and_json_give_the_same_whole_texts(run2, capsys):
    prompt = "Y" * 150  # one long token run: a table would cut it with "…"
    flags = ["--max-new-tokens", "10", "--num-return-sequences", "2", "--compare-base", "--seed", "3"]
    assert main(["generate", str(run2), prompt, *flags, "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["sample"] for r in records] == [0, 1] and all(r["prompt"] == prompt for r in records)
    assert main(["generate", str(run2), prompt, *flags]) == 0
    out = capsys.readouterr()
    assert out.out == "".join(prompt + r["base_completion"] + "\n" + prompt + r["completion"] + "\n" for r in records)
    assert "…" not in out.out and "--- base" in out.err  # the labels went to stderr


# ---------------------------------------------------------------- 2. local paths, before the model loads


def test_missing_data_and_model_paths_are_named_before_torch_loads(tmp_path):
    (tmp_path / "models").mkdir()
    driver = ("import sys; from lorafit.cli import main; "
              "code = main(['train', 'quotes', 'data.sources.quotes.path=missing.jsonl', 'model.name=models/gtp2']); "
              "print(code, [m for m in ('torch', 'transformers') if m in sys.modules])")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.stdout.strip() == "2 []", proc.stdout + proc.stderr
    assert f"data.sources.quotes.path: file not found: {tmp_path / 'missing.jsonl'}" in proc.stderr
    assert f"model.name: no such directory: {tmp_path / 'models' / 'gtp2'}" in proc.stderr  # not a Hub/offline message


def test_what_counts_as_a_local_model_path(tmp_path, monkeypatch):
    from lorafit.localpaths import looks_like_a_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert all(looks_like_a_path(n) for n in ("./tiny", "../tiny", "/opt/m", "~/m", "models/typo", "models"))
    assert not any(looks_like_a_path(n) for n in ("gpt2", "openai-community/gpt2", "Qwen/Qwen2.5-0.5B"))


def test_a_fifo_is_not_a_regular_file_as_template_or_data(tmp_path, texts_file, capsys):
    from lorafit.config import load_config
    from lorafit.data.templates import resolve_template
    from lorafit.errors import LorafitError
    from lorafit.preflight import local_path_problems

    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    with pytest.raises(LorafitError, match="is a FIFO \\(named pipe\\), not a regular file"):
        resolve_template(str(fifo))  # what `generate --template FIFO` and a source's template call
    assert main(["generate", str(tmp_path / "no-run-needed"), "Hi", "--template", str(fifo)]) == 2
    assert f"template file {fifo} is a FIFO (named pipe), not a regular file" in capsys.readouterr().err  # before any loading
    cfg = load_config("quotes", [f"data.sources.quotes.path={fifo}", f"model.name={tmp_path}"])
    assert local_path_problems(cfg) == [f"data.sources.quotes.path: {fifo} is a FIFO (named pipe), not a regular file"]


# ---------------------------------------------------------------- 3. progress where it draws, lines where it cannot


def test_a_zero_column_terminal_gets_log_lines(run2):
    """run2 trained with a bar wanted (no --no-progress) on a terminal 0 columns wide: log lines instead."""
    err = (run2.parent / "stderr.txt").read_text()
    assert [line.split(":")[0] for line in err.splitlines() if line.startswith("step ")] == ["step 1/2", "step 2/2"]
    assert "training:" not in err


def test_no_progress_silences_the_tokenising_bar(tmp_path, tiny_tokenizer, capsys, monkeypatch):
    from lorafit.config import load_config
    from lorafit.data.prepare import prepare_data

    data = tmp_path / "many.jsonl"  # enough training texts for a tokenising bar
    data.write_text("".join(json.dumps({"quote": t}) + "\n" for t in make_texts(5700, seed=4, max_words=3)))
    cfg = load_config("quotes", [f"data.sources.quotes.path={data}", f"data.cache_dir={tmp_path / 'cache'}"])
    Terminal(monkeypatch, columns=120)
    prepare_data(cfg, tiny_tokenizer, progress=False)
    assert "tokenising" not in capsys.readouterr().err
    cfg.data.seq_len = 32  # not from the cache: tokenised again
    prepare_data(cfg, tiny_tokenizer, splits=("train",))  # where a bar is wanted and can draw, there is one
    assert "tokenising: 100%" in capsys.readouterr().err


def test_eval_data_and_generate_say_what_they_do_on_a_terminal(run2, tmp_path, capsys, monkeypatch):
    other = tmp_path / "other.txt"
    other.write_text("\n".join(make_texts(6, seed=5)) + "\n")
    Terminal(monkeypatch, columns=100)
    assert main(["eval", str(run2), "--data", str(other)]) == 0
    err = capsys.readouterr().err
    assert "loading the base and the adapter" in err and f"{other}: adapter: 100%" in err and f"{other}: base: 100%" in err
    assert main(["generate", str(run2), "Hi", "--max-new-tokens", "3"]) == 0
    assert "generating: 100%" in capsys.readouterr().err


# ---------------------------------------------------------------- 4. eval --data with several sources


def test_eval_data_path_field_and_a_sources_file(run2, tmp_path, capsys):
    from lorafit.forgetting import split_field

    quotes = tmp_path / "q.jsonl"
    quotes.write_text("".join(json.dumps({"quote": t, "text": "unused"}) + "\n" for t in make_texts(7, seed=6)))
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(make_texts(5, seed=7)) + "\n")
    assert main(["eval", str(run2), "--data", f"{quotes}:quote", "--data", str(lines)]) == 0
    by_field = json.loads(capsys.readouterr().out)["data"]
    assert main(["eval", str(run2), "--data", str(quotes), "--text-field", "quote"]) == 0
    plain = json.loads(capsys.readouterr().out)["data"][str(quotes)]
    assert by_field[f"{quotes}:quote"]["adapter"] == plain["adapter"]  # the field given with the path is the one read
    assert by_field[f"{quotes}:quote"]["text_field"] == "quote"
    assert "text_field" not in by_field[str(lines)] and by_field[str(lines)]["text"] == "one per line"
    sources = tmp_path / "sets" / "sources.yaml"
    sources.parent.mkdir()
    sources.write_text(yaml.safe_dump({"quotes": {"path": "../q.jsonl", "text_field": "quote"},
                                       "lines": {"path": "../lines.txt"}}))
    assert main(["eval", str(run2), "--data", str(sources)]) == 0
    from_file = json.loads(capsys.readouterr().out)["data"]
    assert from_file["quotes"]["adapter"] == plain["adapter"]
    assert from_file["lines"]["adapter"] == by_field[str(lines)]["adapter"]
    assert split_field("https://host:8080/x") == ("https://host:8080/x", None)
    assert split_field(str(quotes) + ":answers.text") == (str(quotes), "answers.text")


# ---------------------------------------------------------------- 5/6. runs that describe themselves, numbers that agree


def test_held_out_and_evaluated_counts_agree_in_summary_and_card(run2):
    summary = json.loads((run2 / "summary.json").read_text())
    assert (summary["val_held_out"], summary["val_examples"]) == (12, 5)  # ceil(0.1 * 120) held out, 5 evaluated
    card = " ".join((run2 / "README.md").read_text().split())
    assert "12 held out for validation (10%, seed 42), 5 of them evaluated (eval.max_examples=5)" in card
    assert summary["sources"] == {"quotes": {"kind": "text", "text_field": "quote"}}
    assert summary["length_policy"]["train"] == {"quotes": {"truncated": 0}}  # zeros, not {}
    records = [json.loads(line) for line in (run2 / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    # plain text: every computed position is a scored target
    assert all(r["processed_tokens_per_second"] == pytest.approx(r["tokens_per_second"]) for r in steps)


def test_the_log_line_names_processed_and_scored_tokens():
    from lorafit.progress import progress_line

    record = {"step": 3, "loss": 2.5, "lr": 1e-4, "tokens_per_second": 16.0, "processed_tokens_per_second": 140.0}
    line = progress_line(record, 10, 1.0)
    assert "140 processed tokens/s, 16 scored tokens/s, ETA" in line
    assert "12 tokens/s (all scored)" in progress_line({**record, "tokens_per_second": 12.0,
                                                         "processed_tokens_per_second": 12.0}, 10, 1.0)


def test_data_show_marks_the_scored_tokens_and_counts_them(tmp_path, tiny_model_dir, tiny_tokenizer, capsys):
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"q": f"What is {i}?", "a": f"It is {i}."}) + "\n" for i in range(30)))
    pc = [f"model.name={tiny_model_dir}", f"data.sources.quotes.path={qa}", "data.sources.quotes.kind=prompt_completion",
          "data.sources.quotes.prompt_field=q", "data.sources.quotes.completion_field=a"]
    assert main(["data", "quotes", *pc, "--show", "2"]) == 0
    out = capsys.readouterr().out
    examples = [block for block in out.split("--- example ")[1:]]
    assert len(examples) == 2
    for block in examples:
        header, body = block.split("\n", 1)
        body = body.split("\n--- ")[0] if "\n--- " in body else body.rstrip("\n")
        question, answer = body.split("\n[[")
        assert answer.endswith("<|endoftext|>]]")  # the completion and the EOS, nothing of the prompt
        n_prompt = len(tiny_tokenizer(question + "\n", add_special_tokens=False)["input_ids"])
        n_answer = len(tiny_tokenizer(answer[: -len("<|endoftext|>]]")], add_special_tokens=False)["input_ids"]) + 1
        assert f"{n_prompt + n_answer} tokens, {n_answer} scored" in header, header
    # `lorafit config` shows a prompt_completion source's settings, not text_field
    assert main(["config", "quotes", *pc]) == 0
    out = capsys.readouterr().out
    source = yaml.safe_load(out)["data"]["sources"]["quotes"]
    assert "text_field" not in source and source["kind"] == "prompt_completion" and source["train_on"] == "completion"
    assert "# text_field: quote  # not read by a prompt_completion source" in out  # the recipe's, said to be unused


# ---------------------------------------------------------------- 7. --nproc threads


def test_nproc_sets_the_threads_of_each_process_and_says_so(monkeypatch, capsys):
    import subprocess as sp

    from lorafit.cli import launch_processes

    seen = []
    monkeypatch.setattr(sp, "call", lambda command, env=None: seen.append(env) or 0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert launch_processes(2, ["train", "quotes", "--nproc", "2"]) == 0
    cores = len(os.sched_getaffinity(0))
    assert seen[0]["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    assert f"OMP_NUM_THREADS={max(1, cores // 2)} each ({cores} cores // 2" in capsys.readouterr().err
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    launch_processes(2, ["train", "quotes"])
    assert seen[1]["OMP_NUM_THREADS"] == "3"


# ---------------------------------------------------------------- 8. smaller things


def test_recipes_say_what_each_is_for(capsys):
    from lorafit.config import list_recipes

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    rows = out.splitlines()
    lines = {row.split()[0]: rows[i + 1] for i, row in enumerate(rows[:-1]) if row and not row.startswith(" ")}
    for name in list_recipes():
        assert lines[name].startswith(" ") and len(lines[name].strip()) > 20, name  # a description below each
        if name.endswith("-offline"):
            assert "data.root" in lines[name]
        if "-tasks" in name:
            assert "prompt" in lines[name] and "answer" in lines[name]


def test_config_takes_a_run_directory_and_config_yaml_writes_line_breaks_readably(run2, tmp_path, capsys):
    from lorafit.config import load_config, save_config

    assert main(["config", str(run2)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["output_dir"] == str(run2)
    assert 'join: "\\n"' in (run2 / "config.yaml").read_text()
    cfg = load_config("quotes", ["data.sources.quotes.join=a\tb\n"])
    save_config(cfg, tmp_path / "c.yaml")
    assert 'join: "a\\tb\\n"' in (tmp_path / "c.yaml").read_text()
    assert yaml.safe_load((tmp_path / "c.yaml").read_text()) == cfg.to_dict()


def test_bitsandbytes_stays_unimported_unless_something_is_quantised(tmp_path):
    fake = tmp_path / "site" / "bitsandbytes"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("print('bitsandbytes was imported')\n")
    driver = ("import importlib.util, sys; from lorafit.cli import main; main(['recipes']); "
              "print('spec', importlib.util.find_spec('bitsandbytes')); import bitsandbytes")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), *sys.path])}
    proc = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, env=env, timeout=60)
    assert "spec None" in proc.stdout and "bitsandbytes was imported" not in proc.stdout  # PEFT's checks see none
    assert "ModuleNotFoundError" in proc.stderr or "ImportError" in proc.stderr

"""Bad input: one readable message (what, where, what to do), no traceback, exit code 2, and nothing
already on disk changed.

Every case runs `lorafit train ... --overwrite` over an existing run directory: a failure must be
found before that run is touched.
"""

from __future__ import annotations

import json

import os
from pathlib import Path

import pytest

from lorafit.cli import main

# id, overrides ({d}: a folder of bad files, {data}: a good jsonl file), fragments the message must hold
CASES = [
    ("missing-file", ["data.sources.quotes.path={d}/nope.jsonl"], ["file not found", "nope.jsonl", "data.sources.quotes.path"]),
    ("directory-not-file", ["data.sources.quotes.path={d}/folder.jsonl"], ["is a directory", "folder.jsonl"]),
    ("empty-file", ["data.sources.quotes.path={d}/empty.jsonl"], ["empty.jsonl", "is empty"]),
    ("binary-file", ["data.sources.quotes.path={d}/binary.jsonl"], ["binary.jsonl", "looks binary", "NUL byte"]),
    ("not-utf8", ["data.sources.quotes.path={d}/latin1.jsonl"], ["latin1.jsonl", "not valid UTF-8", "line 2", "iconv"]),
    ("malformed-json-line", ["data.sources.quotes.path={d}/broken.jsonl"], ["broken.jsonl", "line 3", "not valid JSON"]),
    ("csv-without-column", ["data.sources.quotes.path={d}/table.csv"], ["no column 'quote'", "title, body", "text_field"]),
    ("absent-text-field", ["data.sources.quotes.path={data}", "data.sources.quotes.text_field=body"],
     ["no field 'body'", "quote, author", "text_field"]),
    ("empty-after-filters", ["data.sources.quotes.path={data}", "data.sources.quotes.min_chars=100000"],
     ["no examples left after filtering", "min_chars=100000"]),
    ("seq-len-above-model", ["data.sources.quotes.path={data}", "data.seq_len=4096"], ["data.seq_len=4096", "256 positions"]),
    ("unknown-lora-target", ["data.sources.quotes.path={data}", "lora.targets=[q_proj]"],
     ["'q_proj'", "c_attn, c_fc, c_proj", "lora.targets"]),
    ("r-not-positive", ["lora.r=0"], ["lora.r: must be a positive integer, got 0"]),
    ("alpha-not-positive", ["lora.alpha=-16"], ["lora.alpha: must be positive, got -16"]),
    ("dropout-out-of-range", ["lora.dropout=1.0"], ["lora.dropout: must be in [0, 1), got 1.0"]),
    ("unknown-config-key", ["train.epoch=3"], ["train.epoch: unknown key; did you mean 'epochs'?"]),
    ("wrong-type", ["train.batch_size=four"], ["train.batch_size: expected an integer, got 'four'"]),
    # data files that once ended in tracebacks (issue 11)
    ("lone-surrogate", ["data.sources.quotes.path={d}/surrogate.jsonl"], ["surrogate.jsonl line 2", "lone surrogate"]),
    ("huge-integer", ["data.sources.quotes.path={d}/bigint.jsonl"], ["bigint.jsonl line 1", "thousands of digits"]),
    ("deep-nesting", ["data.sources.quotes.path={d}/deep.jsonl"], ["deep.jsonl line 1", "nested too deeply"]),
    ("symlink-loop", ["data.sources.quotes.path={d}/loop.jsonl"], ["loop.jsonl is a symbolic link loop"]),
    ("boolean-as-text", ["data.sources.quotes.path={d}/bool.jsonl"], ["bool.jsonl line 2", "holds true, not text"]),
    # a value used only at the end of training is checked before anything is touched
    ("sample-beyond-context", ["data.sources.quotes.path={data}", "eval.sample_prompt=a", "eval.sample_max_new_tokens=1000"],
     ["eval.sample_max_new_tokens=1000", "256 positions", "eval.sample_max_new_tokens=255 or less"]),
    # values that once were accepted, or ended in tracebacks
    ("adam-beta", ["train.adam_beta2=1.0"], ["train.adam_beta2: must be in [0, 1), got 1.0"]),
    ("adam-eps", ["train.adam_eps=0"], ["train.adam_eps: must be positive, got 0.0"]),
    ("negative-seed", ["train.seed=-1"], ["train.seed: must be in [0, 4294967295], got -1"]),
    ("infinite-epochs", ["train.epochs=.inf"], ["train.epochs: must be a finite number, got inf"]),
    ("infinite-lr", ["train.lr=.inf", "train.skip_nonfinite=true"], ["train.lr: must be a finite number, got inf"]),
    ("nan-lr", ["train.lr=.nan"], ["train.lr: must be a finite number, got nan"]),
    ("infinite-weight", ["data.sources.quotes.weight=.inf"], ["data.sources.quotes.weight: must be a finite number"]),
    ("eval-max-examples-zero", ["eval.max_examples=0"], ["eval.max_examples: must be positive", "null"]),
    ("empty-output-dir", ["output_dir="], ["output_dir: '' can never hold a run", "it is empty"]),
    ("path-of-10000-characters", ["data.sources.quotes.path=" + "x" * 10_000],
     ["data.sources.quotes.path: 'xxxx", "(10,000 characters) is too long to be a path"]),
    ("override-not-utf8", ["output_dir=runs/\udcff"], ["byte 0xff at character 17 is not valid UTF-8"]),
    # issue 21 item 11: values that would exhaust memory or overflow later, refused with the config
    ("huge-weight", ["data.sources.quotes.weight=1e6"], ["data.sources.quotes.weight: must be positive and at most 1,000"]),
    ("huge-rank", ["lora.r=9223372036854775807"], ["lora.r: must be at most 4,096"]),
    ("huge-alpha", ["lora.alpha=1e308"], ["lora.alpha: must be at most 65536", "got 1e+308"]),
    ("huge-epochs", ["train.epochs=1e300"], ["train.epochs: must be at most 1,000,000", "train.max_steps"]),
]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    (d / "folder.jsonl").mkdir()
    (d / "empty.jsonl").write_bytes(b"")
    (d / "binary.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (d / "latin1.jsonl").write_bytes(b'{"quote": "fine"}\n{"quote": "caf\xe9"}\n')
    (d / "broken.jsonl").write_text('{"quote": "a"}\n{"quote": "b"}\n{"quote": "c",\n')
    (d / "table.csv").write_text("title,body\nA,first\nB,second\n")
    (d / "surrogate.jsonl").write_text('{"quote": "fine"}\n{"quote": "a\\ud800b"}\n')
    (d / "bigint.jsonl").write_text('{"quote": "fine", "n": ' + "9" * 5000 + "}\n")
    (d / "deep.jsonl").write_text('{"quote": "fine", "n": ' + "[" * 50_000 + "]" * 50_000 + "}\n")
    (d / "bool.jsonl").write_text('{"quote": "fine"}\n{"quote": true}\n')
    (d / "loop.jsonl").symlink_to(d / "loop-back.jsonl")
    (d / "loop-back.jsonl").symlink_to(d / "loop.jsonl")
    return d


@pytest.fixture
def existing_run(tmp_path) -> Path:
    """A run directory that a failed `--overwrite` must leave exactly as it was."""
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / ".lorafit-run.json").write_text('{"lorafit_run": 1}\n')  # so --overwrite would delete it
    (run / "config.yaml").write_text("recipe: quotes\n")
    (run / "metrics.jsonl").write_text('{"step": 2, "loss": 3.0}\n')
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    files = ["config.yaml", "metrics.jsonl", "adapter/adapter_model.safetensors"]  # lorafit's manifest: all its own
    (run / ".lorafit-files.json").write_text(json.dumps({"files": files}))
    return run


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def assert_clean_failure(code: int, err: str, fragments: list[str]) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.count("error: ") == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.mark.parametrize("overrides, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_message_and_changes_nothing(
    overrides, fragments, bad_files, texts_file, tiny_model_dir, existing_run, capsys
):
    before = snapshot(existing_run)
    args = [o.format(d=bad_files, data=texts_file) for o in overrides]
    code = main(["train", "quotes", f"model.name={tiny_model_dir}", f"output_dir={existing_run}", "--overwrite",
                 "--no-progress", *args])
    err = capsys.readouterr().err
    err = err[err.index("error: "):] if "error: " in err else err  # progress lines (data, counts) may come first
    assert_clean_failure(code, err, fragments)
    assert snapshot(existing_run) == before


def test_unknown_recipe_lists_the_recipes(capsys):
    code = main(["train", "no-such-recipe"])
    assert_clean_failure(code, capsys.readouterr().err, ["No recipe named 'no-such-recipe'", "Shipped recipes: ", "quotes"])


def test_an_output_dir_that_cannot_be_written(tmp_path, tiny_model_dir, texts_file, capsys):
    if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses new files even to root
        parent = Path("/sys")
        if os.access(parent, os.W_OK) and _can_create(parent):
            pytest.skip("no directory here refuses writing")
    else:
        parent = tmp_path / "read-only"
        parent.mkdir()
        parent.chmod(0o555)
    code = main(["train", "quotes", f"model.name={tiny_model_dir}", f"data.sources.quotes.path={texts_file}",
                 f"output_dir={parent}/lorafit-run"])
    assert_clean_failure(code, capsys.readouterr().err, ["is not writable", str(parent), "output_dir"])
    assert not (parent / "lorafit-run").exists()


def _can_create(directory: Path) -> bool:
    try:
        (directory / ".lorafit-test").touch()
    except OSError:
        return False
    (directory / ".lorafit-test").unlink()
    return True


@pytest.mark.parametrize("key", ["data.sources.quotes.path", "model.name", "output_dir", "data.root"])
def test_a_path_of_10000_characters_is_named_by_its_key_in_one_short_line(key, capsys):
    """Before, `File name too long: xxxx...` (10,000 characters) came from deep inside, naming no key."""
    code = main(["train", "quotes", f"{key}={'x' * 10_000}"])
    err = capsys.readouterr().err
    assert_clean_failure(code, err, [f"{key}: 'xxx", "10,000 characters"])
    assert max(len(line) for line in err.splitlines()) < 400

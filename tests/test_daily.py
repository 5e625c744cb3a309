"""Daily use: config errors before the heavy imports, log lines without a terminal, resuming a run from its
directory (and extending it), recipe-relative paths, `lorafit config`, the run directory's files, trackers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorafit.cli import build_parser, main, train_target
from lorafit.config import build_config, load_config
from lorafit.errors import LorafitError
from lorafit.rundir import RunDir


def test_config_errors_come_before_torch_is_imported():
    """A typo in a recipe or an override is reported before torch or transformers load (seconds, not 20)."""
    driver = ("import sys; from lorafit.cli import main; "
              "codes = [main(['train', 'qoutes']), main(['train', 'quotes', 'lora.r=x', 'train.report_to=[tensorbord]'])]; "
              "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; print(codes, heavy)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, env=env, timeout=60)
    assert proc.stdout.strip() == "[2, 2] []", proc.stdout + proc.stderr
    assert "Did you mean 'quotes'" in proc.stderr and "lora.r" in proc.stderr and "tensorbord" in proc.stderr


@pytest.mark.parametrize("argv, expected", [
    (["train", "quotes"], ("quotes", [], False)),
    (["train", "quotes", "--resume"], ("quotes", [], True)),
    (["train", "quotes", "--resume", "lora.r=4"], ("quotes", ["lora.r=4"], True)),  # an override, as before
    (["train", "quotes", "lora.r=4", "--resume"], ("quotes", ["lora.r=4"], True)),
    (["train", "--resume", "quotes"], ("quotes", [], True)),  # the recipe, as before --resume took a value
])
def test_resume_keeps_its_old_meanings(argv, expected):
    assert train_target(build_parser().parse_args(argv)) == expected


def test_resume_run_dir_reads_the_runs_config(tmp_path):
    (tmp_path / "config.yaml").write_text("output_dir: elsewhere\n")
    args = build_parser().parse_args(["train", "--resume", str(tmp_path), "train.max_steps=9"])
    assert train_target(args) == (str(tmp_path / "config.yaml"), ["train.max_steps=9", f"output_dir={tmp_path}"], True)
    for argv in (["train"], ["train", "quotes", "--resume", str(tmp_path)],
                 ["train", "quotes", "--resume", str(tmp_path / "nothing")]):
        with pytest.raises(LorafitError):
            train_target(build_parser().parse_args(argv))


# ---------------------------------------------------------------- a run: log lines, files, trackers, extension

RUN_ARGS = ["--no-progress", "train.log_every=1", "eval.sample_prompt=null", "eval.before_training=false",
            "train.report_to=[tensorboard]"]


@pytest.fixture(scope="module")
def run4(tmp_path_factory, tiny_model_dir):
    """A 4-step run whose base is given relative to the current directory, reported to TensorBoard."""
    from tests.conftest import make_texts

    work = tmp_path_factory.mktemp("daily")
    data = work / "texts.jsonl"
    data.write_text("".join(json.dumps({"quote": t}) + "\n" for t in make_texts(60, seed=3)))
    shutil.copytree(tiny_model_dir, work / "tiny")
    old = Path.cwd()
    os.chdir(work)
    try:
        code = main(["train", "quotes", "model.name=tiny", f"data.sources.quotes.path={data}", "output_dir=run",
                     "train.max_steps=4", *RUN_ARGS])
    finally:
        os.chdir(old)
    assert code == 0
    return work / "run"


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_holds_the_losses_of_metrics_jsonl(run4):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run4 / "tensorboard"))
    events.Reload()
    logged = {(e.step, round(e.value, 5)) for e in events.Scalars("loss")}
    expected = {(r["step"], round(r["loss"], 5)) for r in records(run4) if "loss" in r}
    assert logged == expected and len(expected) == 4
    assert [e.step for e in events.Scalars("val_loss")] == [4]


def test_run_directory_files(run4):
    assert not (run4 / ".lorafit.lock").exists()  # removed by the process that held it
    assert (run4 / "tensorboard").is_dir() and RunDir(run4).foreign_entries() == []  # --overwrite may replace it
    assert (run4 / "adapter" / "README.md").read_text() == (run4 / "README.md").read_text()  # lorafit's card
    assert json.loads((run4 / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    load = json.loads((run4 / "adapter" / "lorafit_base.json").read_text())["load"]
    assert load["name"] == "tiny" and load["resolved"] == str((run4.parent / "tiny").resolve())


def test_log_lines_without_a_terminal(tmp_path, tiny_model_dir, texts_file, capsys):
    code = main(["train", "quotes", f"model.name={tiny_model_dir}", f"data.sources.quotes.path={texts_file}",
                 f"output_dir={tmp_path / 'run'}", "train.max_steps=3", *RUN_ARGS[:-1], "train.log_every=2"])
    assert code == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 2/3", "step 3/3"]
    assert all(", lr " in line and "tokens/s (all scored), ETA " in line for line in lines), lines
    assert f"loss {records(tmp_path / 'run')[0]['loss']:.4f}" in lines[0]


def test_resume_extends_a_finished_run_on_the_longer_schedule(run4, tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    shutil.copytree(run4, run)
    shutil.copytree(tiny_model_dir, tmp_path / "tiny")
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        assert main(["train", "--resume", str(run), "train.max_steps=2"]) == 2  # shorter: refused
        assert main(["train", "--resume", str(run), "train.max_steps=6", "train.report_to=[]"]) == 0
        straight = tmp_path / "straight"
        data = yaml.safe_load((run / "config.yaml").read_text())["data"]["sources"]["quotes"]["path"]
        assert main(["train", "quotes", "model.name=tiny", f"data.sources.quotes.path={data}", f"output_dir={straight}",
                     "train.max_steps=6", *RUN_ARGS[:-1]]) == 0
    finally:
        os.chdir(old)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["optimizer_steps"] == 6
    extended = {r["step"]: r for r in records(run) if "loss" in r}
    reference = {r["step"]: r for r in records(straight) if "loss" in r}
    assert sorted(extended) == [1, 2, 3, 4, 5, 6]
    # from step 5 on, the rates of the 6-step schedule; the records of steps 1-4 keep the 4-step schedule's
    assert [extended[s]["lr"] for s in (5, 6)] == pytest.approx([reference[s]["lr"] for s in (5, 6)], abs=1e-12)
    assert extended[2]["lr"] != pytest.approx(reference[2]["lr"])
    assert [r["step"] for r in records(run) if "val_loss" in r] == [6]  # the 4-step final eval was redone at 6
    assert not (run / ".lorafit.lock").exists()


# ---------------------------------------------------------------- recipe files, lorafit config, help


def test_relative_paths_in_a_recipe_file_mean_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    (folder / "models" / "base").mkdir(parents=True)
    (folder / "r.yaml").write_text(yaml.safe_dump({
        "model": {"name": "models/base"},
        "data": {"sources": {"a": {"path": "a.jsonl"}, "hub": {"path": "Abirate/english_quotes"}}}}))
    (folder / "rooted.yaml").write_text(yaml.safe_dump({"data": {"root": "../data", "sources": {"a": {"path": "a.jsonl"}}}}))
    monkeypatch.chdir(tmp_path)
    cfg = load_config("recipes/r.yaml")
    assert cfg.data.sources["a"].path == str(folder / "a.jsonl")
    assert cfg.data.sources["hub"].path == "Abirate/english_quotes"  # a Hub id stays one
    assert cfg.model.name == str(folder / "models" / "base")
    rooted = load_config("recipes/rooted.yaml", ["data.sources.a.path=b.jsonl"])
    assert rooted.data.root == str(tmp_path / "data") and rooted.data.sources["a"].path == "b.jsonl"
    assert load_config("recipes/r.yaml", ["data.sources.a.path=x.jsonl"]).data.sources["a"].path == "x.jsonl"  # cwd
    # a run's own config.yaml keeps its paths as the run used them
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lorafit-run.json").write_text("{}")
    (tmp_path / "run" / "config.yaml").write_text((folder / "r.yaml").read_text())
    assert load_config("run/config.yaml").data.sources["a"].path == "a.jsonl"


def test_missing_file_names_the_absolute_path(tmp_path, monkeypatch):
    from lorafit.data.formats import _check_file
    from lorafit.errors import DataError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=str(tmp_path / "nope.jsonl")):
        _check_file(Path("nope.jsonl"), "jsonl", "a")


def test_config_command_prints_yaml_with_a_doc_per_key(capsys):
    assert main(["config", "quotes", "lora.r=16", "data.sources.quotes.join=' | #'"]) == 0
    out = capsys.readouterr().out
    cfg = load_config("quotes", ["lora.r=16", "data.sources.quotes.join=' | #'"])
    assert build_config(yaml.safe_load(out)).to_dict() == cfg.to_dict()  # a source shows the settings its kind reads
    keyed = [line for line in out.splitlines() if line.strip() and not line.strip().startswith("quotes:")]
    assert all("  # " in line for line in keyed), [line for line in keyed if "  # " not in line]
    assert "r: 16  # LoRA rank" in out


def test_help_says_what_tiny_is_and_shows_generate_defaults(capsys):
    for command in ("init-model", "generate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "tiny: 2 layers, 2 heads, width 64, 256 positions" in out
    assert "(default: 70)" in out and "(default: 0.7)" in out


# ---------------------------------------------------------------- trackers


def test_trackers_get_every_record_and_the_config(tmp_path):
    from lorafit import trackers

    seen = {}

    class Fake:
        def __init__(self, run_dir, name, config):
            seen.update(run_dir=run_dir, config=config, records=[], closed=False)

        def log(self, record):
            seen["records"].append(record)

        def close(self):
            seen["closed"] = True

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.append_metrics({"step": 0, "val_loss": 1.0})  # before: not reported
    with trackers.opened(["fake"], run, {"lora": {"r": 8}}, factories={"fake": Fake}):
        run.append_metrics({"step": 1, "loss": 2.0})
        run.append_metrics({"step": 2, "val_loss": 1.5, "val_by_source": {"a": {"val_loss": 1.5}}})
    run.append_metrics({"step": 3, "loss": 0.5})  # after: not reported
    assert seen["config"] == {"lora": {"r": 8}} and seen["closed"] and run.listeners == []
    assert seen["records"] == run.read_metrics()[1:3]
    assert trackers.scalars(seen["records"][1]) == {"val_loss": 1.5, "val_by_source/a/val_loss": 1.5}


def test_a_missing_tracker_extra_names_its_install(monkeypatch):
    import importlib.util

    from lorafit import trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(LorafitError, match=r'pip install -e "\.\[mlflow\]"'):
        trackers.check_available(["tensorboard", "mlflow"])

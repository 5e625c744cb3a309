"""`lorafit init-model`, `lorafit recipes`, and the start-up check that switches to offline mode when the Hub's
name does not resolve; one real `python -m lorafit` process for the entry point, its exit code and its streams."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch
import yaml

from lorafit.cli import main

# ---------------------------------------------------------------- lorafit init-model


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def test_init_model_writes_a_model_transformers_loads(tmp_path, tiny_tokenizer_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Tokenizer

    out = tmp_path / "tiny"
    assert main(["init-model", "--config", "tiny", "--tokenizer", str(tiny_tokenizer_dir), str(out)]) == 0
    assert f"random tiny model written to {out}" in capsys.readouterr().err
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth"))]  # safetensors only
    source = GPT2Tokenizer(vocab=str(tiny_tokenizer_dir / "vocab.json"), merges=str(tiny_tokenizer_dir / "merges.txt"))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    c = model.config
    # the preset as `init-model --help` describes it: 2 layers, 2 heads, width 64, 256 positions
    assert (c.model_type, c.n_layer, c.n_head, c.n_embd, c.n_positions) == ("gpt2", 2, 2, 64, 256)
    assert c.vocab_size == len(source) == 267  # 256 bytes, 10 merges, <|endoftext|>
    assert c.eos_token_id == c.bos_token_id == source.convert_tokens_to_ids("<|endoftext|>")
    saved = AutoTokenizer.from_pretrained(str(out))
    text = "Hello there, the other one."
    assert saved(text)["input_ids"] == source(text)["input_ids"] and saved.eos_token == "<|endoftext|>"
    with torch.no_grad():
        assert model(torch.tensor([saved(text)["input_ids"]])).logits.shape == (1, len(source(text)["input_ids"]), 267)


def test_init_model_seeds_and_raw_gpt2_bpe_files(tmp_path, tiny_tokenizer_dir):
    """Same seed, same weights; another seed, others. GPT-2's own release (vocab.json + merges.txt) is a tokenizer too."""
    from safetensors.torch import load_file

    raw = tmp_path / "raw-bpe"
    raw.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tiny_tokenizer_dir / name, raw / name)
    for name, tok, seed in (("a", tiny_tokenizer_dir, 0), ("b", raw, 0), ("c", tiny_tokenizer_dir, 1)):
        assert main(["init-model", "--config", "tiny", "--tokenizer", str(tok), "--seed", str(seed), str(tmp_path / name)]) == 0
    a, b, c = (load_file(str(tmp_path / n / "model.safetensors")) for n in "abc")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_init_model_gpt2_preset_is_gpt2_small():
    """`--config gpt2` is transformers' default GPT2Config (GPT-2 small): 124,439,808 parameters with the GPT-2 vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lorafit.init_model import SIZES

    default = GPT2Config()
    assert SIZES["gpt2"] == {k: getattr(default, k) for k in ("n_layer", "n_head", "n_embd", "n_positions")}
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, **SIZES["gpt2"]))
    assert sum(p.numel() for p in model.parameters()) == 124_439_808


def test_init_model_refuses_a_non_empty_directory_and_an_unknown_preset(tmp_path, tiny_tokenizer_dir, capsys):
    from lorafit.errors import LorafitError
    from lorafit.init_model import init_model

    out = tmp_path / "models"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    before = snapshot(out)
    assert main(["init-model", "--config", "tiny", "--tokenizer", str(tiny_tokenizer_dir), str(out)]) == 2
    err = capsys.readouterr().err
    assert f"'{out}' exists and is not empty; choose a new directory." in err and "Traceback" not in err
    assert snapshot(out) == before
    with pytest.raises(SystemExit) as exit_:  # argparse: exit 2 and the choices
        main(["init-model", "--config", "huge", "--tokenizer", str(tiny_tokenizer_dir), str(tmp_path / "m")])
    assert exit_.value.code == 2
    assert "invalid choice: 'huge'" in capsys.readouterr().err
    with pytest.raises(LorafitError, match="--config 'huge': choose one of gpt2, tiny"):
        init_model("huge", str(tiny_tokenizer_dir), tmp_path / "m")
    assert not (tmp_path / "m").exists()
    (tmp_path / "empty").mkdir()  # an empty directory is fine
    assert main(["init-model", "--config", "tiny", "--tokenizer", str(tiny_tokenizer_dir), str(tmp_path / "empty")]) == 0


# ---------------------------------------------------------------- lorafit recipes


def shipped_recipes() -> dict[str, dict]:
    """The recipe files in the package, read as plain YAML."""
    files = [f for f in resources.files("lorafit.recipes").iterdir() if f.name.endswith(".yaml")]
    return {f.name[: -len(".yaml")]: yaml.safe_load(f.read_text(encoding="utf-8")) for f in files}


LINE = re.compile(r"^(\S+)\s+epochs=(\S+)(?: max_steps=(\d+))?\s+model=(\S+) sources=(.*)$")


def test_recipes_lists_every_shipped_recipe_with_its_length(capsys, monkeypatch):
    import lorafit.cli

    real_load = lorafit.cli.load_config
    # one recipe as if it capped its steps: the listing shows max_steps beside the epochs
    monkeypatch.setattr(lorafit.cli, "load_config",
                        lambda name, overrides=None: real_load(name, ["train.max_steps=7"] if name == "quotes" else overrides))
    assert main(["recipes"]) == 0
    # each recipe's line, then its description indented below it, and one closing hint
    lines = [line for line in capsys.readouterr().out.splitlines() if line and not line.startswith((" ", "`"))]
    parsed = {m[1]: m.groups()[1:] for m in map(LINE.match, lines)}
    assert None not in parsed and len(parsed) == len(lines)
    recipes = shipped_recipes()
    assert list(parsed) == sorted(recipes) and len(recipes) >= 5
    for name, raw in recipes.items():
        epochs, max_steps, model, sources = parsed[name]
        assert float(epochs) == raw["train"]["epochs"], name
        assert max_steps == ("7" if name == "quotes" else raw["train"].get("max_steps")), name
        assert model == raw["model"]["name"] and sources.split(", ") == list(raw["data"]["sources"]), name


# ---------------------------------------------------------------- offline: the Hub's name does not resolve


@pytest.fixture
def hub_check(monkeypatch):
    """The state `lorafit` starts in: no offline switch set yet, huggingface_hub not yet imported."""
    from lorafit import cli

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("LORAFIT_OFFLINE_REASON", raising=False)
    monkeypatch.delitem(sys.modules, "huggingface_hub", raising=False)  # restored afterwards
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.org")
    asked = []

    def resolve(result):
        def getaddrinfo(host, port, *args, **kwargs):
            asked.append((host, port))
            if isinstance(result, Exception):
                raise result
            return result
        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        cli._offline_if_hub_unreachable()
        return asked

    return resolve


def test_unresolvable_hub_name_switches_to_offline_mode(hub_check):
    asked = hub_check(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    assert asked == [("hub.example.org", 443)]  # the endpoint in use, not always huggingface.co
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
    from lorafit.errors import offline_note

    assert "hub.example.org does not resolve: this machine looks offline" in offline_note()  # said in load errors


def test_resolvable_hub_name_stays_online(hub_check):
    asked = hub_check([(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 443))])
    assert asked == [("hub.example.org", 443)]
    assert "HF_HUB_OFFLINE" not in os.environ and "HF_DATASETS_OFFLINE" not in os.environ
    from lorafit.errors import offline_note

    assert offline_note() == ""


def test_no_lookup_when_offline_is_set_or_too_late(hub_check, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_check(AssertionError("looked up")) == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setitem(sys.modules, "huggingface_hub", object())  # imported: its offline switch is read already
    assert hub_check(AssertionError("looked up")) == []
    assert "HF_HUB_OFFLINE" not in os.environ


# A process whose name lookups of huggingface.co fail; a second lookup (a network attempt after the switch to
# offline mode) ends it with exit code 99.
NO_DNS = """
import os, socket
_real, _seen = socket.getaddrinfo, []
def getaddrinfo(host, *args, **kwargs):
    if host == "huggingface.co":
        _seen.append(host)
        if len(_seen) > 1:
            os.write(2, b"a network attempt after offline mode was set\\n")
            os._exit(99)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return _real(host, *args, **kwargs)
socket.getaddrinfo = getaddrinfo
"""


def test_the_real_command_offline_says_what_to_do_exits_2_and_writes_nothing(tmp_path):
    """`python -m lorafit train quotes` on a machine that cannot resolve the Hub: offline mode at once (no network
    attempt, no minute of retries), one message on stderr naming the overrides for local files, exit code 2."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_DNS)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    env["HF_HOME"] = str(tmp_path / "hf-home")  # an empty Hub cache: nothing of gpt2 to fall back on
    proc = subprocess.run([sys.executable, "-m", "lorafit", "train", "quotes", f"output_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("error: ") == 1
    for fragment in ("error: Could not load tokenizer 'gpt2'", "huggingface.co does not resolve: this machine looks offline",
                     "To run offline, point lorafit at local files",
                     "model.name=LOCAL_MODEL_DIR", "data.sources.quotes.path=LOCAL_FILE"):
        assert fragment in proc.stderr, (fragment, proc.stderr)
    assert proc.stdout == ""  # stdout is for results only
    assert not (tmp_path / "run").exists()

"""`lorafit export`: GGUF files checked by llama.cpp itself (llama-cpp-python, built from source by the dev
extra), against the merged transformers model in fp32 and against `lorafit generate`; and read back by
transformers' own GGUF loader. Tiny random models of four families, and the full-size random GPT-2."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_texts, one_torch_thread, shared_path
from families import build_model, save_family_model

FAMILIES = ["gpt2", "llama", "qwen2", "starcoder2"]  # GPT-2, Llama-style, Qwen-style, and one more
HARD_STRINGS = [
    "", " ", "  leading", "trailing  ", "several    spaces   here", "new\nline\n\n\ttab\t\t", "\r\n windows",
    "digits 0 12 345 6789 3.14159 1,000,000", "punctuation!!! ??? ... ---===*** ''' \"\"\"", "accents: café naïve Ångström",
    "emoji 🚀😶\u200d🌫️ 🦙🦙", "CJK 我想在apple工作1314151天", "I've 'told he's there, 'RE you sure?", "<|endoftext|>",
    "text<|endoftext|>more text",
]
# f16 has 11 significant bits: each weight is within 2^-11 (relative) of the fp32 merged weight, and llama.cpp's
# CPU f16 matmul rounds the activations to f16 too. Through two layers and a final projection these relative
# errors of ~5e-4 each add up to a few parts in a thousand of the logits' size, so: |f16 - fp32| <= 8 * 2^-11 *
# max|fp32 logit|, with room for the sums over the width (the measured error is well inside it).
F16_TOLERANCE = 8 * 2**-11
# The text each tiny base is fitted to before its LoRA run, and the 64-token input the logits are compared on: a
# random tiny model's logits are near-flat (its top two within q8_0's rounding of each other), which makes an
# argmax comparison a coin toss; a fitted one is peaked, as a real model is.
FAMILY_TEXTS = ["The secret to happiness is a quiet morning.", "Rivers find the sea.", "We walk on, one step at a time."]
FAMILY_TEXT = " ".join(FAMILY_TEXTS)


def llama_tokens(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) if text else []


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def llama_greedy(llm, ids: list[int], n: int, eos: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token == eos:
            break
        out.append(token)
        llm.eval([token])
    return out


def load_llama(path: Path, lora: Path | None = None):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, seed=0,
                 lora_path=str(lora) if lora else None)


def torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double().numpy()


def input_64(tokenizer, text: str | None = None) -> list[int]:
    ids = tokenizer(text or " ".join(make_texts(20, seed=7)), add_special_tokens=False)["input_ids"][:64]
    assert len(ids) == 64
    return ids


@pytest.fixture(scope="module")
def llama_cpp(tmp_path_factory):
    """llama.cpp's converter as lorafit finds it (fetched once with pip from llama-cpp-python's source; or the
    llama.cpp checkout a developer names in $LORAFIT_LLAMA_CPP), for every test of the module."""
    from lorafit.export import LLAMA_CPP_ENV, llama_cpp_dir

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAFIT_CACHE", str(tmp_path_factory.mktemp("export-cache")))
        found = llama_cpp_dir()
        mp.setenv(LLAMA_CPP_ENV, str(found))
        yield found


def train_run(root: Path, model_dir: Path, data: Path, steps: int = 3, seq_len: int = 40, lr: float = 3e-2) -> Path:
    from lorafit.config import load_config
    from lorafit.train import train

    run = root / "run"
    cfg = load_config("quotes", [
        f"model.name={model_dir}", f"data.sources.quotes.path={data}", f"data.seq_len={seq_len}",
        f"train.max_steps={steps}", f"train.lr={lr}", "train.warmup_steps=0", "eval.before_training=false",
        "eval.sample_prompt=null", f"output_dir={run}",
    ])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAFIT_CACHE", str(root / "cache"))
        train(cfg, progress=False)
    return run


def fitted_family_model(family: str, tokenizer, out: Path, steps: int = 100) -> Path:
    """A tiny random `family` model fitted with AdamW to FAMILY_TEXT's first 64 tokens (it predicts them
    peaked: 100% of next tokens after 100 steps, the top two logits >= 0.1 apart), saved as a model directory
    lorafit can load."""
    model = build_model(family, len(tokenizer), tokenizer.eos_token_id).eval()  # eval: no dropout while fitting
    ids = torch.tensor([input_64(tokenizer, FAMILY_TEXT)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with one_torch_thread():
        for _ in range(steps):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def family_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("export-data") / "texts.jsonl"
    path.write_text("".join(json.dumps({"quote": t}) + "\n" for t in make_texts(40, seed=3, max_words=12)), encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, llama_cpp, tmp_path_factory, tiny_tokenizer, family_data):
    """A tiny random model of the family fitted to FAMILY_TEXT, its LoRA trained a few steps; exported as f16, q8_0
    and adapter-only (+ base)."""
    from lorafit.cli import main
    from lorafit.merge import merged_model

    family = request.param
    root = tmp_path_factory.mktemp(f"export-{family}")
    # lr 1e-2: the adapter changes the logits well past f16's tolerance, yet leaves the fitted base's predictions
    run = train_run(root, fitted_family_model(family, tiny_tokenizer, root / "model"), family_data, lr=1e-2)
    out = root / "gguf"
    assert main(["export", str(run), str(out / "model.f16.gguf")]) == 0
    assert main(["export", str(run), str(out / "model.q8_0.gguf"), "--quant", "q8_0"]) == 0
    assert main(["export", str(run), str(out / "adapter.gguf"), "--adapter-only", "--ollama"]) == 0
    merged, tokenizer = merged_model(run)
    return {"family": family, "run": run, "out": out, "merged": merged.eval(), "tokenizer": tokenizer}


def test_llama_cpp_tokenizes_hard_strings_as_transformers_does(exported):
    llm = load_llama(exported["out"] / "model.f16.gguf")
    tokenizer = exported["tokenizer"]
    for text in HARD_STRINGS:
        assert llama_tokens(llm, text) == tokenizer(text, add_special_tokens=False)["input_ids"], (exported["family"], text)


def test_f16_logits_match_merged_fp32_and_q8_0_argmax_agrees(exported):
    ids = input_64(exported["tokenizer"], FAMILY_TEXT)
    reference = torch_logits(exported["merged"], ids)
    # the merged model predicts the text it was fitted to, so its argmax is a real prediction (not all EOS)
    predicted = (reference[:-1].argmax(-1) == np.array(ids[1:])).mean()
    assert predicted >= 0.75, (exported["family"], predicted)
    f16 = llama_logits(load_llama(exported["out"] / "model.f16.gguf"), ids)
    assert np.abs(f16 - reference).max() <= F16_TOLERANCE * np.abs(reference).max(), exported["family"]
    q8 = llama_logits(load_llama(exported["out"] / "model.q8_0.gguf"), ids)
    agree = (q8.argmax(-1) == reference.argmax(-1)).mean()
    assert agree >= 0.98, (exported["family"], agree)


def test_greedy_generation_from_f16_equals_lorafit_generate(exported, capsys, monkeypatch):
    from lorafit.cli import main, show

    tokenizer, prompt = exported["tokenizer"], "The secret to happiness is"  # FAMILY_TEXT's start
    new = llama_greedy(load_llama(exported["out"] / "model.f16.gguf"), tokenizer(prompt)["input_ids"], 32,
                       tokenizer.eos_token_id)
    assert new, "llama.cpp generated nothing: the comparison would be empty"
    monkeypatch.setenv("COLUMNS", "100000")  # one line per sample, as show() prints it
    capsys.readouterr()
    assert main(["generate", str(exported["run"]), prompt, "--temperature", "0", "--max-new-tokens", "32"]) == 0
    printed = capsys.readouterr().out
    show(prompt, [tokenizer.decode(new, skip_special_tokens=True)], None, "")
    assert printed == capsys.readouterr().out, exported["family"]


def test_adapter_only_gguf_on_the_base_gives_the_merged_logits(exported):
    ids = input_64(exported["tokenizer"])
    reference = torch_logits(exported["merged"], ids)
    tolerance = F16_TOLERANCE * np.abs(reference).max()
    base = llama_logits(load_llama(exported["out"] / "adapter.base.gguf"), ids)
    assert np.abs(base - reference).max() > 4 * tolerance, "the adapter changes too little to tell it was applied"
    with_lora = llama_logits(load_llama(exported["out"] / "adapter.base.gguf", exported["out"] / "adapter.gguf"), ids)
    assert np.abs(with_lora - reference).max() <= tolerance, exported["family"]


def test_modelfile_names_the_files_the_template_and_eos(exported):
    text = (exported["out"] / "Modelfile").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert "FROM ./adapter.base.gguf" in lines and "ADAPTER ./adapter.gguf" in lines
    assert 'TEMPLATE """{{ .Prompt }}"""' in lines  # a plain-text run: the prompt is continued as it is
    assert f'PARAMETER stop "{exported["tokenizer"].eos_token}"' in lines


def test_transformers_gguf_loader_reads_the_f16_back_to_the_same_weights(exported):
    from transformers import AutoModelForCausalLM

    out, config = exported["out"], exported["merged"].config
    # transformers' GGUF reader maps GPT-2's context length to n_ctx, which GPT2Config (transformers 5) no longer
    # reads: n_positions is given as the merged model has it (the file does hold 128: gpt2.context_length)
    kwargs = {"n_positions": config.n_positions} if exported["family"] == "gpt2" else {}
    loaded = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.f16.gguf", **kwargs).state_dict()
    expected = exported["merged"].state_dict()
    compared = 0
    for name, tensor in expected.items():
        if name in loaded and tensor.dim() == 2:  # the matrices: in f16, but those llama.cpp keeps in f32 (GPT-2's
            # position embeddings), as are 1-d norms and biases: each reads back as its f16 rounding or exactly
            back = loaded[name].float()
            assert torch.equal(back, tensor.half().float()) or torch.equal(back, tensor.float()), (exported["family"], name)
            compared += 1
    assert compared >= 4, f"only {compared} matrices matched by name: {sorted(loaded)[:5]}"


def test_model_card_lists_the_exported_files_with_their_sha256(exported):
    card = (exported["run"] / "README.md").read_text(encoding="utf-8")
    for name in ("model.f16.gguf", "model.q8_0.gguf", "adapter.gguf", "adapter.base.gguf", "Modelfile"):
        digest = hashlib.sha256((exported["out"] / name).read_bytes()).hexdigest()
        assert f"`{name}`" in card and digest in card, name


# ---------------------------------------------------------------- q4_k_m and the Ollama template of a prompt run


def test_q4_k_m_by_llama_cpps_quantiser_and_a_prompt_template_in_ollama_syntax(llama_cpp, tmp_path, tiny_tokenizer, capsys):
    """A GPT-2 wide enough for q4_k_m's 256-value blocks, trained on alpaca-formatted prompt/completion pairs."""
    from gguf import GGUFReader, GGMLQuantizationType

    from lorafit.cli import main

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=256, n_layer=1, n_head=4, n_positions=256,
                               bos_token_id=tiny_tokenizer.eos_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
                    ).save_pretrained(str(model_dir))
    tiny_tokenizer.save_pretrained(str(model_dir))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"instruction": t, "input": "", "output": t[::-1]}) + "\n" for t in make_texts(20, seed=5, max_words=6)))
    from lorafit.config import load_config
    from lorafit.train import train

    cfg = load_config("quotes", [
        f"model.name={model_dir}", f"data.sources.quotes.path={data}", "data.sources.quotes.kind=prompt_completion",
        "data.sources.quotes.template=alpaca", "data.seq_len=200", "train.max_steps=1", "eval.before_training=false",
        "eval.sample_prompt=null", f"output_dir={tmp_path / 'run'}",
    ])
    train(cfg, progress=False)
    out = tmp_path / "gguf" / "model.q4_k_m.gguf"
    assert main(["export", str(tmp_path / "run"), str(out), "--quant", "q4_k_m", "--ollama"]) == 0
    types = {GGMLQuantizationType(t.tensor_type).name for t in GGUFReader(str(out)).tensors}
    assert "Q4_K" in types, types  # llama.cpp's quantiser ran (the converter alone cannot write q4_k)
    modelfile = (tmp_path / "gguf" / "Modelfile").read_text(encoding="utf-8")
    assert ("TEMPLATE \"\"\"Below is an instruction that describes a task. Write a response that appropriately completes "
            "the request.\n\n### Instruction:\n{{ .Prompt }}\n\n### Response:\n{{ .Response }}\"\"\"") in modelfile
    load_llama(out)  # llama.cpp loads it


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def gpt2_run(llama_cpp, tmp_path_factory, tiny_tokenizer, family_data) -> Path:
    """A tiny GPT-2 run, trained one step, for the refusals."""
    root = tmp_path_factory.mktemp("export-bad")
    return train_run(root, save_family_model("gpt2", tiny_tokenizer, root / "model"), family_data, steps=1)


def export_error(capsys, *argv) -> str:
    from lorafit.cli import main

    capsys.readouterr()
    assert main(["export", *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def no_leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_a_run_without_an_adapter_is_refused(tmp_path, capsys, llama_cpp):
    (tmp_path / "run").mkdir()
    err = export_error(capsys, tmp_path / "run", tmp_path / "out.gguf")
    assert "holds no adapter" in err and not (tmp_path / "out.gguf").exists()


def test_out_that_is_not_a_lorafit_gguf_is_left_alone(gpt2_run, tmp_path, capsys):
    for content in (b"my notes", b"GGUF\x03\x00\x00\x00 someone else's"):
        out = tmp_path / "model.gguf"
        out.write_bytes(content)
        err = export_error(capsys, gpt2_run, out)
        assert "is not a GGUF file lorafit exported" in err and out.read_bytes() == content
    assert no_leftovers(tmp_path) == ["model.gguf"]


def test_out_inside_the_run_directory_is_refused(gpt2_run, capsys):
    err = export_error(capsys, gpt2_run, gpt2_run / "adapter" / "model.gguf")
    assert str(gpt2_run) in err and not (gpt2_run / "adapter" / "model.gguf").exists()


def test_a_quantisation_the_model_cannot_take_is_refused(gpt2_run, tmp_path, capsys):
    err = export_error(capsys, gpt2_run, tmp_path / "a.gguf", "--adapter-only", "--quant", "q4_k_m")
    assert "--quant q4_k_m" in err
    from transformers import GPT2Config

    from lorafit.errors import LorafitError
    from lorafit.export import check_quant

    with pytest.raises(LorafitError, match="hidden size is 36, not a multiple of 32"):
        check_quant(GPT2Config(n_embd=36, n_head=4), "q8_0", adapter_only=False)
    check_quant(GPT2Config(n_embd=36, n_head=4), "bf16", adapter_only=False)  # the 16-bit types take any width
    assert no_leftovers(tmp_path) == []


def test_a_family_llama_cpp_cannot_run_is_refused_by_name(llama_cpp, tmp_path, tiny_tokenizer, capsys):
    from peft import LoraConfig, get_peft_model

    model = build_model("opt", len(tiny_tokenizer), tiny_tokenizer.eos_token_id)
    base = tmp_path / "opt"
    model.save_pretrained(str(base))
    tiny_tokenizer.save_pretrained(str(base))
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft.peft_config["default"].base_model_name_or_path = str(base)
    peft.save_pretrained(str(tmp_path / "adapter"))
    err = export_error(capsys, tmp_path / "adapter", tmp_path / "out" / "opt.gguf")
    assert "llama.cpp cannot run the opt family (OPTForCausalLM)" in err
    assert no_leftovers(tmp_path / "out") == []


def test_not_enough_disk_is_refused_before_writing(gpt2_run, tmp_path, capsys, monkeypatch):
    import shutil

    from lorafit import export

    real = shutil.disk_usage
    monkeypatch.setattr(export.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    err = export_error(capsys, gpt2_run, tmp_path / "out" / "model.gguf")
    assert "Not enough disk space" in err and "MiB" in err
    assert no_leftovers(tmp_path / "out") == []  # no partial file, no work directory left


def test_a_failing_conversion_leaves_no_partial_file(gpt2_run, tmp_path, capsys, monkeypatch):
    """The GGUF is written under a temporary name: when llama.cpp's tool fails midway, OUT is not there."""
    from lorafit import export

    def fail_after_writing(args, what):  # llama.cpp's converter stopped by a full disk, its file half-written
        outfile = Path(args[args.index("--outfile") + 1])
        outfile.write_bytes(b"GGUF\x03\x00\x00\x00 half a file")
        raise OSError(28, "No space left on device", str(outfile))

    monkeypatch.setattr(export, "run_tool", fail_after_writing)
    out = tmp_path / "out" / "model.gguf"
    err = export_error(capsys, gpt2_run, out)
    assert "the disk is full" in err
    assert no_leftovers(tmp_path / "out") == []


def test_an_earlier_export_is_replaced(gpt2_run, tmp_path, capsys):
    from lorafit.cli import main

    out = tmp_path / "out" / "model.gguf"
    assert main(["export", str(gpt2_run), str(out), "--quant", "bf16"]) == 0
    first = out.read_bytes()
    assert main(["export", str(gpt2_run), str(out)]) == 0  # ours: replaced, now f16
    assert out.read_bytes() != first and no_leftovers(tmp_path / "out") == ["model.gguf"]


# ---------------------------------------------------------------- the full-size random GPT-2 (../shared)


def test_full_size_gpt2_tokens_f16_logits_and_q8_0_argmax(llama_cpp, tmp_path_factory, family_data):
    """The full-size random GPT-2 (124M): tokens, f16 logits and q8_0's argmax (>= 98%, as the issue asks). Its
    random weights give nearly the same argmax token at every position, so q8_0's agreement here checks little
    beyond the quantised 124M file loading and running; the fitted tiny families carry the meaningful q8_0 check."""
    from lorafit.cli import main
    from lorafit.init_model import init_model
    from lorafit.merge import merged_model

    tokenizer_dir = shared_path("assets", "gpt2-tokenizer")
    root = tmp_path_factory.mktemp("export-gpt2-full")
    run = train_run(root, init_model("gpt2", str(tokenizer_dir), root / "model"), family_data, steps=1, seq_len=24)
    out = root / "gpt2.f16.gguf"
    assert main(["export", str(run), str(out)]) == 0
    assert main(["export", str(run), str(root / "gpt2.q8_0.gguf"), "--quant", "q8_0"]) == 0
    merged, tokenizer = merged_model(run)
    llm = load_llama(out)
    for text in HARD_STRINGS:
        assert llama_tokens(llm, text) == tokenizer(text, add_special_tokens=False)["input_ids"], text
    ids = input_64(tokenizer)
    reference = torch_logits(merged.eval(), ids)
    assert np.abs(llama_logits(llm, ids) - reference).max() <= F16_TOLERANCE * np.abs(reference).max()
    del llm  # one 124M model in llama.cpp at a time
    q8 = llama_logits(load_llama(root / "gpt2.q8_0.gguf"), ids)
    assert (q8.argmax(-1) == reference.argmax(-1)).mean() >= 0.98

"""`lorafit export RUN OUT`: a GGUF file for llama.cpp, Ollama and LM Studio, written by llama.cpp's own tools.

The base with the adapter merged (lorafit/merge.py, in fp32) is saved as a transformers model in a work
directory beside OUT, then llama.cpp's converter (convert_hf_to_gguf.py) writes the GGUF, and llama.cpp's
quantiser (llama_model_quantize) makes q4_k_m from its f16; `--adapter-only` converts the LoRA adapter alone
with convert_lora_to_gguf.py. Those scripts ship in llama-cpp-python's source (vendor/llama.cpp), not in its
wheel: lorafit takes them from that source once, fetched with pip, into its cache (or from a llama.cpp
checkout named by $LORAFIT_LLAMA_CPP). The file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from lorafit.atomic import atomic_dir, atomic_path, atomic_write_text
from lorafit.data.tokenize import default_cache_dir
from lorafit import rundir
from lorafit.errors import LorafitError
from lorafit.forgetting import refresh_model_card
from lorafit.generate import base_load_config, load_inference_base, resolve_adapter_dir
from lorafit.gguf_convert import KIND_KEY
from lorafit.merge import merged_model, save_model
from lorafit.modelfile import MODELFILE, check_modelfile_target, modelfile_text
from lorafit.rundir import CONFIG_FILE, EVAL_DIR, SUMMARY_FILE, saving

QUANTS = ("f16", "bf16", "q8_0", "q4_k_m")
# What convert_hf_to_gguf.py writes for each: q4_k_m is made from its f16 by llama.cpp's quantiser.
CONVERTER_TYPE = {"f16": "f16", "bf16": "bf16", "q8_0": "q8_0", "q4_k_m": "f16"}
BYTES_PER_WEIGHT = {"f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_k_m": 0.6}  # q8_0: 32 int8 + an f16 scale a block
# The quantised types work on blocks of 32 values along a row (q4_k_m's super-blocks are 256; llama.cpp uses
# 32-value types for rows that are not a multiple of 256): a width that is no multiple of 32 cannot be quantised.
BLOCK = {"q8_0": 32, "q4_k_m": 32}
LLAMA_CPP_ENV = "LORAFIT_LLAMA_CPP"
EXPORTS_FILE = "exports.json"  # in RUN/eval/: what was exported, for the model card
EXTRA_HINT = 'Install the GGUF tools: pip install -e ".[gguf]" (llama-cpp-python builds llama.cpp: it needs cmake and a C++ compiler).'
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")
CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")


# ---------------------------------------------------------------- llama.cpp's tools


def llama_cpp_dir() -> Path:
    """A directory holding llama.cpp's converter scripts, its `conversion` package and its gguf-py."""
    given = os.environ.get(LLAMA_CPP_ENV)
    if given:
        path = Path(given).expanduser()
        if not ((path / "convert_hf_to_gguf.py").is_file() and (path / "conversion").is_dir()):
            raise LorafitError(f"${LLAMA_CPP_ENV}={given} holds no convert_hf_to_gguf.py and conversion/: give a "
                               "llama.cpp checkout, or unset it to use the one in llama-cpp-python's source.")
        return path
    try:
        # optional extra: [gguf] (llama-cpp-python, gguf)
        import gguf  # noqa: F401  (the extra's other half: lorafit reads GGUF headers with it)

        version = importlib.metadata.version("llama_cpp_python")
    except (ImportError, importlib.metadata.PackageNotFoundError):
        raise LorafitError(f"lorafit export needs llama.cpp's Python tools. {EXTRA_HINT}") from None
    target = default_cache_dir() / "llama.cpp" / version
    if not (target / "convert_hf_to_gguf.py").is_file():
        fetch_converter(version, target)
    return target


def fetch_converter(version: str, target: Path) -> None:
    """llama.cpp's converter from the llama-cpp-python source of the installed version, fetched with pip."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download.tmp-") as tmp:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                              "-d", tmp, f"llama-cpp-python=={version}"], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if got.returncode or not sdists:
            why = (got.stderr or got.stdout).strip().splitlines()[-1:] or ["no source archive"]
            raise LorafitError(
                f"llama.cpp's converter ships in llama-cpp-python's source, which lorafit fetches once with pip, and "
                f"pip could not fetch llama-cpp-python=={version}: {why[0]}. Retry with the network, or set "
                f"${LLAMA_CPP_ENV} to a llama.cpp checkout.")
        with atomic_dir(target) as out, tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                parts = member.name.split("/vendor/llama.cpp/", 1)
                if len(parts) == 2 and any(parts[1] == f or (f.endswith("/") and parts[1].startswith(f))
                                           for f in CONVERTER_FILES):
                    member.name = parts[1]
                    tar.extract(member, out, filter="data")


def converter_architectures(llama_cpp: Path) -> set[str]:
    """The transformers architectures llama.cpp's converter has a model class for (its TEXT_MODEL_MAP)."""
    tree = ast.parse((llama_cpp / "conversion" / "__init__.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
        if getattr(target, "id", None) == "TEXT_MODEL_MAP" and isinstance(node.value, ast.Dict):
            return {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    return set()


def run_tool(args: list[str], what: str) -> None:
    """One of llama.cpp's tools in a process of its own (lorafit/gguf_convert.py); its failure as one message."""
    done = subprocess.run([sys.executable, "-m", "lorafit.gguf_convert", *args], capture_output=True, text=True)
    if done.returncode:
        log = (done.stderr + done.stdout).strip()
        if "No space left on device" in log:
            raise LorafitError(f"Could not write {what}: the disk is full. Free space and run the export again.")
        tail = "\n  ".join(log.splitlines()[-6:])
        raise LorafitError(f"llama.cpp's tools failed writing {what} (exit code {done.returncode}):\n  {tail}")


def pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's BPE pre-tokenizer when tokenizer.json says it plainly ("-": not known
    here). The converter tries its table of known vocabularies first (lorafit/gguf_convert.py)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "-"
    spec = json.loads(backend.to_str())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    if model.get("type") != "BPE":
        return "-"
    gpt2 = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    if spec.get("normalizer") is None and all(pre.get(k) == v for k, v in gpt2.items()):
        return "gpt-2"  # GPT-2's byte-level split (its regex), whatever the merges
    steps = pre.get("pretokenizers") or []
    if (pre.get("type") == "Sequence" and len(steps) == 2 and (steps[0].get("pattern") or {}).get("Regex") == QWEN2_SPLIT
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex")):
        return "qwen2"  # Qwen2's split then bytes (transformers' Qwen2Tokenizer puts it on any vocabulary)
    return "-"


def with_n_ctx(model_dir: Path) -> None:
    """llama.cpp's GPT-2 converter reads the context length from `n_ctx`, which transformers 5 no longer writes."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("model_type") == "gpt2" and "n_ctx" not in config:
        config["n_ctx"] = config["n_positions"]
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")


# ---------------------------------------------------------------- checks before any work


def is_lorafit_gguf(path: Path) -> bool:
    """A GGUF file `lorafit export` wrote (it carries the key lorafit.kind)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return False
        from gguf import GGUFReader  # optional extra: [gguf]

        return KIND_KEY in GGUFReader(str(path)).fields
    except Exception:  # a damaged or truncated GGUF (the reader raises what numpy raises): not one to replace
        return False


def check_out(out: Path, run: Path, what: str = "the GGUF file") -> None:
    if out.is_dir():
        raise LorafitError(f"'{out}' is a directory; give a file name for {what}, e.g. {out / 'model.gguf'}.")
    if out.exists() and not is_lorafit_gguf(out):
        raise LorafitError(f"'{out}' exists and is not a GGUF file lorafit exported; it is left as it is. "
                           "Choose another name for the export.")
    check = getattr(rundir, "check_output_path", None)
    if check is not None:
        check(str(out), what)
    elif Path(run).resolve() in out.resolve().parents:  # lorafit manages what is inside a run directory
        raise LorafitError(f"'{out}' is inside the run directory {run}; write the export outside it.")


def check_family(config, llama_cpp: Path) -> str:
    """The architecture llama.cpp's converter knows the model by; refuses a family it cannot convert and run."""
    arch = (getattr(config, "architectures", None) or [None])[0]
    if arch not in converter_architectures(llama_cpp):
        raise LorafitError(f"llama.cpp cannot run the {config.model_type} family ({arch or 'no architecture named'}): "
                           f"its converter has no model class for it, so there is no GGUF to export. Use the run with "
                           "transformers (`lorafit merge`, `lorafit serve`) instead.")
    return arch


def check_quant(config, quant: str, adapter_only: bool) -> None:
    if quant not in QUANTS:
        raise LorafitError(f"--quant {quant}: choose one of {', '.join(QUANTS)}.")
    if adapter_only and quant == "q4_k_m":
        raise LorafitError("--quant q4_k_m: llama.cpp's LoRA adapters are f16, bf16 or q8_0 (its quantiser does not "
                           "take adapters); choose one of those with --adapter-only.")
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    block = BLOCK.get(quant)
    if block and width and width % block:
        raise LorafitError(f"--quant {quant}: the {config.model_type} model's hidden size is {width}, not a multiple of "
                           f"{block}, and {quant} quantises rows in blocks of {block}; llama.cpp would leave the weights "
                           "unquantised. Export f16 or bf16.")


def check_space(directory: Path, need: int) -> None:
    probe = next((p for p in [directory, *directory.parents] if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    if free < need:
        raise LorafitError(f"Not enough disk space in {probe}: the export needs about {need / 2**20:,.0f} MiB there "
                           f"(the merged fp32 model while converting, and the GGUF), and {free / 2**20:,.0f} MiB are "
                           "free. Free space or export elsewhere.")


# ---------------------------------------------------------------- export


def export(run, out, quant: str = "f16", adapter_only: bool = False, ollama: bool = False,
           base: str | None = None) -> list[Path]:
    """Write OUT (and with `ollama`, a Modelfile beside it; with `adapter_only` and `ollama`, the base's GGUF too).
    Returns the files written."""
    run, out = Path(run), Path(out).expanduser()
    adapter_dir = resolve_adapter_dir(run)  # a run without an adapter stops here
    check_out(out, run)
    base_out = out.with_name(f"{out.stem}.base{out.suffix or '.gguf'}") if adapter_only and ollama else None
    if base_out is not None:
        check_out(base_out, run, "the base's GGUF file")
    if ollama:
        check_modelfile_target(out.parent / MODELFILE)
    llama_cpp = llama_cpp_dir()
    model_cfg = base_load_config(adapter_dir, base)
    config = AutoConfig.from_pretrained(model_cfg.name, revision=model_cfg.revision,
                                        trust_remote_code=model_cfg.trust_remote_code)
    check_quant(config, quant, adapter_only)
    check_family(config, llama_cpp)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"general.quantized_by": "lorafit", "general.description": f"base {model_cfg.name} with the LoRA adapter "
            f"of {run.resolve().name}" + ("" if adapter_only else " merged") + ", exported by lorafit"}
    written = []
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-work-") as work:
        work = Path(work)
        (work / "metadata.json").write_text(json.dumps(meta), encoding="utf-8")
        if adapter_only:
            adapter_bytes = sum(f.stat().st_size for f in adapter_dir.glob("adapter_model.*"))
            check_space(out.parent, 2 * adapter_bytes + 2**20)
            base_model, tokenizer = load_inference_base(model_cfg, adapter_dir, "fp32", _cpu())
            if base_out is not None:
                check_space(out.parent, _model_bytes(base_model, 4 + BYTES_PER_WEIGHT[quant]))
                _convert(base_model, tokenizer, base_out, quant, llama_cpp, work, "base model")
                written.append(base_out)
            config_dir = work / "base-config"
            base_model.config.save_pretrained(str(config_dir))
            with_n_ctx(config_dir)
            lora_dir = as_llama_cpp_expects(adapter_dir, work / "adapter")
            with saving(f"the GGUF file {out}", "Free space and run the export again."), atomic_path(out) as tmp:
                run_tool(["lora", str(llama_cpp), "lora-adapter", "-", "--", "--outfile", str(tmp), "--outtype",
                          quant, "--base", str(config_dir), str(lora_dir)], f"the adapter GGUF {out}")
        else:
            merged, tokenizer = merged_model(adapter_dir, base)
            intermediate = 2 if quant == "q4_k_m" else 0  # the f16 that llama.cpp's quantiser reads
            check_space(out.parent, _model_bytes(merged, 4 + intermediate + BYTES_PER_WEIGHT[quant]))
            _convert(merged, tokenizer, out, quant, llama_cpp, work, "merged model")
        written.insert(0, out)
    if ollama:
        eos = tokenizer.eos_token
        text = modelfile_text(run, tokenizer, base_out or out, out if adapter_only else None, [eos] if eos else [])
        with saving(f"{out.parent / MODELFILE}", "Free space and run the export again."):
            atomic_write_text(out.parent / MODELFILE, text)
        written.append(out.parent / MODELFILE)
    record_exports(run, written, quant, adapter_only)
    return written


def as_llama_cpp_expects(adapter_dir: Path, work: Path) -> Path:
    """The adapter as convert_lora_to_gguf.py reads it right. For fan_in_fan_out layers (GPT-2's Conv1D, weight
    [in, out]) the converter transposes the (A, B) pair as it transposes the base weight, which turns PEFT's A [r, in],
    B [out, r] into the wrong orientation; handing it A' = B^T, B' = A^T makes its transpose give back B A."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if not config.get("fan_in_fan_out"):
        return adapter_dir
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    swapped = {}
    for name, t in tensors.items():
        if ".lora_A." in name:
            swapped[name] = tensors[name.replace(".lora_A.", ".lora_B.")].T.contiguous()
        elif ".lora_B." in name:
            swapped[name] = tensors[name.replace(".lora_B.", ".lora_A.")].T.contiguous()
        else:
            swapped[name] = t
    work.mkdir(parents=True)
    save_file(swapped, str(work / "adapter_model.safetensors"))
    (work / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return work


def _cpu():
    return torch.device("cpu")


def _model_bytes(model, bytes_per_weight: float) -> int:
    return int(sum(p.numel() for p in model.parameters()) * bytes_per_weight * 1.1) + 2**24


def _convert(model, tokenizer, out: Path, quant: str, llama_cpp: Path, work: Path, what: str) -> None:
    """`model` (fp32) to OUT as a GGUF of type `quant`, by llama.cpp's converter (and quantiser for q4_k_m)."""
    model_dir = work / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    with saving(f"the {what} in {work}", "Free space and run the export again."):
        save_model(model, tokenizer, model_dir)
        with_n_ctx(model_dir)
        with atomic_path(out) as tmp:
            first = work / "f16.gguf" if quant == "q4_k_m" else tmp
            run_tool(["convert", str(llama_cpp), "model", pre_tokenizer(tokenizer), "--", str(model_dir), "--outfile",
                      str(first), "--outtype", CONVERTER_TYPE[quant], "--metadata", str(work / "metadata.json")],
                     f"the GGUF {out}")
            if quant == "q4_k_m":
                run_tool(["quantize", str(first), str(tmp), quant], f"the {quant} GGUF {out}")
    shutil.rmtree(model_dir, ignore_errors=True)


# ---------------------------------------------------------------- the model card's record


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def record_exports(run: Path, files: list[Path], quant: str, adapter_only: bool) -> None:
    """Add the files to RUN/eval/exports.json and the model card (a lorafit run only; a bare adapter has no card)."""
    if not ((run / CONFIG_FILE).is_file() and (run / SUMMARY_FILE).is_file()):
        return
    path = run / EVAL_DIR / EXPORTS_FILE
    try:
        records = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        records = []
    date = time.strftime("%Y-%m-%d %H:%M:%S")
    new = [{"path": str(f.resolve()), "kind": _kind(f, files[0], adapter_only), "quant": None if f.suffix != ".gguf" else quant,
            "bytes": f.stat().st_size, "sha256": sha256(f), "date": date} for f in files]
    keep = [r for r in records if r.get("path") not in {n["path"] for n in new}]
    with saving(f"{path}", "Free space or fix the permissions; the exported files are complete."):
        path.parent.mkdir(exist_ok=True)
        atomic_write_text(path, json.dumps({"files": keep + new}, indent=2) + "\n")
    rundir.note_written(run, path)
    refresh_model_card(run)


def _kind(f: Path, first: Path, adapter_only: bool) -> str:
    if f.name == MODELFILE:
        return "Ollama Modelfile"
    if f == first:
        return "LoRA adapter (GGUF)" if adapter_only else "merged model (GGUF)"
    return "base model (GGUF)"

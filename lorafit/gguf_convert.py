"""Runs llama.cpp's own converters and quantiser, in a process of their own (`lorafit export` starts it).

    python -m lorafit.gguf_convert convert  LLAMA_CPP_DIR KIND PRE_TOKENIZER -- convert_hf_to_gguf.py's arguments
    python -m lorafit.gguf_convert lora     LLAMA_CPP_DIR KIND PRE_TOKENIZER -- convert_lora_to_gguf.py's arguments
    python -m lorafit.gguf_convert quantize SRC DST FTYPE

The converter scripts are llama.cpp's, unchanged (lorafit/export.py finds them); a process of their own keeps
their sys.path (their vendored gguf-py) and their logging out of lorafit's. Two additions, both made here:
- every file gets the keys `lorafit.kind` (model or lora-adapter) so that `lorafit export` knows a file it
  wrote and may replace it;
- when the tokenizer's BPE pre-tokenizer is not one llama.cpp knows by the hash of its tokens (a new
  vocabulary over a known pre-tokenizer, e.g. GPT-2's byte-level split with merges of one's own), the one
  lorafit read from tokenizer.json is used (PRE_TOKENIZER; `-` for none). The export's tests check that
  llama.cpp then gives transformers' tokens on hard strings.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

KIND_KEY = "lorafit.kind"
QUANT_FTYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def _patch(llama_cpp_dir: Path, kind: str, pre_tokenizer: str) -> None:
    sys.path.insert(0, str(llama_cpp_dir))
    sys.path.insert(1, str(llama_cpp_dir / "gguf-py"))  # the converter's own gguf-py, as the script itself does
    # optional extra: [gguf]: the converter's own gguf-py and conversion/, on the path set just above
    import gguf
    from conversion import TextModel

    write_header = gguf.GGUFWriter.write_header_to_file

    def write_header_marked(self, *args, **kwargs):  # the header counts the keys: add ours before it
        self.add_string(KIND_KEY, kind)
        return write_header(self, *args, **kwargs)

    gguf.GGUFWriter.write_header_to_file = write_header_marked
    known = TextModel.get_vocab_base_pre

    def vocab_base_pre(self, tokenizer) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            if pre_tokenizer == "-":
                raise
            return pre_tokenizer

    TextModel.get_vocab_base_pre = vocab_base_pre


def _quantize(src: str, dst: str, ftype: str) -> int:
    import llama_cpp  # optional extra: [gguf] (llama-cpp-python)

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_FTYPES[ftype])
    return int(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params))


def main(argv: list[str]) -> int:
    command = argv[0]
    if command == "quantize":
        return _quantize(*argv[1:4])
    llama_cpp_dir, kind, pre_tokenizer = Path(argv[1]), argv[2], argv[3]
    script = llama_cpp_dir / ("convert_hf_to_gguf.py" if command == "convert" else "convert_lora_to_gguf.py")
    rest = argv[argv.index("--") + 1:]
    _patch(llama_cpp_dir, kind, pre_tokenizer)
    sys.argv = [str(script), *rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

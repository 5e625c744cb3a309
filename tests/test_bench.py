"""`lorafit bench` end to end on a tiny model: the JSON it writes and what it compares."""

from __future__ import annotations

import json

from conftest import make_texts
from lorafit.cli import main


def test_bench_smoke_writes_the_documented_json(tmp_path, tiny_model_dir, tiny_tokenizer_dir):
    data = tmp_path / "quotes.jsonl"
    data.write_text("".join(json.dumps({"quote": t}) + "\n" for t in make_texts(60, seed=5, max_words=5)), encoding="utf-8")
    out = tmp_path / "bench.json"
    code = main(["bench", "--examples", "32", "--warmup-steps", "1", "--model", str(tiny_model_dir),
                 "--tokenizer", str(tiny_tokenizer_dir), "--data", str(data), "--device", "cpu", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    for side in ("baseline", "lorafit"):
        for key in ("examples_per_second", "real_tokens_per_second", "peak_memory_bytes", "val_loss",
                    "eval_samples_per_second", "generation_tokens_per_second_batch1",
                    "generation_tokens_per_second_batch16", "mfu"):
            assert result[side][key] is not None and result[side][key] > 0, (side, key)
        assert result[side]["examples"] == 24  # 4 steps of 8, the first untimed
    assert result["speedup"] == result["lorafit"]["examples_per_second"] / result["baseline"]["examples_per_second"]
    # The baseline pads every example to 64 slots: slots/s is far above its real tokens/s on short texts.
    assert result["baseline"]["token_slots_per_second"] > 1.5 * result["baseline"]["real_tokens_per_second"]
    # lorafit on CPU (segment layout) computes no padding at all: every slot is a scored position.
    assert result["lorafit"]["token_slots_per_second"] == result["lorafit"]["real_tokens_per_second"]
    assert result["flop_ceiling"] > 0 and result["flops_per_token"] > 0

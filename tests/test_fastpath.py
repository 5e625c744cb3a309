"""Fast paths are chosen by a check on the model itself against its own plain forward (lorafit.fastpath)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from families import build_model
from lorafit.config import LoraConfig
from lorafit.data.packing import Layout, micro_batches
from lorafit.errors import LorafitError
from lorafit.fastpath import choose_fast_paths, preference
from lorafit.lora import apply_lora, resolve_targets
from test_invariants import EOS, token_nll, VOCAB, make_split, random_examples, tiny_gpt2

CPU = torch.device("cpu")


def lora(model):
    return apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), resolve_targets(model, "auto")[0])


def choose(model, packing="auto", seq_len=40, compile=False, device=CPU):
    return choose_fast_paths(model, packing=packing, device=device, compile=compile, seq_len=seq_len, row_len=seq_len)


def nll_by_example(model, examples, layout, fused=True) -> np.ndarray:
    split = make_split(examples)
    totals = np.zeros(len(examples))
    with torch.no_grad():
        for batch in micro_batches(split, np.arange(len(examples)), layout, 10_000, EOS):
            nll, ex = token_nll(model, batch, fused=fused)
            np.add.at(totals, ex.numpy(), nll.double().numpy())
    return totals


def alone(model, examples) -> np.ndarray:
    with torch.no_grad():
        return np.array([torch.nn.functional.cross_entropy(model(input_ids=torch.tensor([e]), use_cache=False).logits[0, :-1].double(),
                                                           torch.tensor(e[1:]), reduction="sum").item() for e in examples])


@pytest.mark.parametrize("family", ["opt", "bloom"])
def test_rows_are_refused_where_the_models_mask_ignores_restarting_positions(family):
    """OPT and Bloom build their causal mask without position ids: packed rows would attend across
    examples. The check refuses rows there, and the refusal is not spurious: rows really are wrong."""
    model = lora(build_model(family, VOCAB, EOS)).eval()
    with pytest.raises(LorafitError, match="data.packing=rows: rows: packed examples do not get"):
        choose(model, "rows")
    examples = random_examples(8, seed=1, lo=4, hi=20)
    leaked = nll_by_example(model, examples, Layout("rows", 64))
    assert np.abs(leaked - alone(model, examples)).max() > 1e-3
    chosen = choose(model).layout  # auto: an exact layout, and it is exact
    assert chosen.kind != "rows"
    np.testing.assert_allclose(nll_by_example(model, examples, chosen), alone(model, examples), rtol=1e-5)


def test_bloom_falls_back_to_padded_rows_and_says_why():
    model = lora(build_model("bloom", VOCAB, EOS))
    lines = []
    paths = choose_fast_paths(model, packing="auto", device=CPU, compile=False, seq_len=40, row_len=40, log=lines.append)
    assert paths.layout == Layout("padded") and set(paths.why_not) == {"segments", "rows"}
    assert len(lines) == 1 and "Using padded" in lines[0]
    assert paths.record()["packing"] == "padded"


def test_a_window_shorter_than_an_example_is_found_before_training():
    """Mistral with a window of 8 and examples of up to seq_len: segment attention cannot window, so
    auto takes rows (whose mask windows), and an explicit segments is refused up front."""
    model = lora(build_model("mistral", VOCAB, EOS))
    paths = choose(model, seq_len=40)
    assert paths.layout.kind == "rows" and "sliding window" in paths.why_not["segments"]
    with pytest.raises(LorafitError, match="data.packing=segments: .*sliding window"):
        choose(model, "segments", seq_len=40)
    assert choose(model, seq_len=8).layout.kind == "segments"  # no example is longer than the window


def test_fused_head_is_refused_where_the_logits_are_not_the_heads_linear_map():
    """Gemma2 soft-caps its final logits: the fused loss (hidden @ W) would score uncapped logits."""
    model = lora(build_model("gemma2", VOCAB, EOS))
    paths = choose(model)
    assert not paths.fused_head and "not its head's linear map" in paths.why_not["fused_head"]
    examples = random_examples(4, seed=2)
    fused = nll_by_example(model.eval(), examples, paths.layout, fused=True)
    plain = nll_by_example(model, examples, paths.layout, fused=False)
    assert np.abs(fused - alone(model, examples)).max() > 1e-3  # the refusal is not spurious
    np.testing.assert_allclose(plain, alone(model, examples), rtol=1e-5)


def test_a_transform_no_config_attribute_announces_is_caught_by_the_check():
    """A model whose forward scales its logits (custom code, say): nothing in its config says so."""
    model = tiny_gpt2(seed=3)
    plain_forward = model.forward

    def scaled(*args, **kwargs):
        out = plain_forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    model.forward = scaled
    paths = choose(lora(model))
    assert not paths.fused_head and paths.layout.kind == "segments"


def test_segments_are_refused_for_a_model_whose_attention_would_cross_examples():
    """Segment attention that ignores the boundaries (as a model's own code might): the check on the
    model itself catches it; auto falls back to rows, an explicit segments is refused."""
    from transformers import AttentionInterface

    from lorafit.attention import SEGMENTS, segment_sdpa

    def whole_row(module, q, k, v, mask, dropout=0.0, scaling=None, segment_bounds=None, **kwargs):
        return segment_sdpa(module, q, k, v, mask, dropout, scaling, segment_bounds=(0, q.shape[2]))

    model = lora(tiny_gpt2(seed=18)).train()
    half = lora(tiny_gpt2(seed=18, dtype=torch.bfloat16))
    assert choose(model).layout.kind == "segments" and model.training  # the real one passes, and the mode is kept
    assert choose(half).layout.kind == "segments"  # bf16 rounding is not taken for crossing
    try:
        AttentionInterface.register(SEGMENTS, whole_row)
        for m in (model, half):
            paths = choose(m)
            assert paths.layout.kind == "rows" and "do not get the log-probabilities" in paths.why_not["segments"]
        with pytest.raises(LorafitError, match="data.packing=segments: segments: packed examples"):
            choose(model, "segments")
    finally:
        AttentionInterface.register(SEGMENTS, segment_sdpa)
    assert model.get_base_model().config._attn_implementation == "sdpa"


def test_layout_preference_by_device_and_compile():
    cuda = torch.device("cuda")
    assert preference("auto", CPU, False) == ["segments", "rows", "padded"]
    assert preference("auto", cuda, False) == ["rows", "segments", "padded"]  # per-example launches add up on a GPU
    assert preference("auto", CPU, True) == ["rows", "padded"]  # boundaries change every batch: compile would retrace
    assert preference("padded", cuda, False) == ["padded"]
    with pytest.raises(LorafitError, match="train.compile"):
        choose(lora(tiny_gpt2()), "segments", compile=True)


def test_padded_layout_masks_and_never_scores_padding():
    examples = random_examples(6, seed=4)
    (batch,) = micro_batches(make_split(examples), np.arange(6), Layout("padded"), 10_000, EOS)
    assert batch.input_ids.shape[0] == 6 and batch.attention_mask is not None
    assert torch.equal(batch.attention_mask.bool(), batch.example_ids >= 0)
    assert not ((batch.targets != -100) & (batch.example_ids < 0)).any()
    assert batch.n_targets == sum(len(e) - 1 for e in examples)
    # A padded micro-batch is charged for its padding: the budget bounds rows x width.
    for b in micro_batches(make_split(examples), np.arange(6), Layout("padded"), 60, EOS):
        assert b.n_slots <= max(60, b.input_ids.shape[1])


def test_auto_targets_fall_back_to_all_linear_and_named_targets_are_checked():
    model = build_model("phi3", VOCAB, EOS)  # PEFT has no default for phi3
    targets, note = resolve_targets(model, "auto")
    assert targets == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"] and "all-linear" in note
    gpt2 = tiny_gpt2()
    assert resolve_targets(gpt2, "auto") == (["c_attn"], None)
    assert resolve_targets(gpt2, "all-linear")[0] == ["c_attn", "c_fc", "c_proj"]  # Conv1D counts; the head does not
    falcon = build_model("falcon", VOCAB, EOS)  # FalconLinear subclasses nn.Linear
    assert resolve_targets(falcon, ["dense"]) == (["dense"], None)
    with pytest.raises(LorafitError, match="no linear-like module named 'q_proj'.*c_attn.*lora.targets=auto"):
        resolve_targets(gpt2, ["q_proj"])


def _train_cli(tiny_tokenizer, tmp_path, family, *extra):
    from families import save_family_model

    from lorafit.cli import main

    model_dir = save_family_model(family, tiny_tokenizer, tmp_path / family)
    return main(["train", "quotes", f"model.name={model_dir}", f"output_dir={tmp_path / 'run'}", "--no-progress", *extra])


def test_missing_targets_are_reported_before_any_data_is_read(tiny_tokenizer, tmp_path, capsys):
    # a file that exists (a missing one is reported before the model loads) but that reading would refuse
    unread = tmp_path / "unread.jsonl"
    unread.write_text('{"body": "no quote field"}\n')
    code = _train_cli(tiny_tokenizer, tmp_path, "llama", "lora.targets=[c_attn]", f"data.sources.quotes.path={unread}")
    err = capsys.readouterr().err
    assert code == 2 and "no linear-like module named 'c_attn'" in err and "q_proj" in err and "all-linear" in err
    assert "no field" not in err  # the data was never read


def test_an_unsupported_attention_implementation_names_the_key(tiny_tokenizer, tmp_path, capsys):
    code = _train_cli(tiny_tokenizer, tmp_path, "bloom", "model.attn_implementation=sdpa")
    err = capsys.readouterr().err
    assert code == 2 and "model.attn_implementation" in err and "Traceback" not in err


def test_the_run_records_how_its_base_was_loaded_and_inference_honours_it(trained_eager_run):
    from lorafit.generate import load_for_inference
    from lorafit.lora import read_base_record

    run, model_dir = trained_eager_run
    load = read_base_record(run / "adapter")["load"]
    assert load["attn_implementation"] == "eager" and load["name"] == str(model_dir) and load["precision"] == "auto"
    model, _, _ = load_for_inference(run, device=CPU)
    assert model.get_base_model().config._attn_implementation == "eager"
    model, _, _ = load_for_inference(run, device=CPU, attn_implementation="sdpa")  # the user's choice wins
    assert model.get_base_model().config._attn_implementation == "sdpa"


@pytest.fixture
def trained_eager_run(tiny_model_dir, texts_file, tmp_path):
    from lorafit.config import load_config
    from lorafit.train import train

    cfg = load_config("quotes", [f"model.name={tiny_model_dir}", f"data.sources.quotes.path={texts_file}", "train.max_steps=1",
                                 "model.attn_implementation=eager", "eval.before_training=false", "eval.sample_prompt=null",
                                 f"output_dir={tmp_path / 'run'}"])
    summary = train(cfg, progress=False)
    assert summary["lora_targets"] == ["c_attn"]
    return tmp_path / "run", tiny_model_dir


def _tiny_bert(tokenizer, is_decoder: bool):
    import transformers
    from transformers import AutoModelForCausalLM

    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=128, is_decoder=is_decoder)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def test_a_model_whose_forward_is_not_causal_is_refused_before_training(tiny_tokenizer, tmp_path, capsys):
    """A BERT config loaded as a causal LM attends both ways (its loss would see the future): refused, exit 2,
    and it really is not causal (a later token moves an earlier logit), found by the model's forward alone."""
    from lorafit.cli import main

    bert = _tiny_bert(tiny_tokenizer, is_decoder=False).eval()
    ids = torch.randint(0, len(tiny_tokenizer), (1, 12), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 7) % len(tiny_tokenizer)
    with torch.no_grad():
        assert not torch.equal(bert(input_ids=ids).logits[0, :-1], bert(input_ids=changed).logits[0, :-1])
    model_dir = tmp_path / "bert"
    bert.save_pretrained(str(model_dir))
    tiny_tokenizer.save_pretrained(str(model_dir))
    run = tmp_path / "run"
    code = main(["train", "quotes", f"model.name={model_dir}", f"output_dir={run}", "--no-progress", "train.max_steps=1"])
    err = capsys.readouterr().err
    assert code == 2 and "forward is not causal" in err and "BertLMHeadModel" in err and "Traceback" not in err
    assert not (run / "adapter").exists()


def test_the_causality_check_asks_the_forward_not_the_config_type():
    """The same BERT type in its causal decoder mode passes; so does every family of the matrix."""
    from lorafit.fastpath import check_causal

    class Tok:
        def __len__(self):
            return VOCAB

    check_causal(_tiny_bert(Tok(), is_decoder=True), CPU)
    for family in ("gpt2", "llama", "bloom", "gemma2"):
        check_causal(build_model(family, VOCAB, EOS), CPU)
    with pytest.raises(LorafitError, match="not causal"):
        check_causal(_tiny_bert(Tok(), is_decoder=False), CPU)


def test_auto_targets_on_mamba_are_what_peft_accepts_and_what_trains():
    """PEFT has no default for Mamba, and all-linear includes out_proj, which PEFT refuses there, and dt_proj,
    whose weight Mamba's forward reads without calling the layer: `auto` leaves both out (PEFT and the
    gradient say so, not a list of families), the model is left untouched, and the rest wraps and trains."""
    model = build_model("mamba", VOCAB, EOS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets, note = resolve_targets(model, "auto")
    assert targets == ["in_proj", "x_proj"] and "out_proj" in note and "dt_proj" in note
    assert model.state_dict().keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    peft_model = lora(model)  # wraps without PEFT's refusal
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad.abs().max() > 0 for p in lora_b)


def test_auto_targets_that_no_gradient_reaches_at_all_are_an_error_not_a_crash():
    from lorafit.lora import targets_without_gradient

    model = build_model("mamba", VOCAB, EOS)
    assert targets_without_gradient(model, ["dt_proj"]) == ["dt_proj"]  # the loss has no LoRA weight in its graph
    assert targets_without_gradient(model, ["in_proj", "dt_proj"]) == ["dt_proj"]


def test_auto_targets_leave_the_random_generators_as_they_found_them():
    """The gradient probe wraps the model once (PEFT initialises LoRA A from the global generator) and PEFT's
    refusal check builds a skeleton (whose init draws too): without the restore, every run's initial adapter --
    and so its result -- would depend on whether `auto` asked (a bench run's val_loss moved for each)."""
    import random

    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lorafit.lora import resolve_targets, targets_without_gradient

    def draws():
        return random.random(), float(np.random.rand()), torch.rand(4)

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0))
    for ask in (lambda: targets_without_gradient(model, ["c_attn"]) == [],
                lambda: resolve_targets(model, "auto") == (["c_attn"], None)):
        random.seed(3), np.random.seed(3), torch.manual_seed(3)
        expected = draws()
        random.seed(3), np.random.seed(3), torch.manual_seed(3)
        assert ask()
        got = draws()
        assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])

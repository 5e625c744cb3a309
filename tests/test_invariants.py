"""DESIGN.md section 3 invariants 1-6, each against an independent reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lorafit.config import LoraConfig
from lorafit.data.packing import IGNORE, Layout, micro_batches, pack
from lorafit.data.tokenize import TokenizedSplit
from lorafit.forward import FastPaths, Forward
from lorafit.lora import apply_lora, format_counts
from lorafit.loss import linear_cross_entropy, plain_cross_entropy

VOCAB = 300
EOS = VOCAB - 1
ROWS64, SEGMENTS, PADDED = Layout("rows", 64), Layout("segments"), Layout("padded")


def token_nll(model, batch, fused: bool = True, chunk: int | None = None):
    """lorafit's one forward (lorafit.forward.Forward) on `model`: (per-token NLL, example index), no autocast."""
    return Forward(model, FastPaths(PADDED, fused), chunk=chunk).token_nll(batch)


def tiny_gpt2(seed: int = 0, dtype=torch.float32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=VOCAB, bos_token_id=EOS, eos_token_id=EOS)
    cfg._attn_implementation = "sdpa"
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def lora_model(seed: int = 0, dropout: float = 0.0, targets=("c_attn",), dtype=torch.float32):
    model = apply_lora(tiny_gpt2(seed, dtype), LoraConfig(r=4, alpha=8, dropout=dropout, targets=list(targets)))
    # A fresh adapter has B = 0; give B values so the adapter matters in the tests below.
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model.eval()


def make_split(examples: list[list[int]]) -> TokenizedSplit:
    lens = np.array([len(e) for e in examples], dtype=np.int64)
    return TokenizedSplit(
        ids=np.concatenate([np.asarray(e, dtype=np.int32) for e in examples]),
        offsets=np.concatenate([[0], np.cumsum(lens)]),
        sources=np.zeros(len(examples), np.int32),
        n_bytes=np.ones(len(examples), np.int64),
        truncated=np.zeros(len(examples), bool),
    )


def random_examples(n: int, seed: int = 0, lo: int = 2, hi: int = 30) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(rng.integers(0, EOS, size=rng.integers(lo - 1, hi))) + [EOS] for _ in range(n)]


# ---------------------------------------------------------------- 1. trainable counts


@pytest.mark.parametrize(
    "targets, dropout, trainable, total",
    [(["c_attn"], 0.05, 294_912, 124_734_720), (["c_attn", "c_proj"], 0.1, 811_008, 124_439_808 + 811_008)],
)
def test_trainable_counts_on_the_gpt2_config(targets, dropout, trainable, total):
    with torch.device("meta"):  # the real gpt2 shapes without allocating 500 MB
        model = apply_lora(GPT2LMHeadModel(GPT2Config()), LoraConfig(r=8, alpha=16, dropout=dropout, targets=targets))
    assert model.get_nb_trainable_parameters() == (trainable, total)  # tied weights (wte = lm_head) once
    assert format_counts(trainable, total).startswith(f"trainable {trainable:,} / {total:,} (")
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all("lora_" not in n for n in frozen)


# ---------------------------------------------------------------- 2. a fresh adapter changes nothing


def test_fresh_adapter_leaves_outputs_exactly_unchanged():
    ids = torch.randint(0, VOCAB, (3, 17))
    base = tiny_gpt2(seed=3)
    with torch.no_grad():
        expected = base(ids).logits.clone()
    model = apply_lora(base, LoraConfig(r=8, alpha=16, dropout=0.0, targets=["c_attn", "c_proj"])).eval()
    assert any("lora_A" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        got = model(ids).logits
    assert torch.equal(got, expected)


# ---------------------------------------------------------------- 3. save/load and merge


def test_saved_adapter_loads_in_peft_with_identical_logits(tmp_path):
    from peft import PeftModel

    model = lora_model(seed=4)
    model.save_pretrained(str(tmp_path / "adapter"))
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        ours = model(ids).logits
        reloaded = PeftModel.from_pretrained(tiny_gpt2(seed=4), str(tmp_path / "adapter")).eval()
        theirs = reloaded(ids).logits
        plain = tiny_gpt2(seed=4)(ids).logits
    assert torch.equal(ours, theirs)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the adapter does change the output


def test_peft_sets_fan_in_fan_out_by_layer_type_and_only_that_warning_is_hidden(tmp_path):
    """lorafit leaves fan_in_fan_out to PEFT: True for GPT-2's Conv1D (in adapter_config.json too), False for
    nn.Linear. PEFT's warning that it set it is filtered; its other warnings are not."""
    import json
    import warnings

    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gpt2 = lora_model(seed=6)
        gpt2.save_pretrained(str(tmp_path / "adapter"))
        linear = apply_lora(llama, LoraConfig(r=4, targets=["q_proj"]))
        assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
        apply_lora(gpt2.get_base_model(), LoraConfig(r=4, targets=["c_fc"]))  # wrapped twice: PEFT says so
    assert any("modify a model with PEFT for a second time" in str(w.message) for w in caught)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    assert gpt2.base_model.model.transformer.h[0].attn.c_attn.fan_in_fan_out
    assert not linear.base_model.model.model.layers[0].self_attn.q_proj.fan_in_fan_out


def test_saved_adapter_names_the_base_as_the_user_gave_it(tmp_path, tiny_tokenizer):
    """adapter_config.json's base_model_name_or_path is the load record's name (set before PEFT saves), whatever
    the model object says; the resolved path stays in lorafit_base.json."""
    import json

    from lorafit.train import save_adapter

    model = lora_model(seed=7)  # built from a config: PEFT alone would record no base at all
    load = {"name": "models/my-gpt2", "resolved": "/abs/models/my-gpt2"}
    save_adapter(model, tiny_tokenizer, tmp_path / "adapter", load)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == load["name"]
    assert json.loads((tmp_path / "adapter" / "lorafit_base.json").read_text())["load"] == load


def test_merged_model_matches_base_plus_adapter():
    model = lora_model(seed=5, targets=("c_attn", "c_proj"))
    ids = torch.randint(0, VOCAB, (2, 25))
    with torch.no_grad():
        unmerged = model(ids).logits
        merged = model.merge_and_unload()(ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- 4. packing is exact


def test_packed_loss_of_each_example_equals_its_loss_alone():
    model = lora_model(seed=6)
    examples = random_examples(11, seed=6)
    split = make_split(examples)
    with torch.no_grad():
        batches = micro_batches(split, np.arange(len(examples)), ROWS64, max_tokens=128, pad_id=EOS)
        assert any((b.example_ids >= 0).sum(1).gt(0).any() and len(set(b.example_ids[0].tolist()) - {-1}) > 1 for b in batches)
        packed = torch.zeros(len(examples), dtype=torch.float64)
        for b in batches:
            nll, ex = token_nll(model, b)
            packed.index_add_(0, ex, nll.double())
        for i, e in enumerate(examples):
            # Reference: the unpacked model call on the example alone, standard shifted loss.
            x = torch.tensor([e])
            logits = model(x).logits[0, :-1]
            alone = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")
            assert abs(packed[i].item() - alone.item()) <= 1e-5 * max(1.0, abs(alone.item())), i


def test_rows_are_balanced_and_padding_is_a_separate_block():
    split = make_split(random_examples(9, seed=7))
    batch = pack(split, np.arange(9), ROWS64, pad_id=EOS)
    pad = batch.example_ids == -1
    assert batch.n_slots - int(pad.sum()) == batch.n_targets
    for r in range(batch.input_ids.shape[0]):
        if pad[r].any():
            first = int(pad[r].nonzero()[0])
            assert pad[r, first:].all()  # padding only at the end of a row
            assert batch.position_ids[r, first] == 0  # and it restarts positions: its own block


# ---------------------------------------------------------------- 5. pads never scored, EOS scored


def test_padding_never_scored_and_every_eos_scored():
    examples = random_examples(13, seed=8)
    split = make_split(examples)
    batch = pack(split, np.arange(13), Layout("rows", 48), pad_id=EOS)
    scored = batch.targets != IGNORE
    assert not (scored & (batch.example_ids == -1)).any()
    assert int((batch.targets == EOS).sum()) == len(examples)  # one EOS target per example
    for i, e in enumerate(examples):
        assert batch.targets[batch.example_ids == i].tolist() == e[1:]  # all of tokens[1:], nothing else


def test_truncation_drops_eos_and_chunking_keeps_every_target_once(tiny_tokenizer):
    from lorafit.data.tokenize import apply_length_policy

    ids = list(range(100)) + [EOS]
    (short,), lost = apply_length_policy(ids, 16, "truncate")
    assert lost and short == ids[:16] and EOS not in short
    pieces, lost = apply_length_policy(ids, 16, "chunk")
    assert not lost and all(2 <= len(p) <= 16 for p in pieces)
    assert [t for p in pieces for t in p[1:]] == ids[1:]
    assert apply_length_policy(ids, 16, "drop") == ([], True)
    assert apply_length_policy(ids[:10], 16, "truncate") == ([ids[:10]], False)


# ---------------------------------------------------------------- 6. accumulation is exact


def _grads_for(model, split, groups, n_targets):
    model.zero_grad(set_to_none=True)
    for g in groups:
        for b in micro_batches(split, np.asarray(g), ROWS64, max_tokens=10_000, pad_id=EOS):
            nll, _ = token_nll(model, b)
            (nll.sum() / n_targets).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_two_micro_batches_of_four_equal_one_batch_of_eight():
    model = lora_model(seed=9, dropout=0.0)
    split = make_split(random_examples(8, seed=9, hi=40))
    n_targets = split.n_targets
    one = _grads_for(model, split, [list(range(8))], n_targets)
    two = _grads_for(model, split, [list(range(4)), list(range(4, 8))], n_targets)
    eight_singles = _grads_for(model, split, [[i] for i in range(8)], n_targets)
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(eight_singles[name], one[name], atol=1e-6, rtol=1e-5)
    # A mean of per-micro-batch means would differ when the micro-batches hold different token counts.
    lengths = split.lengths() - 1
    assert lengths[:4].sum() != lengths[4:].sum()


# ---------------------------------------------------------------- the fused head loss


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_fused_cross_entropy_matches_full_logits_in_float64(chunk):
    torch.manual_seed(0)
    h = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.float64)
    t = torch.randint(0, 40, (50,))
    g = torch.randn(50, dtype=torch.float64)  # arbitrary per-token weights exercise the backward fully
    fused = linear_cross_entropy(h, w, t, chunk=chunk)
    (fused * g).sum().backward()
    grad_fused, h.grad = h.grad.clone(), None
    ref = plain_cross_entropy(h @ w.t(), t)
    (ref * g).sum().backward()
    torch.testing.assert_close(fused, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad_fused, h.grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("in_place", [True, False])
def test_both_head_softmax_forms_match_autograd_in_float64(in_place):
    from lorafit.loss import _nll_and_grad_logits

    torch.manual_seed(3)
    logits = (torch.randn(20, 40, dtype=torch.float64) * 30).requires_grad_()  # large logits: stability matters
    t = torch.randint(0, 40, (20, 1))
    nll, grad = _nll_and_grad_logits(logits.detach().clone(), t, need_grad=True, in_place=in_place)
    ref = plain_cross_entropy(logits, t.squeeze(1))
    ref.sum().backward()
    torch.testing.assert_close(nll, ref.detach(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad, logits.grad, atol=1e-12, rtol=1e-12)
    nll_only, none = _nll_and_grad_logits(logits.detach().clone(), t, need_grad=False, in_place=in_place)
    assert none is None and torch.equal(nll_only, nll)


def test_cpu_logits_buffer_is_shared_by_evaluation_and_training():
    import lorafit.fast as fast

    fast._head_buffers.clear()
    torch.manual_seed(2)
    w = torch.randn(40, 16, dtype=torch.float64)
    t = torch.randint(0, 40, (90,))
    with torch.inference_mode():  # evaluation comes first in a run, so it creates the buffer
        evaluated = linear_cross_entropy(torch.randn(90, 16, dtype=torch.float64), w, t, chunk=64)
    assert fast._head_buffers[torch.float64].numel() == 45 * 40  # two equal chunks of 45, not 64 + 26
    h = torch.randn(90, 16, dtype=torch.float64, requires_grad=True)
    linear_cross_entropy(h, w, t, chunk=64).sum().backward()  # training writes into the same buffer
    ref = h.detach().clone().requires_grad_()
    plain_cross_entropy(ref @ w.t(), t).sum().backward()
    torch.testing.assert_close(h.grad, ref.grad, atol=1e-12, rtol=1e-12)
    assert evaluated.shape == (90,) and torch.isfinite(evaluated).all()


def test_fused_and_plain_model_paths_agree_on_loss_and_lora_gradients():
    split = make_split(random_examples(6, seed=10))
    batch = pack(split, np.arange(6), ROWS64, pad_id=EOS)
    grads = []
    for fused in (True, False):
        model = lora_model(seed=10)
        nll, _ = token_nll(model, batch, fused=fused, chunk=5)
        nll.sum().backward()
        grads.append((nll.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
    for name in grads[0][1]:
        torch.testing.assert_close(grads[0][1][name], grads[1][1][name], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- fast paths against the plain path


def test_vocab_aligned_head_gives_the_same_loss_and_gradients(monkeypatch):
    import lorafit.loss as loss_mod

    torch.manual_seed(1)
    h = torch.randn(30, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(37, 16, dtype=torch.float64)  # 37 is not a multiple of the alignment
    t = torch.randint(0, 37, (30,))
    ref = linear_cross_entropy(h, w, t, chunk=8)
    ref.sum().backward()
    ref_grad, h.grad = h.grad.clone(), None
    # Force the CUDA-only padding on CPU: padded rows must never receive probability.
    monkeypatch.setattr(loss_mod, "_aligned_head", lambda weight: torch.nn.functional.pad(weight, (0, 0, 0, 27)))
    padded = linear_cross_entropy(h, w, t, chunk=8)
    padded.sum().backward()
    torch.testing.assert_close(padded, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(h.grad, ref_grad, atol=1e-12, rtol=1e-12)


def test_gpt2_loads_with_the_one_kernel_gelu_and_computes_gelu_new(tmp_path):
    """load_base_model names gelu_new as transformers' gelu_pytorch_tanh: the same function (checked against
    transformers' own NewGELUActivation) and the same model (logits as loaded by plain transformers)."""
    from transformers import AutoModelForCausalLM
    from transformers.activations import GELUTanh, NewGELUActivation

    from lorafit.config import ModelConfig
    from lorafit.modeling import Precision, load_base_model

    tiny_gpt2(seed=12).save_pretrained(str(tmp_path / "base"))
    model = load_base_model(ModelConfig(name=str(tmp_path / "base"), precision="fp32"), Precision(torch.float32, None),
                            torch.device("cpu")).eval()
    acts = [block.mlp.act for block in model.transformer.h]
    assert model.config.activation_function == "gelu_pytorch_tanh" and all(isinstance(a, GELUTanh) for a in acts)
    x = torch.randn(10_000) * 4
    torch.testing.assert_close(acts[0](x), NewGELUActivation()(x), atol=2e-6, rtol=1e-6)  # fp32 rounding
    torch.testing.assert_close(acts[0](x.double()), NewGELUActivation()(x.double()), atol=1e-12, rtol=1e-12)
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).eval()
    assert plain.config.activation_function == "gelu_new"
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, atol=1e-5, rtol=1e-5)


def test_only_transformers_own_gelu_new_is_renamed():
    from transformers import GPT2Config, LlamaConfig, PhiConfig

    from lorafit.modeling import fuse_activations

    phi, llama, relu = PhiConfig(hidden_act="gelu_new"), LlamaConfig(), GPT2Config(activation_function="relu")
    assert fuse_activations(phi) == {"hidden_act": "gelu_new"} and phi.hidden_act == "gelu_pytorch_tanh"
    assert fuse_activations(llama) == {} and llama.hidden_act == "silu"
    assert fuse_activations(relu) == {} and relu.activation_function == "relu"
    remote = type("RemoteConfig", (GPT2Config,), {"__module__": "transformers_modules.someone.model"})()
    assert fuse_activations(remote) == {} and remote.activation_function == "gelu_new"  # its code may not know the name


def test_compiled_backbone_matches_eager_loss_and_gradients(monkeypatch):
    """train.compile: the backbone goes through torch.compile in place (LoRA names kept) and gives eager's loss and
    gradients. Traced by dynamo and AOT autograd as inductor would be, run by the aot_eager backend: inductor's
    C++ code generation is torch's to test, and costs minutes of compiling on a CPU."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from lorafit.fast import prepare_for_speed

    counter = CompileCounterWithBackend("aot_eager")
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model=None, **kw: real_compile(model, **{**kw, "backend": counter}))
    torch._dynamo.reset()
    split = make_split(random_examples(6, seed=13))
    batch = pack(split, np.arange(6), ROWS64, pad_id=EOS)
    results = []
    for compiled in (False, True):
        model = lora_model(seed=13)
        if compiled:
            prepare_for_speed(model, compile=True)
        nll, _ = token_nll(model, batch)
        nll.sum().backward()
        results.append((nll.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch._dynamo.reset()
    assert counter.frame_count >= 1 and counter.op_count > 0  # the backbone did run compiled
    assert results[1][1].keys() == results[0][1].keys() and results[0][1]  # the same LoRA parameters, by name
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-4, rtol=1e-4)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-4, rtol=1e-3)


def test_model_dropout_override_reaches_every_base_dropout():
    from lorafit.modeling import set_dropout

    model = tiny_gpt2(seed=14).train()
    set_dropout(model, 0.0)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():  # no dropout left: train mode now equals eval mode exactly
        train_out = model(ids).logits
        assert torch.equal(train_out, model.eval()(ids).logits)


# ---------------------------------------------------------------- segment layout (data.packing=segments)


def _nll_and_lora_grads(model, batches, n_targets):
    model.zero_grad(set_to_none=True)
    per_example = {}
    for b in batches:
        nll, ex = token_nll(model, b)
        (nll.sum() / n_targets).backward()
        for i, v in zip(ex.tolist(), nll.detach().tolist()):
            per_example[i] = per_example.get(i, 0.0) + v
    return per_example, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_segment_layout_has_no_padding_and_marks_each_example():
    split = make_split(random_examples(9, seed=15))
    (batch,) = micro_batches(split, np.arange(9), SEGMENTS, max_tokens=10_000, pad_id=EOS)
    assert batch.input_ids.shape == (1, batch.n_targets)  # every slot is a scored position
    seg = batch.segments
    assert seg[0] == 0 and seg[-1] == batch.n_targets and len(seg) == 10
    for s, e in zip(seg[:-1], seg[1:]):
        assert batch.position_ids[0, s:e].tolist() == list(range(e - s))
        assert len(set(batch.example_ids[0, s:e].tolist())) == 1
    padded = pack(split, np.arange(9), SEGMENTS, pad_id=EOS, multiple=8)
    assert padded.n_slots % 8 == 0 and padded.segments[-2] == batch.n_targets  # padding: a last segment
    assert not (padded.targets[0, batch.n_targets:] != IGNORE).any()


def test_segment_layout_equals_each_example_alone_in_loss_and_gradients():
    examples = random_examples(10, seed=16, hi=40)
    split = make_split(examples)
    n_targets = split.n_targets
    model = lora_model(seed=16, dtype=torch.float64)  # PEFT keeps the adapter itself in fp32
    nll, grads = _nll_and_lora_grads(model, micro_batches(split, np.arange(10), SEGMENTS, 150, EOS), n_targets)
    assert model.get_base_model().config._attn_implementation == "sdpa"  # switched back after each forward
    model.zero_grad(set_to_none=True)
    for i, e in enumerate(examples):  # reference: each example alone, unpacked, standard shifted loss
        x = torch.tensor([e])
        alone = torch.nn.functional.cross_entropy(model(x).logits[0, :-1], x[0, 1:], reduction="sum")
        assert abs(nll[i] - alone.item()) <= 1e-10 * max(1.0, abs(alone.item())), i
        (alone / n_targets).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-8, rtol=1e-5)


def test_segment_attention_handles_grouped_query_heads_as_the_model_does():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(17)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, eos_token_id=EOS, pad_token_id=EOS)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).double().eval()
    examples = random_examples(7, seed=17)
    (batch,) = micro_batches(make_split(examples), np.arange(7), SEGMENTS, 10_000, EOS)
    with torch.no_grad():
        nll, ex = token_nll(model, batch)
        for i, e in enumerate(examples):
            x = torch.tensor([e])
            alone = torch.nn.functional.cross_entropy(model(x).logits[0, :-1], x[0, 1:], reduction="none")
            torch.testing.assert_close(nll[ex == i], alone, atol=1e-10, rtol=1e-10)


def test_speed_switches_are_restored_after_each_forward_and_off_gives_the_same_loss(monkeypatch):
    """lorafit.fast.forward_state (entered by lorafit.forward.Forward) is the one place that flips state outside lorafit: under bf16 autocast
    PEFT's input casts are off and a segments batch runs segment attention, only during the forward.
    LORAFIT_SPEEDUPS off (the one switch) keeps the casts and the buffer, and gives the same NLL."""
    import lorafit.fast as fast
    from lorafit.data.packing import Layout, pack

    model = lora_model(seed=5)
    split = make_split(random_examples(4, seed=5))
    batch = pack(split, np.arange(4), Layout("segments"), pad_id=0)
    base = model.get_base_model()
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    seen = {}
    real_forward = type(base.transformer).forward

    def spy(self, *args, **kwargs):
        seen["attention"] = base.config._attn_implementation
        seen["casts"] = {m.cast_input_dtype_enabled for m in layers}
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(base.transformer), "forward", spy)
    before = (base.config._attn_implementation, {m.cast_input_dtype_enabled for m in layers})
    results = {}
    for speedups in (True, False):
        monkeypatch.setattr(fast, "SPEEDUPS", speedups)
        fast._head_buffers.clear()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            results[speedups] = token_nll(model, batch)[0].float()
        assert seen["attention"] == "lorafit_segments"
        assert seen["casts"] == ({False} if speedups else {True})
        assert bool(fast._head_buffers) == speedups
        assert (base.config._attn_implementation, {m.cast_input_dtype_enabled for m in layers}) == before
    torch.testing.assert_close(results[True], results[False], atol=0, rtol=0)

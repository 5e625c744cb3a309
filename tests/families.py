"""Tiny randomly initialised models of common causal-LM families, built from transformers configs
(no download): the matrix `test_families.py` trains, evaluates and samples on."""

from __future__ import annotations

from pathlib import Path

import torch

# Small enough for a few seconds a model on 2 CPU cores; each keeps what makes its family differ
# (grouped-query heads, sliding windows, soft-capping, ALiBi, parallel blocks, fused projections,
# a state-space model...).
COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
FAMILIES: dict[str, tuple[str, dict]] = {
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=128)),
    "gpt_bigcode": ("GPTBigCodeConfig", dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, multi_query=True)),
    "llama": ("LlamaConfig", dict(COMMON, num_key_value_heads=2, max_position_embeddings=128)),
    "qwen2": ("Qwen2Config", dict(COMMON, num_key_value_heads=2, max_position_embeddings=128)),
    "qwen3": ("Qwen3Config", dict(COMMON, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)),
    "mistral": ("MistralConfig", dict(COMMON, num_key_value_heads=2, max_position_embeddings=128, sliding_window=8)),
    "gemma2": ("Gemma2Config", dict(COMMON, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                                    sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=1.0)),
    "gemma3": ("Gemma3TextConfig", dict(COMMON, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                                        sliding_window=8)),
    "gpt_neox": ("GPTNeoXConfig", dict(COMMON, max_position_embeddings=128)),
    "opt": ("OPTConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                              max_position_embeddings=128, word_embed_proj_dim=32)),
    "phi": ("PhiConfig", dict(COMMON, max_position_embeddings=128)),
    "phi3": ("Phi3Config", dict(COMMON, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)),
    "olmo2": ("Olmo2Config", dict(COMMON, num_key_value_heads=2, max_position_embeddings=128)),
    "starcoder2": ("Starcoder2Config", dict(COMMON, num_key_value_heads=2, max_position_embeddings=128, sliding_window=None)),
    "gptj": ("GPTJConfig", dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, rotary_dim=4)),
    "gpt_neo": ("GPTNeoConfig", dict(hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=128,
                                     attention_types=[[["global", "local"], 1]], window_size=8)),
    "bloom": ("BloomConfig", dict(hidden_size=32, n_layer=2, n_head=4)),
    "falcon": ("FalconConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=False,
                                    multi_query=True, parallel_attn=True, alibi=False)),
    # No attention at all (a state-space model): PEFT refuses LoRA on its out_proj, and packed rows cannot
    # restart its scan, which fastpath must find for itself.
    "mamba": ("MambaConfig", dict(hidden_size=32, num_hidden_layers=2, state_size=4, expand=2, conv_kernel=4)),
}


def build_model(family: str, vocab_size: int, eos_id: int, seed: int = 0):
    import transformers
    from transformers import AutoModelForCausalLM

    class_name, kwargs = FAMILIES[family]
    config = getattr(transformers, class_name)(
        vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id, **kwargs
    )
    if "pad_token_id" in kwargs:
        config.pad_token_id = eos_id
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def save_family_model(family: str, tokenizer, out: Path, seed: int = 0) -> Path:
    """A tiny random `family` model beside `tokenizer`, saved as a model directory lorafit can load."""
    model = build_model(family, len(tokenizer), tokenizer.eos_token_id, seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out

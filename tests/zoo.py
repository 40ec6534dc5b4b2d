"""A zoo of tiny random-weight models of transformers' own architectures, built from configs.

Each entry is (display name, model type, config keywords beyond the shared ones). Windows are
shorter than the test rows on purpose (8 tokens), so a mask that ignores them gives other
log-probs; heads that scale their logits use values far from 1, so a head run without its scale
shows. Nothing is downloaded: every model is built from its config with seeded random weights.
"""

from __future__ import annotations

from pathlib import Path

WINDOW = 8

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

MOE = dict(num_experts_per_tok=2, router_aux_loss_coef=0.02)

SPECS: list[tuple[str, str, dict]] = [
    ("llama", "llama", {}),
    ("qwen2", "qwen2", {}),
    ("qwen2 (sliding window)", "qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1,
                                         "layer_types": ["sliding_attention", "full_attention"]}),
    ("qwen3", "qwen3", {"head_dim": 16}),
    ("mistral (sliding window)", "mistral", {"sliding_window": WINDOW}),
    ("gemma", "gemma", {"head_dim": 16}),
    ("gemma2 (sliding window, soft-capped logits)", "gemma2", {"head_dim": 16, "sliding_window": WINDOW}),
    ("gemma3 (sliding window)", "gemma3_text", {"head_dim": 16, "sliding_window": WINDOW,
                                                "layer_types": ["sliding_attention", "full_attention"]}),
    ("phi", "phi", {}),
    ("phi3 (sliding window)", "phi3", {"sliding_window": WINDOW}),
    ("gpt2", "gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512}),
    ("gpt_neox", "gpt_neox", {}),
    ("opt", "opt", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    ("falcon", "falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    ("stablelm", "stablelm", {}),
    ("starcoder2", "starcoder2", {}),
    ("olmo2", "olmo2", {}),
    ("cohere (logit scale)", "cohere", {"logit_scale": 0.25}),
    ("granite (logits scaling)", "granite", {"logits_scaling": 4.0}),
    ("mixtral (MoE)", "mixtral", {"num_local_experts": 4, **MOE}),
    ("qwen2_moe (MoE)", "qwen2_moe", {"num_experts": 4, "moe_intermediate_size": 32,
                                       "shared_expert_intermediate_size": 64, **MOE}),
    ("qwen3_moe (MoE)", "qwen3_moe", {"num_experts": 4, "moe_intermediate_size": 32, "head_dim": 16, **MOE}),
    ("bloom (ALiBi)", "bloom", {"n_layer": 2, "n_head": 4}),
    ("mpt (ALiBi)", "mpt", {"d_model": 64, "n_heads": 4, "n_layers": 2, "expansion_ratio": 2, "max_seq_len": 512}),
    ("mamba2 (SSM)", "mamba2", {"num_heads": 4, "head_dim": 32, "state_size": 16, "n_groups": 1, "expand": 2}),
    ("jamba (SSM + attention + MoE)", "jamba", {"num_experts": 2, "num_experts_per_tok": 1, "attn_layer_period": 2,
                                               "attn_layer_offset": 1, "expert_layer_period": 2,
                                               "expert_layer_offset": 1, "mamba_d_state": 8,
                                               "router_aux_loss_coef": 0.02}),
    ("lfm2 (convolution + attention)", "lfm2", {"layer_types": ["conv", "full_attention"]}),
    ("falcon_h1 (SSM + attention, scaled head)", "falcon_h1", {"mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_head": 16,
                                                                "mamba_d_state": 8, "mamba_n_groups": 1, "head_dim": 16,
                                                                "lm_head_multiplier": 0.25}),
    ("recurrent_gemma (recurrent + local attention, soft-capped logits)", "recurrent_gemma",
     {"lru_width": 64, "attention_window_size": WINDOW, "block_types": ["recurrent", "attention"], "head_dim": 16}),
]

NAMES = [name for name, _, _ in SPECS]


def build_config(model_type: str, extra: dict, vocab_size: int, bos: int, eos: int, pad: int):
    from transformers import CONFIG_MAPPING

    kwargs = {**COMMON, **extra, "vocab_size": vocab_size, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    return CONFIG_MAPPING[model_type](**kwargs)


def build_model(name: str, tokenizer, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    _, model_type, extra = SPECS[NAMES.index(name)]
    config = build_config(model_type, extra, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                          tokenizer.bos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves some heads near zero; a little spread makes wrong masks and heads visible.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(2.0)
    return model.eval()


def save_model(name: str, tokenizer, folder: Path) -> Path:
    model = build_model(name, tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

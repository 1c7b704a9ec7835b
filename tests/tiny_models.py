"""Tiny random models of every supported family, built from configs (no downloads).

Shapes are chosen to exercise GQA (4 query heads over 2 KV heads), explicit ``head_dim``,
biases, q/k norms, sliding-window layer types and fused projections.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

VOCAB = 128
LAYERS = 6

_IDS = dict(bos_token_id=1, eos_token_id=2)
_COMMON = dict(vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=False, **_IDS)
_DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    **_COMMON,
)

_MOE = dict(_DECODER, intermediate_size=16, num_experts_per_tok=2)

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(_DECODER, tie_word_embeddings=True),
    "mistral": dict(_DECODER, sliding_window=None),
    "qwen2": dict(_DECODER),
    "qwen3": dict(_DECODER, head_dim=16),
    "gemma": dict(_DECODER, head_dim=8),
    "gemma2": dict(_DECODER, head_dim=8, sliding_window=4, query_pre_attn_scalar=8),
    "gemma3_text": dict(_DECODER, head_dim=8, sliding_window=4, query_pre_attn_scalar=8),
    "phi3": dict(_DECODER, pad_token_id=0),
    "opt": dict(
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        pad_token_id=1,
        **_COMMON,
    ),
    "bloom": dict(hidden_size=32, n_layer=LAYERS, n_head=4, vocab_size=VOCAB, **_IDS),
    "gpt2": dict(n_embd=32, n_layer=LAYERS, n_head=4, n_positions=128, vocab_size=VOCAB, **_IDS),
    "gpt_neox": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        rotary_pct=0.5,
        **_COMMON,
    ),
    # Families added for 2026 (issue 14). Sliding windows shorter than the test sequences, so
    # the per-layer attention pattern matters.
    "olmo2": dict(_DECODER),
    "olmo3": dict(_DECODER, sliding_window=4),
    "granite": dict(
        _DECODER,
        residual_multiplier=0.5,
        attention_multiplier=0.3,
        embedding_multiplier=2.0,
        logits_scaling=2.0,
    ),
    "smollm3": dict(_DECODER, pad_token_id=0, no_rope_layer_interval=3),
    "stablelm": dict(_DECODER, use_parallel_residual=True, use_qkv_bias=True),
    "cohere": dict(_DECODER, pad_token_id=0),
    "starcoder2": dict(_DECODER),
    "phi": dict(_DECODER, pad_token_id=0),
    "gptj": dict(
        n_embd=32, n_layer=LAYERS, n_head=4, n_inner=64, rotary_dim=4, n_positions=128, **_COMMON
    ),
    "falcon": dict(
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        ffn_hidden_size=64,
        **_COMMON,
    ),
    "exaone4": dict(_DECODER, sliding_window=4),
    "glm4": dict(_DECODER, head_dim=8, pad_token_id=0),
    # Mixtures of experts: 8 routed experts of width 16, top-2.
    "mixtral": dict(_MOE, num_local_experts=8),
    "qwen2_moe": dict(  # a gated shared expert; top-k weights not renormalised
        _MOE,
        num_experts=8,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        norm_topk_prob=False,
    ),
    "qwen3_moe": dict(  # every other layer dense, plus layer 0: the pattern follows indices
        _MOE,
        num_experts=8,
        moe_intermediate_size=16,
        norm_topk_prob=True,
        decoder_sparse_step=2,
        mlp_only_layers=[0],
        head_dim=8,
    ),
    "gpt_oss": dict(_MOE, num_local_experts=8, head_dim=8, sliding_window=4, pad_token_id=0),
    "olmoe": dict(_MOE, num_experts=8, pad_token_id=0),
    "flex_olmo": dict(_MOE, num_experts=8, pad_token_id=0),
    "deepseek_v2": dict(  # MLA attention; layers 0-1 dense (a pattern that follows indices)
        _MOE,
        num_key_value_heads=4,
        intermediate_size=64,
        n_routed_experts=8,
        moe_intermediate_size=16,
        n_shared_experts=1,
        first_k_dense_replace=2,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        head_dim=4,
        pad_token_id=0,
    ),
    "deepseek_v3": dict(  # sigmoid router with a selection bias; one expert group
        _MOE,
        num_key_value_heads=4,
        intermediate_size=64,
        n_routed_experts=8,
        moe_intermediate_size=16,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        head_dim=4,
        pad_token_id=0,
    ),
    "glm4_moe": dict(
        _MOE,
        intermediate_size=64,
        n_routed_experts=8,
        moe_intermediate_size=16,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        pad_token_id=0,
    ),
    "llama4_text": dict(  # NoPE every 3rd layer, chunked attention shorter than the tests
        _MOE,
        num_local_experts=8,
        intermediate_size_mlp=64,
        head_dim=8,
        no_rope_layer_interval=3,
        attention_chunk_size=4,
        pad_token_id=0,
    ),
}
MOE_TYPES = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "gpt_oss",
    "olmoe",
    "flex_olmo",
    "deepseek_v2",
    "llama4_text",
)


def tiny_model(model_type: str, seed: int = 0) -> PreTrainedModel:
    """A random tiny model in eval mode, float32, with deterministic (eager) attention."""
    config = AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    _randomise_norms(model)
    return model.eval()


def _randomise_norms(model: PreTrainedModel) -> None:
    """Norm weights start at exactly 1 (or 0 for Gemma); perturb them so bugs cannot hide.

    Expert-selection biases (DeepSeek-V3, GLM-4-MoE) start at 0: make them large enough to
    decide which experts are chosen, so masking must handle them.
    """
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer))


def tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def tiny_tokenizer():
    """A word-level tokenizer over words ``w3`` … ``w127`` (ids 3…127), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def word_text(n_words: int, seed: int = 0) -> str:
    """Random text over the tiny tokenizer's words."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n_words,), generator=generator).tolist()
    return " ".join(f"w{i}" for i in ids)


def scoring_context(model, calibration=None, batch_size: int = 2, removed=(), work=None):
    """A criterion's context over ``model`` (a model object, or a ``LazyModel`` read layer by
    layer) with a flow over ``calibration`` (None: data-free)."""
    from secateurs.criteria import ScoringContext
    from secateurs.session import ResidentSession
    from secateurs.session.flow import Flow
    from secateurs.session.lazy import LazyModel, LazySession

    if isinstance(model, LazyModel):
        session = LazySession(model, work or "/nonexistent-spill")
    else:
        session = ResidentSession(model)
    flow = None if calibration is None else Flow(session, calibration, batch_size)
    return ScoringContext(session, flow, tuple(removed), progress=False)

"""Attention over samples laid end to end in one row, without padding and without a mask.

With ``padding_free`` a batch's samples are concatenated into one row (transformers'
``DataCollatorWithFlattening``), which passes each sample's bounds (``cu_seq_lens_q``).
Flash attention takes those bounds itself; SDPA would need a block-diagonal mask over the
whole row, whose cost grows with the square of the row (on a CPU slower than padding).
The attention registered here runs SDPA's causal kernel on each sample alone instead: the
same attention as a padded batch's, over the real tokens only. Without bounds (a padded
batch, generation) it is transformers' SDPA as it is.
"""

from __future__ import annotations

from typing import Any

NAME = "sdpa_per_sample"  # an attn_implementation name; 'flash' must not appear in it


def _attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs):
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.pop("cu_seq_lens_q", None)
    for name in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(name, None)
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    edges = bounds.tolist()
    outputs = [
        sdpa_attention_forward(
            module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], None,
            is_causal=True, **kwargs,
        )[0]
        for start, end in zip(edges[:-1], edges[1:], strict=False)
        if end > start
    ]  # fmt: skip
    return torch.cat(outputs, dim=1), None  # (1, tokens, heads, head_dim), as SDPA's


def register() -> str:
    """Register the per-sample attention (masks as SDPA's); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, _attention)
        AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return NAME


def model_problem(model_config: Any) -> str | None:
    """Why samples of this model cannot be attended one by one; None when they can."""
    text = getattr(model_config, "text_config", None) or model_config
    if getattr(model_config, "vision_config", None) is not None:
        return "image-text models keep their padded batches"
    window = getattr(text, "sliding_window", None)
    if window and getattr(text, "use_sliding_window", True) is not False:
        return "its sliding-window attention needs a mask"
    if getattr(text, "attn_logit_softcapping", None):
        return "its attention soft-caps its scores"
    return None


def use_per_sample_attention(model: Any) -> bool:
    """Switch ``model`` (as loaded, before any adapter) from SDPA to the per-sample attention;
    False (unchanged) when it does not use SDPA or cannot change its attention."""
    if (model.config._attn_implementation or "sdpa") != "sdpa":
        return False
    name = register()
    try:
        model.set_attn_implementation(name)
    except (ValueError, ImportError):
        return False
    return model.config._attn_implementation == name

"""Scalable-Softmax (SSMax, arXiv 2501.19399) as a transformers attention function.

SSMax multiplies every attention score of the query at position p by s*log(n) + b, where
n = max(p + 1, 2) counts the keys a causal query sees in its own sample. Multiplying the
query by that factor multiplies its scores alike, so the function registered here scales
the query and hands over to the attention the model would use (sdpa, eager, flash attention,
a Hub kernel, ...): the model's code is unchanged.
The position is the query's position id when the attention receives them (packed rows
restart at each sample), else its index (after any cached tokens).
"""

from __future__ import annotations

import re
import sys
from typing import Any

from tunelab.config.schema import TuneConfig
from tunelab.errors import ModelError

DEFAULT_FACTOR = 0.43
DEFAULT_BIAS = 0.0
_WRAPPED: dict[str, str] = {}  # the names SSMax is registered under -> the attention it wraps


def ssmax_settings(config: TuneConfig) -> tuple[float, float] | None:
    """(s, b) when the config asks for SSMax, else None."""
    if not config.scaling_softmax:
        return None
    factor, bias = config.scaling_softmax_factor, config.scaling_softmax_bias
    return (
        DEFAULT_FACTOR if factor is None else factor,
        DEFAULT_BIAS if bias is None else bias,
    )


def ssmax_scale(query: Any, key: Any, position_ids: Any, factor: float, bias: float) -> Any:
    """The factor s*log(max(p+1, 2)) + b of each query, shaped to multiply ``query``
    (batch, heads, queries, head_dim)."""
    import torch

    queries, keys = query.shape[-2], key.shape[-2]
    if position_ids is not None and position_ids.ndim == 3:  # multimodal RoPE: (3, batch, q)
        position_ids = position_ids[0]
    if position_ids is not None and position_ids.shape[-1] == queries:
        positions = position_ids.to(query.device)
    else:
        positions = torch.arange(keys - queries, keys, device=query.device)[None]
    seen = (positions.float() + 1).clamp(min=2)
    return (factor * torch.log(seen) + bias)[:, None, :, None].to(query.dtype)


def _inner(name: str, module: Any) -> Any:
    """The attention function ``name`` stands for (transformers' ALL_ATTENTION_FUNCTIONS;
    eager is each model's own)."""
    from transformers import AttentionInterface

    if name != "eager":
        return AttentionInterface()[name]
    # transformers keeps no shared eager attention: each model's code defines its own
    found = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if found is None:
        raise ModelError(
            f"scaling_softmax: {type(module).__name__} has no eager attention to wrap",
            "leave out attn_implementation (SSMax then wraps sdpa)",
        )
    return found


class _AttentionOf:
    """``module`` as the attention it wraps sees it: its config names that attention (flash
    attention reads the name to find its kernel), everything else is the module's."""

    def __init__(self, module: Any, config: Any) -> None:
        self._module, self.config = module, config

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


class _ConfigOf:
    """A model config that names attention ``name``, and is the model's config otherwise."""

    def __init__(self, config: Any, name: str) -> None:
        self._config, self._attn_implementation = config, name

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


def registered_name(inner: str, factor: float, bias: float) -> str:
    """The attn_implementation SSMax around ``inner`` is registered as. transformers reads
    meaning into names: one with 'flash' in it is taken for a flash attention kernel to
    load, one with '/' for a Hub kernel, '|' for paged attention; so those are spelled out
    of it."""
    spelled = re.sub(r"[/|:@]", "-", inner).replace("flash", "fa")
    return f"ssmax_{spelled}_{factor!r}_{bias!r}"


def wrapped_attention(name: str) -> str:
    """The attention that attn_implementation ``name`` runs: the one SSMax wraps for SSMax,
    else ``name`` itself."""
    return _WRAPPED.get(name, name)


def ssmax_attention(inner: str, factor: float, bias: float) -> str:
    """Register SSMax around the attention ``inner`` (any attn_implementation transformers
    knows) with factor s and bias b; returns the attn_implementation name it is registered
    under."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = registered_name(inner, factor, bias)
    if name in AttentionInterface._global_mapping:
        return name

    def attention(module, query, key, value, attention_mask, **kwargs):
        scale = ssmax_scale(query, key, kwargs.get("position_ids"), factor, bias)
        seen_as = _AttentionOf(module, _ConfigOf(module.config, inner))
        return _inner(inner, module)(seen_as, query * scale, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    _WRAPPED[name] = inner
    # the masks are those of the attention it wraps (none, for one that makes its own)
    if inner in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


def use_ssmax(model: Any, factor: float, bias: float) -> str:
    """Switch ``model`` (as loaded, before any adapter) to SSMax around the attention it
    uses, whichever that is; returns the attention's name."""
    from transformers import AttentionInterface

    inner = model.config._attn_implementation or "sdpa"
    if inner != "eager" and inner not in AttentionInterface():
        raise ModelError(
            f"scaling_softmax: transformers has no attention function '{inner}' to wrap",
            "leave out attn_implementation (SSMax then wraps sdpa)",
        )
    name = ssmax_attention(inner, factor, bias)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise ModelError(
            f"scaling_softmax: {type(model).__name__} cannot change its attention (its code "
            "does not use transformers' attention functions)",
            "leave out scaling_softmax for this model",
        )
    return name

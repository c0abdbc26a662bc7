"""The training loss without the full logits: chunked cross-entropy on the trained positions.

A causal LM's usual loss builds a (tokens x vocabulary) logits tensor for every position,
upcasts it to float32, and keeps it (and its gradient) for the backward pass: with a
49,152-token vocabulary that is 190 KiB per token, several times the rest of a small
model's activations, and the passes over it take as long as the model's own matmuls on a
CPU. Here the output head is applied only to the positions whose next token is trained
(a masked prompt costs nothing), a chunk of positions at a time, and each chunk's gradient
is computed at once, in the forward pass: the backward pass only scales it. The loss and
gradients are those of the usual loss (the same softmax cross-entropy, summed and divided
by the same count); only the order of float additions differs.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

IGNORE_INDEX = -100
CHUNK = 256  # at most this many positions per chunk
CHUNK_FLOATS = 6 * 2**20  # and at most 24 MiB of float32 logits (malloc reuses, not maps, it)
# model types whose head is a bias-free linear layer whose output is the logits as they
# are (no soft-capping or scaling after it)
PLAIN_HEADS = frozenset(
    """llama mistral qwen2 qwen3 gemma3_text gemma3 gemma olmo olmo2 phi3 smollm3 granite
    starcoder2 stablelm""".split()
)
_SCALED = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _chunk_rows(vocabulary: int) -> int:
    return max(8, min(CHUNK, CHUNK_FLOATS // vocabulary))


def _linear_cross_entropy():
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        """sum over positions of cross_entropy(hidden @ weight.T, targets) * scale; the
        gradients are made in the forward pass, a chunk at a time."""

        @staticmethod
        def forward(ctx, hidden, weight, targets, scale):
            with torch.autocast(hidden.device.type, enabled=False):
                grad_hidden = torch.empty_like(hidden)
                grad_weight = (
                    torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                    if ctx.needs_input_grad[1]
                    else None
                )
                total = torch.zeros((), dtype=torch.float32, device=hidden.device)
                rows = _chunk_rows(weight.shape[0])
                grad = torch.empty(
                    (rows, weight.shape[0]), dtype=hidden.dtype, device=hidden.device
                )
                for start in range(0, hidden.shape[0], rows):
                    h = hidden[start : start + rows]
                    t = targets[start : start + rows, None]
                    # row by row in float32: the whole vocabulary of a row stays in cache
                    logp = torch.log_softmax((h @ weight.T).float(), dim=-1)
                    total -= logp.gather(1, t).sum()
                    # d(loss)/d(logits) = softmax - one-hot, times the scale
                    probs = logp.exp_()
                    probs.scatter_add_(1, t, torch.full(t.shape, -1.0, device=t.device))
                    g = grad[: h.shape[0]].copy_(probs.mul_(scale))
                    grad_hidden[start : start + rows] = g @ weight
                    if grad_weight is not None:
                        grad_weight += (g.T @ h).float()
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.weight_dtype = weight.dtype
            return total * scale

        @staticmethod
        def backward(ctx, grad_output):
            grad_hidden, grad_weight = ctx.saved_tensors
            grad_w = None
            if grad_weight is not None:
                grad_w = (grad_weight * grad_output).to(ctx.weight_dtype)
            return grad_hidden * grad_output.to(grad_hidden.dtype), grad_w, None, None

    return LinearCrossEntropy


_FUNCTION: list[Any] = []


def linear_cross_entropy(hidden: Any, weight: Any, targets: Any, scale: float) -> Any:
    """``scale`` x the summed cross-entropy of ``hidden @ weight.T`` (positions x vocabulary)
    against ``targets``, computed in the autocast dtype when autocast is on."""
    import torch

    if not _FUNCTION:
        _FUNCTION.append(_linear_cross_entropy())
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif weight.dtype != hidden.dtype:
        hidden = hidden.to(weight.dtype)
    return _FUNCTION[0].apply(hidden, weight, targets, scale)


def model_problem(model_config: Any) -> str | None:
    """Why the chunked loss cannot stand in for the loss of a model with ``model_config``
    (transformers' config); None when it can."""
    text = getattr(model_config, "text_config", None) or model_config
    kind = getattr(text, "model_type", None)
    if kind not in PLAIN_HEADS:
        return f"{kind} models are not among those whose output head it knows"
    if any(getattr(text, key, None) not in (None, 1, 1.0) for key in _SCALED):
        return f"this {kind} model scales its logits after the output head"
    return None


def chunked_loss_problem(model: Any) -> str | None:
    """Why the chunked loss cannot stand in for ``model``'s own; None when it can."""
    import torch

    problem = model_problem(model.config)
    if problem:
        return problem
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return "the output head is trained through an adapter or has a bias"
    return None


@contextmanager
def head_returns_hidden(head: Any):
    """Within: the output head returns its input, the final hidden states."""
    head.forward = lambda hidden: hidden
    try:
        yield
    finally:
        del head.forward


def chunked_causal_lm_loss(
    model: Any, head: Any, inputs: dict[str, Any], num_items_in_batch: Any = None
) -> tuple[Any, Any]:
    """(loss, outputs) of causal LM ``model`` (whose output head is ``head``) on ``inputs``
    (with ``labels``) as its own loss would give them: shifted labels, IGNORE_INDEX
    positions left out, the sum divided by ``num_items_in_batch`` when given, else the
    mean. The outputs' logits are the final hidden states."""
    labels = inputs.pop("labels")
    with head_returns_hidden(head):
        outputs = model(**inputs)
    hidden = outputs.logits
    if "shift_labels" in inputs:
        targets = inputs["shift_labels"]
    else:
        targets = labels[..., 1:]
        hidden = hidden[..., :-1, :]
    kept = targets != IGNORE_INDEX
    picked, targets = hidden[kept], targets[kept]
    count = num_items_in_batch if num_items_in_batch is not None else picked.shape[0]
    count = float(count.item() if hasattr(count, "item") else count)
    loss = linear_cross_entropy(picked, head.weight, targets, 1.0 / max(count, 1.0))
    return loss, outputs

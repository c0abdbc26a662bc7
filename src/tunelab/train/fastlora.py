"""A shorter forward pass for peft's LoRA linear layers: the same function, fewer passes.

peft computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` after casting ``x`` to the
adapter's dtype (float32 under a bf16 base, cast back by autocast for the matmul) and scales
the full-width output. Here ``x`` stays in the dtype the matmuls run in, the scaling is
applied to the rank-wide intermediate (``r`` columns instead of the layer's width), and on a
CPU the dropout mask comes from one 32-bit random integer per element instead of torch's
Bernoulli sampler (which takes 2-4 times as long), and the kept elements' 1/(1-p) is folded
into the rank-wide scaling. Each element is still dropped with probability p (to within
2^-32) and the kept ones scaled by 1/(1-p); only the random stream differs from peft's.

Layers the shortcut does not cover (DoRA and other variants, several active adapters,
merged or disabled adapters, quantized bases, extra arguments) run peft's own forward.
"""

from __future__ import annotations

import math
import types
from typing import Any


def cpu_keep_mask(shape: Any) -> Any:
    """Uniform random int32 values of ``shape`` (compared with a threshold, they make a
    dropout mask exact to 2^-32). The bits come from numpy's PCG64 (several
    times faster than torch's CPU generator), seeded from torch's generator, so runs stay
    reproducible and resumable from torch's random state alone."""
    import numpy as np
    import torch

    count = math.prod(shape)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    words = np.random.Generator(np.random.PCG64(seed)).bit_generator.random_raw((count + 1) // 2)
    return torch.from_numpy(words.view(np.int32)[:count]).view(shape)


def cpu_dropout(x: Any, p: float) -> tuple[Any, float]:
    """(``x`` with each element zeroed with probability ``p``, the factor 1/(1-p) the kept
    elements still need): the factor is left to the caller, who can apply it to a smaller
    tensor."""
    draws = cpu_keep_mask(x.shape)  # uniform over [-2^31, 2^31)
    keep = (draws >= round(p * 2**32) - 2**31).to(x.dtype)  # x * bool is 4x slower than this
    return x * keep, 1.0 / (1.0 - p)


def _dropout(module: Any, x: Any) -> tuple[Any, float]:
    """(dropout of ``x`` up to a factor, the factor)."""
    import torch

    p = module.p if isinstance(module, torch.nn.Dropout) else 0.0
    if not module.training or p == 0.0:
        return x, 1.0
    if x.device.type != "cpu":
        return torch.nn.functional.dropout(x, p, True), 1.0
    return cpu_dropout(x, p)


def _forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    import torch
    import torch.nn.functional as F

    original = type(self).forward
    if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
        return original(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    if name not in self.lora_A or name in self.lora_variant or self.lora_B[name].bias is not None:
        return original(self, x, *args, **kwargs)
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    if x.dtype != a.dtype and not torch.is_autocast_enabled(x.device.type):
        return original(self, x, *args, **kwargs)
    result = self.base_layer(x)
    dropped, factor = _dropout(self.lora_dropout[name], x)
    low = F.linear(dropped, a) * (self.scaling[name] * factor)
    return result + F.linear(low, b).to(result.dtype)


def _plain(module: Any) -> bool:
    import torch
    from peft.tuners.lora.layer import Linear

    return (
        type(module) is Linear
        and type(module.get_base_layer()) is torch.nn.Linear
        and not module.lora_variant
        and not getattr(module, "fan_in_fan_out", False)
    )


def speed_up_lora(model: Any) -> int:
    """Give every plain LoRA linear layer of ``model`` the shorter forward; returns how many."""
    count = 0
    for module in model.modules():
        if _plain(module):
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count

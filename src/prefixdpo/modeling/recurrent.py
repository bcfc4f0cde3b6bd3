"""Prefix sharing in the convolution layers of hybrid models: LFM2's (and LFM2-MoE's) short convolutions.

A short convolution carries the last L-1 inputs from token to token. In a packed row a branch's first tokens must read
the end of their prompt, not the previous branch: ``prefix_attn.conv.prefix_causal_conv1d`` gathers each token's
predecessors in its own sequence from the layout. ``install_short_convs`` gives each such layer *instance* a forward
that runs it so in packed calls (those that carry ``prefix_layout``, which transformers' decoder layers pass down to
their mixer); every other call runs the layer's own forward. No model class is patched.
"""

from __future__ import annotations

import functools
import types

import torch

from prefix_attn import PrefixLayout
from prefix_attn.conv import prefix_causal_conv1d

# Layer classes of in_proj -> B * x -> depthwise causal conv1d -> C * y -> out_proj (transformers' LFM2 models).
SHORT_CONV_CLASSES = ("Lfm2ShortConv", "Lfm2MoeShortConv")


def _packed_forward(module, original):
    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        layout: PrefixLayout | None = kwargs.get("prefix_layout")
        if layout is None:
            return original(*args, **kwargs)
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        for name in ("cache", "past_key_values", "attention_mask"):
            if kwargs.get(name) is not None:
                raise ValueError(f"a packed prefix-shared row runs without {name}")
        if hidden.shape[0] != 1:
            raise ValueError(f"packed prefix-shared rows have batch size 1, got {tuple(hidden.shape)}")
        b, c, x = self.in_proj(hidden).chunk(3, dim=-1)
        y = prefix_causal_conv1d((b * x)[0], self.conv.weight[:, 0], self.conv.bias, layout)
        return self.out_proj(c * y[None])

    return types.MethodType(forward, module)


def install_short_convs(model: torch.nn.Module) -> int:
    """Make every short-convolution layer of ``model`` run packed calls through the layout (idempotent). Returns how
    many layers it covers."""
    count = 0
    for module in model.modules():
        if type(module).__name__ not in SHORT_CONV_CLASSES:
            continue
        conv = module.conv
        if conv.groups != conv.in_channels or conv.in_channels != conv.out_channels:
            raise ValueError(f"{type(module).__name__}: expected a depthwise convolution")
        if not getattr(module, "_prefixdpo_packed", False):
            module.forward = _packed_forward(module, module.forward)
            module._prefixdpo_packed = True
        count += 1
    return count


__all__ = ["SHORT_CONV_CLASSES", "install_short_convs"]

"""Prefix sharing in the convolution layers of hybrid models: LFM2's (and LFM2-MoE's) short convolutions.

A short convolution carries the last L-1 inputs from token to token. In a packed row a branch's first tokens must read
the end of their prompt, not the previous branch: ``prefix_attn.conv.prefix_causal_conv1d`` gathers each token's
predecessors in its own sequence from the layout. ``install_short_convs`` gives each such layer *instance* a forward
that runs it so in packed calls (those that carry a ``prefix_layout``), and its parent (the decoder layer, which
receives the layout with the model's keyword arguments) a forward that hands the layout to it; every other call runs
the layer's own forward. No model class is patched.
"""

from __future__ import annotations

import types

import torch

from prefix_attn import PrefixLayout
from prefix_attn.conv import prefix_causal_conv1d

from .attention import check_layout_reached

# Layer classes of in_proj -> B * x -> depthwise causal conv1d -> C * y -> out_proj (transformers' LFM2 models).
SHORT_CONV_CLASSES = ("Lfm2ShortConv", "Lfm2MoeShortConv")


def _packed_conv_forward(self, *args, **kwargs):
    """A short convolution's forward: through the layout in a packed call, the class's own forward otherwise. The
    layout comes as a keyword argument where the decoder layer passes its own down, else from ``_layer_forward``."""
    layout: PrefixLayout | None = kwargs.get("prefix_layout", self.__dict__.get("_prefixdpo_layout"))
    if layout is None:
        check_layout_reached(self)
        return _own_forward(self, *args, **kwargs)
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if hidden.shape[-2] != layout.total_tokens:
        raise ValueError(f"{type(self).__name__}: a row of {hidden.shape[-2]} tokens with a layout of "
                         f"{layout.total_tokens}")
    for name in ("cache", "past_key_values", "attention_mask"):
        if kwargs.get(name) is not None:
            raise ValueError(f"a packed prefix-shared row runs without {name}")
    if hidden.shape[0] != 1:
        raise ValueError(f"packed prefix-shared rows have batch size 1, got {tuple(hidden.shape)}")
    b, c, x = self.in_proj(hidden).chunk(3, dim=-1)
    y = prefix_causal_conv1d((b * x)[0], self.conv.weight[:, 0], self.conv.bias, layout)
    return self.out_proj(c * y[None])


def _layer_forward(self, *args, **kwargs):
    """The forward of a layer that holds short convolutions: it hands its ``prefix_layout`` (None in an unpacked
    call) to them. Some transformers releases' LFM2 decoder layers call their convolution without their keyword
    arguments; without this the convolution would run the packed row as one sequence, each branch reading the one
    before it. The layout stays until the layer's next call, because gradient checkpointing may recompute the layer
    in the backward without coming through here (where the checkpoint wraps the class's forward)."""
    for conv in self.children():
        if type(conv).__name__ in SHORT_CONV_CLASSES:
            conv._prefixdpo_layout = kwargs.get("prefix_layout")
    return _own_forward(self, *args, **kwargs)


def _own_forward(module, *args, **kwargs):
    """The forward ``module`` had before ours: one set on the instance (accelerate's device hooks, say), else its
    class's. Kept on the module, so a deep copy calls its own."""
    previous = module.__dict__.get("_prefixdpo_previous_forward")
    return previous(*args, **kwargs) if previous is not None else type(module).forward(module, *args, **kwargs)


def install_short_convs(model: torch.nn.Module) -> int:
    """Make every short-convolution layer of ``model`` run packed calls through the layout (idempotent). Returns how
    many layers it covers. The new forwards call the forwards they replace, kept on the modules (no closure over a
    module), so a deep copy of the model (TRL's reference model) runs its own weights."""
    count = 0
    for parent in list(model.modules()):
        children = [m for m in parent.children() if type(m).__name__ in SHORT_CONV_CLASSES]
        if children and not getattr(parent, "_prefixdpo_packed", False):
            parent._prefixdpo_previous_forward = parent.__dict__.get("forward")
            parent.forward = types.MethodType(_layer_forward, parent)
            parent._prefixdpo_packed = True
        for module in children:
            conv = module.conv
            if conv.groups != conv.in_channels or conv.in_channels != conv.out_channels:
                raise ValueError(f"{type(module).__name__}: expected a depthwise convolution")
            if not getattr(module, "_prefixdpo_packed", False):
                module._prefixdpo_previous_forward = module.__dict__.get("forward")
                module.forward = types.MethodType(_packed_conv_forward, module)
                module._prefixdpo_packed = True
                module._prefixdpo_layout = None
            count += 1
    return count


__all__ = ["SHORT_CONV_CLASSES", "install_short_convs"]

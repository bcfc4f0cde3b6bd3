"""Prefix-shared attention inside any transformers causal LM, through transformers' attention interface.

``register()`` adds the attention function ``"prefix_attn"`` to ``transformers.AttentionInterface``. No mask
function is registered for that name, so transformers builds no attention mask at all (its mask builder skips
implementations it does not know): the layout carries the mask, as ranges.

The layout reaches every attention layer through the model's forward kwargs (``prefix_layout=...``,
``prefix_attn_backend=...``), which transformers passes down to the attention interface. No model class is patched.
Each layer's own attention options reach ``prefix_attention`` as transformers passes them: ``sliding_window``
(Mistral, Gemma 2/3, gpt-oss, Qwen2's windowed layers), ``softcap`` (Gemma 2) and ``s_aux`` (gpt-oss's sinks).
Features we cannot honour exactly are refused with an error naming them.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F

from prefix_attn import PrefixLayout, prefix_attention

ATTN_NAME = "prefix_attn"

# Config attributes that change attention in ways the layout cannot express.
_REFUSED_CONFIG = {
    "attention_chunk_size": "chunked attention",
}


class UnsupportedModelError(ValueError):
    """The model uses an attention feature prefix sharing cannot honour exactly."""


def _options(kwargs) -> dict:
    """The layer's attention options as ``prefix_attention`` takes them."""
    sinks = kwargs.get("s_aux")
    return {"window": kwargs.get("sliding_window"), "softcap": kwargs.get("softcap"),
            "sinks": kwargs.get("sinks") if sinks is None else sinks}


# How many packed rows this thread is running (``packed_row``). Inside one, a layer called without the row's layout
# means the model does not pass its keyword arguments down to that layer (a transformers release that drops them): it
# would treat the whole row as one sequence, so it is refused instead. Per thread: a model called unpacked in another
# thread meanwhile (an evaluation or generation thread) is not inside this row.
_packed_rows = threading.local()


@contextlib.contextmanager
def packed_row():
    """Marks the forward of a packed row: attention layers (and short convolutions) that get no layout raise."""
    _packed_rows.depth = getattr(_packed_rows, "depth", 0) + 1
    try:
        yield
    finally:
        _packed_rows.depth -= 1


def check_layout_reached(layer: torch.nn.Module) -> None:
    """Raise if ``layer`` runs inside a packed row's forward (in this thread) without the row's layout."""
    if getattr(_packed_rows, "depth", 0):
        raise RuntimeError(
            f"{type(layer).__name__} ran inside a packed row without its prefix_layout: this transformers version "
            "does not pass the model's keyword arguments down to it, so it would attend across the whole row. "
            "Please report the model and the transformers version.")


def _fallback(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    # Called without a layout (e.g. generate() after training): plain causal attention for one unpadded sequence.
    check_layout_reached(module)
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        raise ValueError(
            f"The model's attention implementation is {ATTN_NAME!r}, which runs packed prefix-shared rows. For padded "
            "batches or generation with a cache, switch it back first: model.set_attn_implementation('sdpa')."
        )
    options = _options(kwargs)
    if any(x is not None for x in options.values()):  # one sequence is a layout of one document
        rows = []
        for b in range(query.shape[0]):
            layout = PrefixLayout.from_lengths([0], [[query.shape[2]]], device=query.device)
            rows.append(prefix_attention(query[b].transpose(0, 1), key[b].transpose(0, 1), value[b].transpose(0, 1),
                                         layout, softmax_scale=scaling, backend="auto", **options))
        return torch.stack(rows), None
    groups = query.shape[1] // key.shape[1]
    out = F.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), is_causal=True, scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


def prefix_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """transformers attention function: query [1, Hq, T, D], key/value [1, Hkv, T, D] -> ([1, T, Hq, D], None)."""
    layout: PrefixLayout | None = kwargs.get("prefix_layout")
    if layout is None:
        return _fallback(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"packed prefix-shared rows have batch size 1, got query of shape {tuple(query.shape)}")
    if dropout and module.training:
        raise UnsupportedModelError(
            f"attention dropout ({dropout}) is not supported with prefix sharing; set disable_dropout=True (TRL's default)"
        )
    if not (query.dtype == key.dtype == value.dtype):
        # Under autocast the projections and RoPE can leave q, k, v in different dtypes; SDPA would cast them to the
        # autocast dtype, and so do we.
        dev = query.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else value.dtype
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    out = prefix_attention(q, k, v, layout, softmax_scale=scaling, backend=kwargs.get("prefix_attn_backend", "auto"),
                           **_options(kwargs))
    return out.unsqueeze(0), None


def register() -> str:
    """Register ``prefix_attn`` with transformers (idempotent). Returns the implementation name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, prefix_attention_forward)
    return ATTN_NAME


# Hybrid models: some layers are not attention (state-space, recurrent or convolution layers), which carry state from
# token to token across the whole row and so cannot see the layout, until a packed forward forks their state at the
# end of each prompt (``recurrent``: LFM2's short convolutions).
_HYBRID_MODEL_TYPES = {
    "nemotron_h": "Mamba-2 layers",
    "qwen3_next": "gated DeltaNet (linear attention) layers", "granitemoehybrid": "Mamba-2 layers",
    "jamba": "Mamba layers", "bamba": "Mamba-2 layers", "falcon_h1": "Mamba-2 layers", "zamba": "Mamba layers",
    "zamba2": "Mamba-2 layers", "mamba": "Mamba layers", "mamba2": "Mamba-2 layers", "rwkv": "RWKV layers",
    "recurrent_gemma": "recurrent layers", "minimax": "lightning (linear) attention layers",
}


# Models whose non-attention layers run packed rows (``recurrent``): their layer types.
_FORKED_LAYER_TYPES = {"lfm2": {"conv"}, "lfm2_moe": {"conv"}}


def text_config(config):
    """The language model's config of a (possibly multimodal) model config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _model_class(config):
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    for mapping in (MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING):
        try:
            return mapping[type(config)]
        except KeyError:
            continue
    return None


def check_config_supported(config, model_class=None) -> None:
    """Raise UnsupportedModelError, naming the feature and the layer type, if prefix sharing cannot run a model of
    ``config`` exactly. Reads the config only, so it runs before any weights load."""
    text = text_config(config)
    model_type = getattr(text, "model_type", None) or getattr(config, "model_type", "")
    name = (model_class or _model_class(config) or type(config)).__name__
    if model_class is None:
        model_class = _model_class(config)
    if model_type in _HYBRID_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{name} is a hybrid model: its {_HYBRID_MODEL_TYPES[model_type]} carry state along the row, which prefix "
            "sharing cannot fork at the end of a prompt yet"
        )
    if model_class is not None and not getattr(model_class, "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"{name} does not route its attention through transformers' attention interface, so prefix-shared "
            "attention cannot be installed into it"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder model; only causal language models are supported")
    for attr, feature in _REFUSED_CONFIG.items():
        if getattr(text, attr, None) is not None:
            raise UnsupportedModelError(f"{name} uses {feature} ({attr}={getattr(text, attr)}), which prefix sharing "
                                        "cannot honour exactly")
    layer_types = getattr(text, "layer_types", None) or []
    known = {"full_attention", "sliding_attention"} | _FORKED_LAYER_TYPES.get(model_type, set())
    unknown = sorted(set(layer_types) - known)
    if unknown:
        raise UnsupportedModelError(f"{name} has layers of type {unknown}, which prefix sharing does not support")


def check_model_supported(model) -> None:
    """``check_config_supported`` for a built model (for a PEFT model: the model it wraps)."""
    if callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()
    check_config_supported(model.config, type(model))


def _language_model_key(config) -> str | None:
    """The sub-config name of a multimodal config's language model (e.g. ``text_config``), None for a text model."""
    text = text_config(config)
    if text is config:
        return None
    return next((key for key in getattr(config, "sub_configs", {}) if getattr(config, key, None) is text), None)


def language_model_attention(model) -> str:
    """The attention implementation of ``model``'s language model."""
    return text_config(model.config)._attn_implementation


def set_language_model_attention(model, implementation: str) -> None:
    """Set the attention implementation of ``model``'s language model only: a multimodal model's vision tower keeps
    its own (it runs each image as a sequence of its own and never sees the layout)."""
    key = _language_model_key(model.config)
    model.set_attn_implementation(implementation if key is None else {key: implementation})


def install(model) -> None:
    """Check the model, switch its language model's attention to ``prefix_attn`` and its short convolutions (if any)
    to packed rows."""
    from .recurrent import install_short_convs

    check_model_supported(model)
    register()
    install_short_convs(model)
    set_language_model_attention(model, ATTN_NAME)

"""prefix_attn: attention over packed rows of prefix-shared documents (``prefix_attn.layout`` defines the layout).

Depends on torch (and triton for the `triton` backend) only; imports nothing from prefixdpo.
"""

from .layout import PrefixLayout
from .ops import BACKENDS, FP8_BACKENDS, attention_tables, prefix_attention, resolve_backend
from .schedule import AttentionTables, TileShape, TokenTables, position_ids, use_tables


def __getattr__(name):
    # The FP8 forward's public names, imported on first use (they need triton; the package itself does not).
    if name in ("FP8AttentionConfig", "fp8_supported", "quantize_qkv_fp8", "set_fp8_default_config",
                "triton_fp8_prefix_attention"):
        from . import triton

        return getattr(triton, name)
    if name == "rotation_matrix":
        from .fp8_reference import rotation_matrix

        return rotation_matrix
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BACKENDS", "FP8_BACKENDS", "AttentionTables", "FP8AttentionConfig", "PrefixLayout", "TileShape",
           "TokenTables", "attention_tables", "fp8_supported", "position_ids", "prefix_attention", "quantize_qkv_fp8",
           "resolve_backend", "rotation_matrix", "set_fp8_default_config", "triton_fp8_prefix_attention", "use_tables"]

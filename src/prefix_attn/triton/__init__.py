"""The `triton` backends: prefix-sharing attention in Triton (forward and backward in 16-bit or fp32 inputs, and an
FP8 forward for the frozen reference model), with the fused builder of the tables the kernels read.

Modules: ``common`` (the kernels' shared helpers), ``config`` (tile sizes, tuned defaults), ``forward``,
``backward``, ``backward_gluon`` (the backward's two main kernels in Gluon, for Hopper), ``fp8`` (kernels and
launchers), ``tables`` (the fused table builder), ``attention`` (the entry points
and their autograd / custom-op glue). This package imports triton; ``prefix_attn`` itself does not.
"""

from .attention import (FP8_HEAD_DIMS, SUPPORTED_HEAD_DIMS, fp8_supported, triton_fp8_prefix_attention,
                        triton_prefix_attention, triton_supported)
from .config import (FP8AttentionConfig, TritonAttentionConfig, default_config, fp8_default_config,
                     set_default_config, set_fp8_default_config)
from .fp8 import FP8QKV, fp8_tables, quantize_qkv_fp8

__all__ = ["FP8AttentionConfig", "FP8QKV", "FP8_HEAD_DIMS", "SUPPORTED_HEAD_DIMS", "TritonAttentionConfig",
           "default_config", "fp8_default_config", "fp8_supported", "fp8_tables", "quantize_qkv_fp8",
           "set_default_config", "set_fp8_default_config", "triton_fp8_prefix_attention", "triton_prefix_attention",
           "triton_supported"]

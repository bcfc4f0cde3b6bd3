"""prefix_attn: attention over packed rows of prefix-shared documents (shared/DESIGN.md, "The layout").

Depends on torch (and triton for the `triton` backend) only; imports nothing from prefixdpo.
"""

from .layout import PrefixLayout
from .ops import BACKENDS, prefix_attention, resolve_backend

__all__ = ["BACKENDS", "PrefixLayout", "prefix_attention", "resolve_backend"]

"""PrefixDPOConfig: TRL's DPOConfig plus the fields prefix sharing adds. Every TRL field keeps its meaning and default."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig

ATTN_BACKENDS = ("auto", "triton", "flex", "reference")


@dataclass
class PrefixDPOConfig(DPOConfig):
    """Configuration for :class:`~prefixdpo.PrefixDPOTrainer`.

    Everything of :class:`trl.DPOConfig` applies unchanged. The fields below are new; each is checked once in
    ``__post_init__``.
    """

    prefix_sharing: bool = field(
        default=True,
        metadata={
            "help": "Put each pair into one sequence: the prompt once, then the chosen and the rejected response, "
            "which cannot see each other. Exact (same log-probs as running the prompt twice) and faster. Set False "
            "to pack each response with its own copy of the prompt (for comparison)."
        },
    )
    attn_backend: str = field(
        default="auto",
        metadata={
            "help": "Attention backend for the packed rows: 'auto' (triton on a CUDA GPU where it runs, else flex on "
            "CUDA, else reference), 'triton' (our kernels), 'flex' (FlexAttention, the prefix-sharing paper's "
            "method), 'reference' (dense-mask SDPA: CPU, tests, tiny models).",
            "choices": list(ATTN_BACKENDS),
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {self.attn_backend!r}")

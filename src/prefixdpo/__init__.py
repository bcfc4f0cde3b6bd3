"""prefixdpo: DPO with prefix-shared, packed sequences for Hugging Face models (TRL-compatible)."""

from .config import PrefixDPOConfig
from .trainer import PrefixDPOTrainer

__all__ = ["PrefixDPOConfig", "PrefixDPOTrainer"]
__version__ = "0.1.0"

"""preftune: preference fine-tuning (DPO and its family) for causal language models."""

__version__ = "0.1.0"

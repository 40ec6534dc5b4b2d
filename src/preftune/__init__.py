"""preftune: preference fine-tuning (DPO and its family) for causal language models.

From Python, the same runs as the command line::

    import preftune

    result = preftune.train("examples/dpo_lora.yaml", model=model, tokenizer=tokenizer, train_dataset=pairs)
    report = preftune.evaluate(result, pairs="test.jsonl")

The heavy parts (torch, transformers) load on first use, so `import preftune` stays quick.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from preftune.config import TrainConfig, load_config
from preftune.errors import PreftuneError

__version__ = "0.1.0"

# A library logs and never prints: its records go nowhere until the application (the `preftune`
# command, a notebook's logging.basicConfig) installs a handler.
logging.getLogger("preftune").addHandler(logging.NullHandler())

_LAZY = {
    "train": "preftune.api",
    "TrainResult": "preftune.api",
    "evaluate": "preftune.api",
    "generate": "preftune.api",
    "score": "preftune.api",
    "build_pairs": "preftune.api",
    "preference_loss": "preftune.losses",
}

__all__ = [
    "train",
    "TrainResult",
    "TrainConfig",
    "load_config",
    "evaluate",
    "generate",
    "score",
    "build_pairs",
    "preference_loss",
    "PreftuneError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'preftune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

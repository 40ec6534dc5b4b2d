"""preftune: preference fine-tuning (DPO and its family) for causal language models."""

import logging

__version__ = "0.1.0"

# A library logs and never prints: its records go nowhere until the application (the `preftune`
# command, a notebook's logging.basicConfig) installs a handler.
logging.getLogger("preftune").addHandler(logging.NullHandler())

"""The strategies, one module per family, and the registry the recipe builds them from.

Each strategy is a plug-in: it is given its own section of the settings (`config.DPOLoss`, ...)
and answers every question the recipe asks (its data, model, reference, step constraints, units,
loss, metrics, save rules), so the run machinery never names a strategy. A new strategy is a class
here and its section in `config.py`.
"""

from __future__ import annotations

from preftune.config import Settings
from preftune.objectives.base import Objective, Runtime, padded
from preftune.objectives.dpo import DPO
from preftune.objectives.kto import KTO
from preftune.objectives.reference_free import CPO, ORPO, SimPO
from preftune.objectives.reward import Reward
from preftune.objectives.sft import SFT

REGISTRY: dict[str, type[Objective]] = {"sft": SFT, "dpo": DPO, "kto": KTO, "orpo": ORPO, "simpo": SimPO, "cpo": CPO, "reward": Reward}


def make_objective(settings: Settings) -> Objective:
    """The objective of `settings.strategy`, given its section."""
    return REGISTRY[settings.strategy](settings)


__all__ = ["CPO", "DPO", "KTO", "ORPO", "Objective", "REGISTRY", "Reward", "Runtime", "SFT", "SimPO", "make_objective", "padded"]

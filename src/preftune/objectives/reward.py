"""A Bradley-Terry reward model on preference pairs (as TRL's RewardTrainer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from preftune import models
from preftune.batching import reward_input_ids
from preftune.config import ModelSettings, RewardLoss
from preftune.data import margin_weight
from preftune.losses import bradley_terry_loss
from preftune.objectives.base import Batch, Objective, Runtime, weighted


@dataclass
class TokenizedRewardPair:
    """A pair as the reward model reads it: the whole conversation of each side (see
    `batching.reward_input_ids`), so training and scoring see the same tokens."""

    index: int
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False
    weight: float = 1.0  # the loss weight under `margin_weighting`

    @property
    def num_tokens(self) -> int:
        return len(self.chosen_ids) + len(self.rejected_ids)


class RewardScores(nn.Module):
    """A sequence classifier's scalar score per row, pooled by the model itself at the last token
    that is not padding, exactly as when its saved folder scores completions (`rewards.py`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, 0].float()


def collate_reward_pairs(pairs: Sequence[TokenizedRewardPair], pad_id: int) -> Batch:
    """2B right-padded rows: the B chosen conversations, then the B rejected ones."""
    rows = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        input_ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[r, : len(row)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "index": torch.tensor([p.index for p in pairs], dtype=torch.long),
        "num_tokens": torch.tensor(sum(len(r) for r in rows)),
        "pair_weight": torch.tensor([p.weight for p in pairs], dtype=torch.float32),
    }


class Reward(Objective):
    """A one-output sequence-classification head on the base model, trained so the chosen
    completion outscores the rejected one. Metrics as TRL's RewardTrainer (`accuracy`, `margin`,
    `mean_reward`), plus the mean scores per side. Its LoRA run also writes `final_merged/`, the
    folder `--reward` loads."""

    name = "reward"
    causal_lm = False
    lora_task_type = "SEQ_CLS"
    merges_adapter = True
    data_kind = None  # scores whole conversations: reads and tokenizes its pairs itself
    stat_keys = ("loss", "accuracy", "margin", "mean_reward", "rewards/chosen", "rewards/rejected")

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.section: RewardLoss = settings.loss

    def load_model(self, name: str, model: ModelSettings, *, dtype: torch.dtype, device: Any, pad_id: int) -> nn.Module:
        return models.load_reward_model(
            name, pad_token_id=pad_id, dtype=dtype, device=device, attn_implementation=model.attn_implementation,
            gradient_checkpointing=model.gradient_checkpointing,
        )

    def tokenize(self, tokenizer: Any, examples: Sequence[Any]) -> tuple[list[Any], str, list[str]]:
        limit = self.data.max_seq_length
        items, truncated, longest, locations = [], 0, 0, []
        for i, example in enumerate(examples):
            chosen = reward_input_ids(tokenizer, example.prompt, example.chosen)
            rejected = reward_input_ids(tokenizer, example.prompt, example.rejected)
            longest = max(longest, len(chosen), len(rejected))
            cut = len(chosen) > limit or len(rejected) > limit
            if cut:
                # The score is read at the end, so the beginning goes.
                chosen, rejected = chosen[-limit:], rejected[-limit:]
                truncated += 1
                if len(locations) < 3:
                    locations.append(example.location)
            weight = margin_weight(example) if self.section.margin_weighting else 1.0
            items.append(TokenizedRewardPair(i, chosen, rejected, cut, weight))
        summary = f"{len(items)} pairs tokenized as conversations; truncated (from the left): {truncated}; longest {longest} tokens"
        return items, summary, locations

    def wrap(self, model: nn.Module, fast_head: bool | None = None, router_aux: Any = None) -> nn.Module:
        return RewardScores(model)  # the classifier's own forward: no head to choose, no router loss

    def check_batches(self, items: Sequence[Any], pad_id: int) -> None:
        return None  # the classifier's own forward scores whole sequences: no fast path

    def collate(self, items: Sequence[Any], pad_id: int) -> Batch:
        return collate_reward_pairs(items, pad_id)

    def loss(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        """Per pair, -log sigmoid(score chosen - score rejected): pure."""
        return bradley_terry_loss(chosen, rejected)

    def forward(self, rt: Runtime, module: nn.Module, batch: Batch, context: Any, training: bool):
        scores = module(batch["input_ids"], batch["attention_mask"])
        half = scores.shape[0] // 2
        chosen, rejected = scores[:half], scores[half:]
        losses = weighted(self.loss(chosen, rejected), batch)
        c, r = chosen.detach(), rejected.detach()
        return losses, {
            "loss": losses.detach(),
            "accuracy": (c > r).float(),
            "margin": c - r,
            "mean_reward": (c + r) / 2,
            "rewards/chosen": c,
            "rewards/rejected": r,
        }

    def progress(self, means: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{means['loss']:.4f}", "acc": f"{means['accuracy']:.2f}", "margin": f"{means['margin']:.3f}"}

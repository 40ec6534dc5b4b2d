"""Supervised fine-tuning, the usual first stage before preference tuning."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from preftune.config import SFTLoss
from preftune.data import load_sft_data
from preftune.logprobs import CompletionLogprobs, completion_logps
from preftune.objectives.base import Batch, Objective, Runtime
from preftune.prepared import PreparedData, SequenceItems, item_lengths
from preftune.sequences import SequenceRow, collate_sequences, tokenize_sft

log = logging.getLogger("preftune")


class SFT(Objective):
    """The negative log-likelihood of the trained tokens (completion or assistant tokens, or all of
    them), averaged over those tokens across the whole step, as TRL's SFTTrainer;
    `mean_token_accuracy` is the share of them that were the model's top prediction."""

    name = "sft"
    unit = "examples"
    segments_text = "packed sequences"
    data_kind = "sft"
    stat_keys = ("loss", "mean_token_accuracy")

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.section: SFTLoss = settings.loss
        self.packing = self.section.packing  # turned off for models whose rows cannot hold several sequences

    def row_unit(self) -> str:
        return "rows" if self.packing else self.unit

    def items(self, data: PreparedData, rows: np.ndarray, offset: int) -> tuple[Sequence[Any], str, list[str]]:
        d = self.data
        items = SequenceItems(data, rows, offset, d.max_seq_length, d.max_prompt_length, self.section.completion_only_loss, self.packing)
        summary, truncated, no_loss = items.summary()
        if no_loss:
            log.warning("%d examples have no trained token left after truncation; raise max_seq_length", no_loss)
        return items, summary, truncated

    def load(self, source: Any, split: str) -> list[Any]:
        return load_sft_data(source, split, self.data.layout)

    def tokenize(self, tokenizer: Any, examples: Sequence[Any]) -> tuple[list[Any], str, list[str]]:
        d = self.data
        rows, stats = tokenize_sft(
            tokenizer, examples, d.max_seq_length, d.max_prompt_length, self.section.completion_only_loss, self.packing
        )
        if stats.no_loss_tokens:
            log.warning("%d examples have no trained token left after truncation; raise max_seq_length", stats.no_loss_tokens)
        return rows, stats.summary(), stats.locations

    def units(self, item: Any) -> int:
        return item.loss_tokens

    def wrap(self, model: nn.Module, fast_head: bool | None = None, router_aux: Any = None) -> nn.Module:
        return CompletionLogprobs(model, token_accuracy=True, fast_head=fast_head, router_aux=router_aux)

    def collate(self, items: Sequence[Any], pad_id: int) -> Batch:
        return collate_sequences(items, pad_id)

    def check_batches(self, items: Sequence[Any], pad_id: int) -> tuple[Batch, Batch | None, torch.Tensor | None] | None:
        """Packed rows are checked against their sequences one a row; unpacked rows alone."""
        groups = getattr(items, "groups", None)
        if groups is not None:  # a table view: rank its rows without building them
            sizes, lengths = np.array([len(g) for g in groups]), item_lengths(items)
            sample = [items[int(j)] for j in np.lexsort((np.arange(len(groups)), -lengths, -sizes))[:2]]
        else:
            sample = sorted(items, key=lambda row: (-len(row.sequences), -row.num_tokens))[:2]
        if not sample:
            return None
        singles = [SequenceRow(k, [seq]) for row in sample for k, seq in enumerate(row.sequences)]
        group = torch.tensor([r for r, row in enumerate(sample) for _ in row.sequences], dtype=torch.long)
        packed = any(len(row.sequences) > 1 for row in sample)
        return collate_sequences(singles, pad_id), collate_sequences(sample, pad_id) if packed else None, group

    def refuse_segments(self) -> bool:
        self.packing = False
        return True  # the rows are built again, one sequence each

    def loss(self, token_logp_sums: torch.Tensor) -> torch.Tensor:
        """Per row, minus the summed log-probs of its trained tokens (the recipe divides by the
        step's trained tokens): pure."""
        return -token_logp_sums

    def forward(self, rt: Runtime, module: nn.Module, batch: Batch, context: Any, training: bool):
        scored = completion_logps(module, batch)
        losses = self.loss(scored.sums)
        values = {"loss": losses.detach(), "mean_token_accuracy": scored.hits}
        return self.with_router_aux(scored, losses, values, scored.counts)

    def progress(self, means: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{means['loss']:.4f}", "acc": f"{means['mean_token_accuracy']:.3f}"}

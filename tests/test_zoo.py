"""Every model family computed right: on a zoo of tiny random models of transformers' own
architectures (see zoo.py), the first DPO step's log-probs with each kind of reference, and packed
SFT's first loss, equal plain transformers run on separate sequences; a few 3-step loss curves
equal a plain DPO loop written here; the README's supported-models table is this zoo's verdicts.

The expected numbers never go through preftune: prompts and completions are tokenized here by
the scoring rule (prompt with the tokenizer's special tokens, completion without, then EOS) and
scored by `model(input_ids).logits` one sequence at a time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import zoo
from preftune import masks
from preftune.config import TrainConfig, validate
from preftune.training.recipe import Trainer

WORDS = (
    "the sky is blue and the grass is green I loved this movie it was wonderful and great "
    "hated film terrible awful good bad happy sad yes no maybe"
).split()
MAX_SEQ = 128
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(autouse=True)
def _propagate_logs():
    logging.getLogger("preftune").propagate = True


def _records(n: int = 6, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    # Rows of 20-40 tokens: longer than the zoo's 8-token windows.
    return [
        {"prompt": text(rng.randint(6, 12)), "chosen": " " + text(rng.randint(4, 10)), "rejected": " " + text(rng.randint(3, 10))}
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo-data")
    records = _records()
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    sft = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in records]
    (folder / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    return folder, records


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("zoo-models")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = zoo.save_model(name, tiny_tokenizer, root / re.sub(r"\W+", "-", name))
        return built[name]

    return get


def ids_of(tok, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    prompt_ids = tok(prompt)["input_ids"]
    completion_ids = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return prompt_ids, completion_ids


def plain_logp(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """Sum of log p(completion token | everything before it), the model's own forward, full logits."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logps = model(input_ids=ids, use_cache=False).logits.float()[0, :-1].log_softmax(-1)
    return logps[len(prompt_ids) - 1 :].gather(-1, ids[0, len(prompt_ids) :, None]).sum()


def run(folder: Path, dataset: Path, out: Path, **overrides) -> tuple[Trainer, list[dict]]:
    settings = dict(
        model_name=str(folder),
        dataset=str(dataset),
        output_dir=str(out),
        per_device_train_batch_size=3,
        gradient_accumulation_steps=2,  # two micro-batches a step
        max_steps=1,
        eval_split=0,
        lora_r=0,
        max_seq_length=MAX_SEQ,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        lr_scheduler_type="constant",
        logging_steps=1,
        progress_bar=False,
        cache_dir=str(out.parent / "cache"),
        save_steps=1000,
    )
    settings.update(overrides)
    trainer = Trainer(validate(TrainConfig(**settings)))
    trainer.setup()
    trainer.train()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return trainer, metrics


def close(got: float, expected: float, rel: float = 1e-4) -> bool:
    return abs(got - expected) <= rel * max(1.0, abs(expected))


@pytest.mark.parametrize("name", zoo.NAMES)
def test_first_step_equals_plain_transformers(name, model_dirs, data, tiny_tokenizer, tmp_path, caplog):
    """DPO's step-1 `logps/*` with a copy, a precomputed and a disabled-adapter reference, and the
    loss (ln 2, plus coef x aux for MoE), then packed SFT's step-1 loss, equal the model's own forward."""
    caplog.set_level(logging.INFO, logger="preftune")
    folder = model_dirs(name)
    data_dir, records = data
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    chosen, rejected, nll, tokens = [], [], 0.0, 0
    with torch.no_grad():
        for r in records:
            p, c = ids_of(tiny_tokenizer, r["prompt"], r["chosen"])
            _, j = ids_of(tiny_tokenizer, r["prompt"], r["rejected"])
            assert len(p) + max(len(c), len(j)) < MAX_SEQ and len(p) < MAX_SEQ // 2  # nothing truncated
            chosen.append(float(plain_logp(model, p, c)))
            rejected.append(float(plain_logp(model, p, j)))
            nll -= chosen[-1]
            tokens += len(c)
    expected_chosen, expected_rejected = sum(chosen) / len(chosen), sum(rejected) / len(rejected)
    moe = "MoE" in name
    segments = masks.attention_spec(model).blocker is None  # the structural verdict, confirmed by the run's check

    for reference, lora in (("copy", 0), ("precomputed", 0), ("adapter", 4)):
        trainer, metrics = run(folder, data_dir / "pairs.jsonl", tmp_path / f"dpo-{reference}", reference=reference, lora_r=lora)
        assert trainer.share_prompt == segments
        first = metrics[0]
        assert close(first["logps/chosen"], expected_chosen), (reference, first["logps/chosen"], expected_chosen)
        assert close(first["logps/rejected"], expected_rejected), (reference, first["logps/rejected"], expected_rejected)
        if moe:
            assert first["aux_loss"] > 0
            assert first["loss"] == pytest.approx(math.log(2) + 0.02 * first["aux_loss"], abs=1e-6)
        else:
            assert "aux_loss" not in first
            assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)

    trainer, metrics = run(folder, data_dir / "sft.jsonl", tmp_path / "sft", strategy="sft", packing=True,
                           router_aux_loss_coef=0.0)
    assert close(metrics[0]["loss"], nll / tokens), (metrics[0]["loss"], nll / tokens)
    assert trainer.objective.packing == segments
    policy_lines = [line for line in caplog.messages if line.startswith("policy: ")]
    assert len(policy_lines) == 4 and all(("one sequence a row" in line) != segments for line in policy_lines)


def plain_dpo_curve(folder: Path, records: list[dict], tok, steps: int, lr: float, beta: float) -> list[float]:
    """DPO written out: frozen reference, sigmoid loss on separate sequences, fused AdamW, no clipping."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for module in policy.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    policy.train()
    encoded = [(ids_of(tok, r["prompt"], r["chosen"]), ids_of(tok, r["prompt"], r["rejected"])) for r in records]
    with torch.no_grad():
        ref = [(plain_logp(reference, *c), plain_logp(reference, *j)) for c, j in encoded]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    losses = []
    for _ in range(steps):
        terms = []
        for (c, j), (rc, rj) in zip(encoded, ref):
            margin = (plain_logp(policy, *c) - rc) - (plain_logp(policy, *j) - rj)
            terms.append(-F.logsigmoid(beta * margin))
        loss = torch.stack(terms).mean()
        losses.append(float(loss))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses


@pytest.mark.parametrize("name", ["gemma3 (sliding window)", "lfm2 (convolution + attention)",
                                  "falcon_h1 (SSM + attention, scaled head)"])
def test_three_step_loss_curve_equals_plain_dpo(name, model_dirs, data, tiny_tokenizer, tmp_path):
    folder = model_dirs(name)
    data_dir, records = data
    _, metrics = run(folder, data_dir / "pairs.jsonl", tmp_path / "dpo", max_steps=3, max_grad_norm=0.0,
                     reference="precomputed", beta=0.5, learning_rate=3e-3)
    expected = plain_dpo_curve(folder, records, tiny_tokenizer, steps=3, lr=3e-3, beta=0.5)
    got = [m["loss"] for m in metrics if "loss" in m]
    assert len(got) == 3 and got[0] == pytest.approx(math.log(2), abs=1e-6) and got[2] < got[0]
    for g, e in zip(got, expected):
        assert close(g, e), (got, expected)


# ---------------------------------------------------------------------------------------------
# The supported-models table of the README


def _verdicts(name: str, tok, pairs_file: Path, sft_file: Path) -> list[str]:
    from preftune.data import load_preference_data, load_sft_data
    from preftune.logprobs import check_paths, router_aux
    from preftune.config import resolve
    from preftune.objectives import DPO, SFT

    model = zoo.build_model(name, tok)
    dpo = DPO(resolve(TrainConfig(max_seq_length=MAX_SEQ)))
    pairs, _, _ = dpo.tokenize(tok, load_preference_data(str(pairs_file), "train"))
    shared = check_paths(model, *dpo.check_batches(pairs, tok.eos_token_id))
    sft = SFT(resolve(TrainConfig(strategy="sft", packing=True, max_seq_length=MAX_SEQ)))
    rows, _, _ = sft.tokenize(tok, load_sft_data(str(sft_file), "train"))
    packed = check_paths(model, *sft.check_batches(rows, tok.eos_token_id))
    aux = router_aux(model)

    def cell(ok: bool, why: str) -> str:
        return "yes" if ok else f"no: {why}"

    return [
        name,
        cell(shared.fast_head, shared.head_reason),
        cell(shared.segments, shared.segment_reason),
        cell(packed.segments, packed.segment_reason),
        f"yes (coefficient {aux.coef:g})" if aux else "-",
    ]


def supported_models_table(tok, pairs_file: Path, sft_file: Path) -> str:
    header = ["family (tiny test model)", "chunked output head", "shared prompt", "SFT packing", "MoE aux loss"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in zoo.NAMES:
        lines.append("| " + " | ".join(_verdicts(name, tok, pairs_file, sft_file)) + " |")
    return "\n".join(lines)


def test_readme_supported_models_table_is_the_zoo_verdicts(data, tiny_tokenizer):
    data_dir, _ = data
    table = supported_models_table(tiny_tokenizer, data_dir / "pairs.jsonl", data_dir / "sft.jsonl")
    start, end = "<!-- supported-models:start -->", "<!-- supported-models:end -->"
    text = README.read_text()
    assert start in text and end in text, "README lacks the supported-models markers"
    block = f"{start}\n{table}\n{end}"
    current = text[text.index(start) : text.index(end) + len(end)]
    if os.environ.get("PREFTUNE_WRITE_DOCS") and current != block:
        README.write_text(text.replace(current, block))
        current = block
    assert current == block, "README's supported-models table differs from the zoo (PREFTUNE_WRITE_DOCS=1 rewrites it)"

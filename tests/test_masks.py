"""Masks from segments, what each model's structure allows, the start-of-run check of the fast
paths (it catches what the structural rules and name lists miss), the MoE aux loss, FlexAttention's
BlockMask, and LoRA defaults that work on every family."""

from __future__ import annotations

import logging
import random

import pytest
import torch

import zoo
from preftune import logprobs, masks
from preftune.batching import collate_pairs, tokenize_dataset
from preftune.data import PreferenceExample
from preftune.errors import PreftuneError
from preftune.logprobs import CompletionLogprobs, check_paths, completion_logps, own_forward_sums, router_aux
from preftune.models import apply_lora
from preftune.sequences import SequenceRow, TokenizedSequence, collate_sequences


@pytest.fixture(autouse=True)
def _propagate_logs():
    logging.getLogger("preftune").propagate = True


@pytest.fixture(scope="module")
def pairs(tiny_tokenizer):
    rng = random.Random(1)
    words = "the sky is blue and the grass is green I loved this movie it was wonderful".split()

    def text(n):
        return " ".join(rng.choice(words) for _ in range(n))

    examples = [
        PreferenceExample(prompt=text(rng.randint(6, 10)), chosen=" " + text(rng.randint(4, 8)),
                          rejected=" " + text(rng.randint(3, 8)), location=f"x:{i}")
        for i in range(4)
    ]
    return tokenize_dataset(tiny_tokenizer, examples, 128, None)[0]


def test_segment_mask_with_a_window_and_packed_documents():
    # Row 0: prompt (2 tokens), chosen (2), rejected (1). Row 1: two packed sequences, then padding.
    doc = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 1, 1, -1]])
    branch = torch.tensor([[0, 0, 1, 1, 2], [0, 0, 0, 0, 0]])
    pos = torch.tensor([[0, 1, 2, 3, 2], [0, 1, 0, 1, 0]])
    mask = masks.segment_mask(doc, branch, pos, window=2)[:, 0].int().tolist()
    assert mask[0] == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],  # position 2 sees positions 1 and 2: a window of 2
        [0, 0, 1, 1, 0],
        [0, 1, 0, 0, 1],  # the rejected token (position 2) sees the prompt's last token, not the chosen
    ]
    assert mask[1] == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],  # the second sequence sees nothing of the first
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1],  # padding attends to itself only
    ]


@pytest.mark.parametrize(
    "name, window, layer_types, blocker",
    [
        ("llama", None, (), None),
        ("mistral (sliding window)", zoo.WINDOW, (), None),
        ("gemma3 (sliding window)", zoo.WINDOW, ("full_attention", "sliding_attention"), None),
        ("bloom (ALiBi)", None, (), "ALiBi"),
        ("mamba2 (SSM)", None, (), "linear_attention layers"),
        ("lfm2 (convolution + attention)", None, (), "conv layers"),
    ],
)
def test_attention_spec_reads_the_structure(name, window, layer_types, blocker, tiny_tokenizer):
    spec = masks.attention_spec(zoo.build_model(name, tiny_tokenizer))
    assert spec.sliding_window == window and spec.layer_types == layer_types
    assert (spec.blocker is None) if blocker is None else (blocker in spec.blocker)


def test_flash_attention_takes_one_sequence_a_row(tiny_tokenizer):
    model = zoo.build_model("llama", tiny_tokenizer)
    model.config._attn_implementation = "flash_attention_2"
    assert "takes no custom mask" in masks.attention_spec(model).blocker


def test_the_check_catches_a_window_the_mask_leaves_out(pairs, tiny_tokenizer, monkeypatch):
    model = zoo.build_model("phi3 (sliding window)", tiny_tokenizer)
    plain, shared = collate_pairs(pairs, 0, False), collate_pairs(pairs, 0, True)
    right = check_paths(model, plain, shared)
    assert right.segments and right.segment_error < 1e-4
    # A mask builder that forgets the window (what transformers does with a 4D mask) is caught.
    forgetful = masks.AttentionSpec("sdpa")
    monkeypatch.setattr(logprobs, "attention_spec", lambda m: forgetful)
    monkeypatch.setattr(masks, "attention_spec", lambda m: forgetful)
    module = CompletionLogprobs(model)
    module._spec = forgetful
    with torch.no_grad():
        off = (completion_logps(module, shared).sums.double() - own_forward_sums(model, plain)).abs().max()
    assert off > 0.5
    wrong = check_paths(model, plain, shared)
    assert not wrong.segments and wrong.segment_error == pytest.approx(float(off), rel=1e-3)
    assert "segment masks give log-probs off by" in wrong.segment_reason


def test_the_check_catches_a_head_the_name_list_misses(pairs, tiny_tokenizer, monkeypatch):
    model = zoo.build_model("falcon_h1 (SSM + attention, scaled head)", tiny_tokenizer)
    monkeypatch.setattr(logprobs, "_LOGIT_TRANSFORMS", ("final_logit_softcapping",))  # a list that misses it
    assert logprobs.split_body_and_head(model) is not None
    report = check_paths(model, collate_pairs(pairs, 0, False), collate_pairs(pairs, 0, True))
    assert not report.fast_head and report.head_error > 1.0
    assert "the chunked output head was off by" in report.head_reason
    assert not report.segments and "hybrid layers" in report.segment_reason
    summary = report.summary("the prompt once for both completions")
    assert summary.startswith("the model's own forward (the chunked output head was off by")
    # The model's own forward, chosen instead, is exact.
    with torch.no_grad():
        got = completion_logps(CompletionLogprobs(model, fast_head=False), collate_pairs(pairs, 0, False)).sums
    assert torch.allclose(got.double(), own_forward_sums(model, collate_pairs(pairs, 0, False)), atol=1e-4)


def test_packed_rows_are_checked_against_their_sequences(tiny_tokenizer):
    model = zoo.build_model("lfm2 (convolution + attention)", tiny_tokenizer)
    seqs = [TokenizedSequence(list(range(5 + k, 14 + 2 * k)), [False] * 3 + [True] * (6 + k)) for k in range(3)]
    singles = [SequenceRow(i, [s]) for i, s in enumerate(seqs)]
    packed = [SequenceRow(0, seqs)]
    report = check_paths(model, collate_sequences(singles, 0), collate_sequences(packed, 0), torch.zeros(3, dtype=torch.long))
    assert not report.segments and "conv layers" in report.segment_reason
    llama = zoo.build_model("llama", tiny_tokenizer)
    report = check_paths(llama, collate_sequences(singles, 0), collate_sequences(packed, 0), torch.zeros(3, dtype=torch.long))
    assert report.segments and report.segment_error < 1e-4


def test_moe_aux_loss_is_the_models_own(pairs, tiny_tokenizer):
    model = zoo.build_model("mixtral (MoE)", tiny_tokenizer)
    aux = router_aux(model)
    assert aux is not None and aux.coef == 0.02 and aux.num_experts == 4 and aux.top_k == 2
    assert router_aux(model, 0.0) is None and router_aux(model, 0.5).coef == 0.5
    assert router_aux(zoo.build_model("llama", tiny_tokenizer)) is None
    batch = collate_pairs(pairs, 0, False)
    scored = completion_logps(CompletionLogprobs(model, router_aux=aux), batch)
    own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    assert float(scored.aux_loss) == pytest.approx(float(own.aux_loss), rel=1e-5)
    assert float(scored.aux_loss) > 1.0  # Switch's loss is 1 at perfect balance, above it otherwise
    with torch.no_grad():  # reference and evaluation passes compute none
        assert completion_logps(CompletionLogprobs(model, router_aux=aux), batch).aux_loss is None


def test_flex_attention_block_mask_matches_the_models_own_forward(pairs, tiny_tokenizer):
    """FlexAttention's forward runs on CPU (its backward does not): the reference pass and
    evaluation use it, with a BlockMask built from the segments, windows included."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    for name in ("llama", "mistral (sliding window)"):
        model = zoo.build_model(name, tiny_tokenizer)
        own = own_forward_sums(model, collate_pairs(pairs, 0, False))
        model.config._attn_implementation = "flex_attention"
        module = CompletionLogprobs(model)
        assert masks.attention_spec(model).implementation == "flex_attention"
        with torch.no_grad():
            got = completion_logps(module, collate_pairs(pairs, 0, True)).sums.double()
        assert torch.allclose(got, own, atol=1e-4), (name, got, own)


def test_lora_defaults_work_on_every_family(tiny_tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="preftune")
    mamba = apply_lora(zoo.build_model("mamba2 (SSM)", tiny_tokenizer), r=4, alpha=8, dropout=None)
    adapted = {n.rsplit(".", 1)[-1] for n, m in mamba.named_modules() if hasattr(m, "lora_A")}
    assert adapted and not adapted & {"out_proj", "conv1d"}
    assert "LoRA: all linear layers but out_proj, which peft does not adapt on mamba2" in caplog.text
    moe = apply_lora(zoo.build_model("mixtral (MoE)", tiny_tokenizer), r=4, alpha=8, dropout=None)
    assert any("experts" in n for n, m in moe.named_modules() if hasattr(m, "lora_A"))
    assert "LoRA: lora_dropout 0 (peft adapts fused expert weights such as model.layers.0.mlp.experts" in caplog.text
    dense = apply_lora(zoo.build_model("llama", tiny_tokenizer), r=4, alpha=8, dropout=None)
    assert dense.peft_config["default"].lora_dropout == 0.05
    # An explicit setting that peft refuses stays a one-line error.
    with pytest.raises(PreftuneError, match=r"^lora_dropout: lora.ParamWrapper does not work with lora_dropout != 0\.$"):
        apply_lora(zoo.build_model("mixtral (MoE)", tiny_tokenizer), r=4, alpha=8, dropout=0.05)
    with pytest.raises(PreftuneError, match=r"^lora_target_modules: .*'out_proj' is incompatible with Mamba"):
        apply_lora(zoo.build_model("mamba2 (SSM)", tiny_tokenizer), r=4, alpha=8, dropout=0.0, target_modules=["out_proj"])

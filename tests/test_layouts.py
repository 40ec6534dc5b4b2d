"""The public preference datasets' layouts, as they are: each trains one DPO step whose log-probs
equal plain transformers on the (prompt, chosen, rejected) the layout means.

The fixtures are written from the datasets' cards (column names and types); the contents are ours.
The yardstick renders the canonical conversation with the tokenizer's own chat template and scores it
with the model's own forward, one sequence at a time.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import preftune
from preftune.cli import main
from preftune.data import RecordLayout, load_preference_data, load_unpaired_data
from preftune.errors import PreftuneError

Q1, A1, B1 = "Is the sky blue?", "Yes, the sky is blue.", "No."
Q2, A2, B2 = "Is the grass green?", "Yes, it is green.", "The grass is black."
SYS = "You are a helpful assistant."


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


# (prompt messages or text, chosen text, rejected text): what each fixture means.
CANONICAL_CHAT = [([user(Q1)], A1, B1), ([user(Q2)], A2, B2)]

ULTRAFEEDBACK = [  # HuggingFaceH4/ultrafeedback_binarized, train_prefs / test_prefs
    {"prompt": q, "prompt_id": f"id{i}", "chosen": [user(q), bot(a)], "rejected": [user(q), bot(b)],
     "messages": [user(q), bot(a)], "score_chosen": 8.0, "score_rejected": 4.5}
    for i, (q, a, b) in enumerate([(Q1, A1, B1), (Q2, A2, B2)])
]
TULU3 = [  # allenai/llama-3.1-tulu-3-8b-preference-mixture: a system turn inside the conversations
    {"id": "t0", "source": "ours", "prompt": Q1, "chosen": [system(SYS), user(Q1), bot(A1)],
     "rejected": [system(SYS), user(Q1), bot(B1)]},
    {"id": "t1", "source": "ours", "prompt": Q2, "chosen": [system(SYS), user(Q2), bot(A2)],
     "rejected": [system(SYS), user(Q2), bot(B2)]},
]
CANONICAL_TULU3 = [([system(SYS), user(Q1)], A1, B1), ([system(SYS), user(Q2)], A2, B2)]
ORPO_MIX = [  # mlabonne/orpo-dpo-mix-40k: a `question` column beside `prompt`
    {"source": "ours", "prompt": q, "question": q, "chosen": [user(q), bot(a)], "rejected": [user(q), bot(b)]}
    for q, a, b in [(Q1, A1, B1), (Q2, A2, B2)]
]
CAPYBARA = [  # argilla/distilabel-capybara-dpo-7k-binarized: multi-turn, all turns shared but the last
    {"source": "ours", "prompt": Q1,
     "chosen": [user(Q1), bot("Yes."), user("Why?"), bot(A1)],
     "rejected": [user(Q1), bot("Yes."), user("Why?"), bot(B1)], "rating_chosen": 5, "rating_rejected": 2},
]
CANONICAL_CAPYBARA = [([user(Q1), bot("Yes."), user("Why?")], A1, B1)]
ARGILLA_CLEANED = [  # argilla/ultrafeedback-binarized-preferences-cleaned: hyphenated columns
    {"source": "ours", "prompt": q, "chosen": [user(q), bot(a)], "chosen-rating": 5.0, "chosen-model": "m1",
     "rejected": [user(q), bot(b)], "rejected-rating": 2.0, "rejected-model": "m2"}
    for q, a, b in [(Q1, A1, B1), (Q2, A2, B2)]
]
ORCA = [  # Intel/orca_dpo_pairs
    {"system": SYS, "question": Q1, "chosen": A1, "rejected": B1},
    {"system": "", "question": Q2, "chosen": A2, "rejected": B2},
]
CANONICAL_ORCA = [([system(SYS), user(Q1)], A1, B1), ([user(Q2)], A2, B2)]
TRUTHY = [  # jondurbin/truthy-dpo-v0.1: a system column runs unchanged
    {"id": "x0", "source": "ours", "system": SYS, "prompt": Q1, "chosen": A1, "rejected": B1},
    {"id": "x1", "source": "ours", "system": SYS, "prompt": Q2, "chosen": A2, "rejected": B2},
]
CANONICAL_TRUTHY = [([system(SYS), user(Q1)], A1, B1), ([system(SYS), user(Q2)], A2, B2)]
SHP = [  # stanfordnlp/SHP: labels is 1 when A is preferred
    {"post_id": "p0", "domain": "askscience_train", "upvote_ratio": 0.9, "history": Q1, "c_root_id_A": "a",
     "c_root_id_B": "b", "score_A": 30, "score_B": 2, "human_ref_A": A1, "human_ref_B": B1, "labels": 1},
    {"post_id": "p1", "domain": "askscience_train", "upvote_ratio": 0.9, "history": Q2, "c_root_id_A": "c",
     "c_root_id_B": "d", "score_A": 1, "score_B": 12, "human_ref_A": B2, "human_ref_B": A2, "labels": 0},
]
SHP_COLUMNS = {"prompt": "history", "response_a": "human_ref_A", "response_b": "human_ref_B", "winner": "labels"}
HELPSTEER2 = [  # nvidia/HelpSteer2 preference: -3 (response_1 much better) .. 3 (response_2 much better)
    {"split": "train", "prompt": Q1, "response_1": A1, "response_2": B1, "preference_strength": -3},
    {"split": "train", "prompt": Q2, "response_1": B2, "response_2": A2, "preference_strength": 1},
    {"split": "train", "prompt": "A tie?", "response_1": "Maybe.", "response_2": "Perhaps.", "preference_strength": 0},
]
HELPSTEER2_COLUMNS = {"response_a": "response_1", "response_b": "response_2", "preference": "preference_strength"}
HELPSTEER3 = [  # nvidia/HelpSteer3 preference: the context is a conversation
    {"domain": "general", "language": "english", "context": [user(Q1)], "response1": A1, "response2": B1,
     "overall_preference": -2},
    {"domain": "general", "language": "english", "context": [user(Q2)], "response1": B2, "response2": A2,
     "overall_preference": 3},
]
HELPSTEER3_COLUMNS = {"prompt": "context", "response_a": "response1", "response_b": "response2", "preference": "overall_preference"}
HH_RLHF = [  # Anthropic/hh-rlhf: whole transcripts, the prompt implicit
    {"chosen": f"\n\nHuman: {Q1}\n\nAssistant: {A1}", "rejected": f"\n\nHuman: {Q1}\n\nAssistant: {B1}"},
    {"chosen": f"\n\nHuman: {Q2}\n\nAssistant: {A2}", "rejected": f"\n\nHuman: {Q2}\n\nAssistant: {B2}"},
]
CANONICAL_HH = [(f"\n\nHuman: {Q1}\n\nAssistant:", " " + A1, " " + B1), (f"\n\nHuman: {Q2}\n\nAssistant:", " " + A2, " " + B2)]

LAYOUTS = {
    "ultrafeedback": (ULTRAFEEDBACK, None, CANONICAL_CHAT),
    "tulu3": (TULU3, None, CANONICAL_TULU3),
    "orpo-dpo-mix": (ORPO_MIX, None, CANONICAL_CHAT),
    "capybara": (CAPYBARA, None, CANONICAL_CAPYBARA),
    "argilla-cleaned": (ARGILLA_CLEANED, None, CANONICAL_CHAT),
    "orca": (ORCA, {"prompt": "question", "system": "system"}, CANONICAL_ORCA),
    "truthy": (TRUTHY, None, CANONICAL_TRUTHY),
    "shp": (SHP, SHP_COLUMNS, [(Q1, A1, B1), (Q2, A2, B2)]),
    "helpsteer2": (HELPSTEER2, HELPSTEER2_COLUMNS, [(Q1, A1, B1), (Q2, A2, B2)]),
    "helpsteer3": (HELPSTEER3, HELPSTEER3_COLUMNS, CANONICAL_CHAT),
    "hh-rlhf": (HH_RLHF, None, CANONICAL_HH),
}


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def plain_logps(model, tokenizer, prompt, completion: str) -> float:
    """The yardstick: the template's own rendering (or the tokenizer's own special tokens for text),
    the completion closed by the turn end (EOS), scored by the model's own forward."""
    if isinstance(prompt, list):
        context = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        answer = tokenizer(completion + "<|im_end|>", add_special_tokens=False)["input_ids"]
    else:
        context = tokenizer(prompt)["input_ids"]
        answer = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([list(context) + answer])
    with torch.no_grad():
        logits = model(ids).logits.float().log_softmax(-1)[0]
    start = len(context)
    return sum(logits[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1]))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_public_layout_trains_on_what_it_means(tmp_path, tiny_model_dir, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows, columns, canonical = LAYOUTS[name]
    data = tmp_path / "data.jsonl"
    write_jsonl(data, rows)
    config = {
        "model_name": str(tiny_model_dir), "dataset": str(data), "output_dir": str(tmp_path / "run"),
        "lora_r": 0, "max_steps": 1, "per_device_train_batch_size": len(canonical), "eval_split": 0,
        "logging_steps": 1, "progress_bar": False, "max_seq_length": 256, "cache_dir": str(tmp_path / "cache"),
    }
    if columns:
        config["columns"] = columns
    result = preftune.train(config)
    first = result.history()[0]

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    chosen = [plain_logps(model, tokenizer, p, c) for p, c, _ in canonical]
    rejected = [plain_logps(model, tokenizer, p, r) for p, _, r in canonical]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["logps/chosen"] == pytest.approx(sum(chosen) / len(chosen), rel=1e-4)
    assert first["logps/rejected"] == pytest.approx(sum(rejected) / len(rejected), rel=1e-4)


def test_helpsteer_strength_becomes_the_margin_and_ties_are_counted(tmp_path, caplog):
    import logging
    from collections import Counter

    from preftune.data import check_data

    data = tmp_path / "hs2.jsonl"
    write_jsonl(data, HELPSTEER2)
    skipped: Counter = Counter()
    examples, errors = check_data(data, layout=RecordLayout.make(HELPSTEER2_COLUMNS), skipped=skipped)
    assert errors == [] and skipped == {"tie": 1}
    assert [e.extra["margin"] for e in examples] == [pytest.approx(2.0), pytest.approx(2 / 3)]
    assert [(e.chosen, e.rejected) for e in examples] == [(A1, B1), (A2, B2)]
    logging.getLogger("preftune").propagate = True
    with caplog.at_level(logging.INFO, logger="preftune"):
        load_preference_data(data, layout=RecordLayout.make(HELPSTEER2_COLUMNS))
    assert "hs2.jsonl: dropped 1 tie (pairwise records that prefer neither response)" in caplog.text


def test_ultrafeedback_splits_from_parquet_and_a_saved_datasetdict(tmp_path):
    import datasets

    expected = [([user(q)], [bot(a)], [bot(b)]) for q, a, b in [(Q1, A1, B1), (Q2, A2, B2)]]
    parquet = tmp_path / "train_prefs.parquet"
    datasets.Dataset.from_list(ULTRAFEEDBACK).to_parquet(str(parquet))
    folder = tmp_path / "ultrafeedback_binarized"
    datasets.DatasetDict(
        {"train_prefs": datasets.Dataset.from_list(ULTRAFEEDBACK), "test_prefs": datasets.Dataset.from_list(ULTRAFEEDBACK[:1])}
    ).save_to_disk(str(folder))
    for source, split, n in ((parquet, "train", 2), (folder, "train_prefs", 2), (folder, "test_prefs", 1)):
        examples = load_preference_data(source, split)
        assert [(e.prompt, e.chosen, e.rejected) for e in examples] == expected[:n]
        assert {e.layout for e in examples} == {"prompt-and-conversations"}
    with pytest.raises(PreftuneError, match="split 'train' not found \\(available: train_prefs, test_prefs\\)"):
        load_preference_data(folder, "train")


def test_ultrafeedback_trains_with_its_named_splits(tmp_path, tiny_model_dir):
    import datasets

    folder = tmp_path / "uf"
    datasets.DatasetDict(
        {"train_prefs": datasets.Dataset.from_list(ULTRAFEEDBACK), "test_prefs": datasets.Dataset.from_list(ULTRAFEEDBACK)}
    ).save_to_disk(str(folder))
    result = preftune.train({
        "model_name": str(tiny_model_dir), "dataset": str(folder), "dataset_split": "train_prefs",
        "eval_dataset": str(folder), "eval_dataset_split": "test_prefs", "output_dir": str(tmp_path / "run"),
        "lora_r": 0, "max_steps": 1, "per_device_train_batch_size": 2, "progress_bar": False,
        "cache_dir": str(tmp_path / "cache"),
    })
    assert result.metrics["eval_loss"] == pytest.approx(result.history()[0]["loss"], abs=0.05)


def test_a_string_prompt_that_differs_from_the_conversation_is_noted():
    from preftune.data import validate_record

    record = dict(ULTRAFEEDBACK[0], prompt="Something else entirely")
    example = validate_record("uf.jsonl:1", record)
    assert example.prompt == [user(Q1)] and example.extra["prompt_differs"] is True
    assert "prompt_differs" not in validate_record("uf.jsonl:1", ULTRAFEEDBACK[0]).extra


def test_kto_mix_and_pairs_as_unpaired_data(tmp_path):
    kto = tmp_path / "kto.jsonl"
    write_jsonl(kto, [{"prompt": [user(Q1)], "completion": [bot(A1)], "label": True},
                      {"prompt": [user(Q2)], "completion": [bot(B2)], "label": False}])
    examples = load_unpaired_data(kto)
    assert [(e.prompt, e.completion, e.label) for e in examples] == [([user(Q1)], [bot(A1)], True), ([user(Q2)], [bot(B2)], False)]
    shp = tmp_path / "shp.jsonl"
    write_jsonl(shp, SHP)
    examples = load_unpaired_data(shp, layout=RecordLayout.make(SHP_COLUMNS))
    assert [(e.prompt, e.completion, e.label) for e in examples] == [(Q1, A1, True), (Q1, B1, False), (Q2, A2, True), (Q2, B2, False)]


def test_system_prompt_gives_every_record_without_one_a_system_message():
    from preftune.data import validate_record

    layout = RecordLayout.make(None, "Be kind.")
    plain = validate_record("a:1", {"prompt": Q1, "chosen": A1, "rejected": B1}, layout)
    assert (plain.prompt, plain.chosen, plain.rejected) == ([system("Be kind."), user(Q1)], [bot(A1)], [bot(B1)])
    own = validate_record("a:2", {"prompt": [system(SYS), user(Q1)], "chosen": A1, "rejected": B1}, layout)
    assert own.prompt == [system(SYS), user(Q1)]
    field = validate_record("a:3", {"system": SYS, "prompt": Q1, "chosen": A1, "rejected": B1}, layout)
    assert field.prompt == [system(SYS), user(Q1)]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (ORCA[:1], "data.jsonl:1: no 'prompt' field and 'chosen'/'rejected' share no beginning; the record has "
                   "question, system, chosen, rejected: map them with columns: {prompt: question, system: system}"),
        (SHP[:1], "data.jsonl:1: field 'chosen' is missing; the record has history, human_ref_A, human_ref_B, labels, "
                  "post_id, domain, upvote_ratio, c_root_id_A, c_root_id_B, score_A, score_B: map them with columns: "
                  "{prompt: history, response_a: human_ref_A, response_b: human_ref_B, winner: labels}"),
        (HELPSTEER2[:1], "data.jsonl:1: field 'chosen' is missing; the record has response_1, response_2, "
                         "preference_strength, split, prompt: map them with columns: "
                         "{response_a: response_1, response_b: response_2, preference: preference_strength}"),
    ],
    ids=["orca", "shp", "helpsteer2"],
)
def test_an_unmapped_layout_names_its_fields_and_the_mapping(tmp_path, capsys, rows, message):
    data = tmp_path / "data.jsonl"
    write_jsonl(data, rows)
    assert main(["data", "check", str(data)]) == 1
    assert capsys.readouterr().err.splitlines()[0] == f"preftune: error: {message}"


def test_a_mapped_column_missing_from_a_record_is_named(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    write_jsonl(data, [ORCA[0], {"system": SYS, "query": Q2, "chosen": A2, "rejected": B2}])
    assert main(["data", "check", str(data), "--columns", "prompt=question,system=system"]) == 1
    assert capsys.readouterr().err.splitlines()[0] == (
        "preftune: error: data.jsonl:2: field 'question' (mapped to 'prompt' by columns) is missing; "
        "the record has system, query, chosen, rejected"
    )


def test_columns_in_the_config_are_checked(tmp_path):
    from preftune.config import from_dict, resolve

    with pytest.raises(PreftuneError) as info:
        from_dict({"columns": {"promt": "question"}})
    assert str(info.value) == (
        "config: columns: 'promt' is not one of preftune's fields (prompt, chosen, rejected, system, completion, label, "
        "messages, text, response_a, response_b, winner, preference, tools) (did you mean 'prompt'?)"
    )
    cfg = from_dict({"columns": {"prompt": "user-query", "response-a": "first"}})
    assert resolve(cfg).data.layout.mapping == {"prompt": "user-query", "response_a": "first"}


def test_data_check_reports_the_layout_mapping_and_a_rendered_example(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "orca.jsonl"
    write_jsonl(data, ORCA)
    assert main(["data", "check", str(data), "--columns", "prompt=question,system=system", "--model", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[:2] == [
        "layout: prompt/chosen/rejected as text with a system message (a system column or system_prompt): "
        "read as a conversation (2 records)",
        "mapping: columns: {prompt: question, system: system}",
    ]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    context = tok.apply_chat_template([system(SYS), user(Q1)], add_generation_prompt=True, tokenize=False)
    answer = "Yes, the sky is blue.<|im_end|>"
    counts = (len(tok(context, add_special_tokens=False)["input_ids"]), len(tok(answer, add_special_tokens=False)["input_ids"]))
    visible = context.replace("\n", "\\n")
    assert f"  chosen   ({counts[0]} + {counts[1]} tokens): {visible} | {answer}" in out.splitlines()


def test_ultrafeedback_named_splits_from_the_local_hub_cache(tmp_path, monkeypatch):
    """`dataset: HuggingFaceH4/ultrafeedback_binarized` with `dataset_split: train_prefs`, as the
    local HF cache holds it after one download: list-of-struct columns, named splits."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    message = [{"role": datasets.Value("string"), "content": datasets.Value("string")}]
    features = datasets.Features({
        "prompt": datasets.Value("string"), "prompt_id": datasets.Value("string"), "chosen": message,
        "rejected": message, "messages": message, "score_chosen": datasets.Value("float64"),
        "score_rejected": datasets.Value("float64"),
    })
    folder = tmp_path / "HuggingFaceH4___ultrafeedback_binarized" / "default" / "0.0.0" / "0123abcd"
    folder.mkdir(parents=True)
    info = datasets.DatasetInfo(config_name="default", dataset_name="ultrafeedback_binarized", features=features)
    info.splits = datasets.SplitDict()
    for split, rows in (("train_prefs", ULTRAFEEDBACK), ("test_prefs", ULTRAFEEDBACK[1:])):
        with ArrowWriter(path=str(folder / f"ultrafeedback_binarized-{split}.arrow"), features=features) as writer:
            for row in rows:
                writer.write(row)
            writer.finalize()
        info.splits.add(datasets.SplitInfo(split, num_examples=len(rows)))
    info.write_to_directory(str(folder))

    train = load_preference_data("HuggingFaceH4/ultrafeedback_binarized", "train_prefs")
    test = load_preference_data("HuggingFaceH4/ultrafeedback_binarized", "test_prefs")
    assert [(e.prompt, e.chosen, e.rejected) for e in train] == [([user(q)], [bot(a)], [bot(b)]) for q, a, b in [(Q1, A1, B1), (Q2, A2, B2)]]
    assert [(e.location, e.prompt) for e in test] == [("HuggingFaceH4/ultrafeedback_binarized[test_prefs]: row 1", [user(Q2)])]

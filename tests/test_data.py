"""Preference data: every source format, every validation error, implicit prompts, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.data import (
    PreferenceExample,
    check_data,
    check_records,
    load_preference_data,
    load_records,
    split_implicit_prompt,
    validate_record,
)
from preftune.errors import PreftuneError
from preftune.quality import format_report, quality_report

PAIR = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}
USER = {"role": "user", "content": "Say hi."}
HI = {"role": "assistant", "content": "Hi!"}
NO = {"role": "assistant", "content": "No."}


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(PreftuneError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------- formats


def test_jsonl_counts_blank_lines_and_keeps_extra_fields(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIR, "", "   ", {**PAIR, "score": 0.5}])
    records = load_records(path)
    assert [loc for loc, _ in records] == ["pairs.jsonl:1", "pairs.jsonl:4"]
    examples = load_preference_data(path)
    assert [(e.prompt, e.chosen, e.rejected, e.location) for e in examples] == [
        ("Say hi.", "Hi!", "No.", "pairs.jsonl:1"),
        ("Say hi.", "Hi!", "No.", "pairs.jsonl:4"),
    ]
    assert examples[0].extra == {} and examples[1].extra == {"score": 0.5}
    assert not examples[0].is_conversational


def test_json_list_and_split_or_data_objects(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps([PAIR, PAIR]))
    assert [loc for loc, _ in load_records(tmp_path / "list.json")] == [
        "list.json: record 1",
        "list.json: record 2",
    ]

    (tmp_path / "splits.json").write_text(json.dumps({"train": [PAIR], "test": [PAIR, {**PAIR, "id": 7}]}))
    test = load_preference_data(tmp_path / "splits.json", split="test")
    assert [e.location for e in test] == ["splits.json: record 1", "splits.json: record 2"]
    assert test[1].extra == {"id": 7}

    (tmp_path / "data.json").write_text(json.dumps({"data": [PAIR]}))
    assert load_records(tmp_path / "data.json") == [("data.json: record 1", PAIR)]

    (tmp_path / "bad.json").write_text(json.dumps({"rows": [PAIR]}))
    assert error_of(load_records, tmp_path / "bad.json") == (
        "bad.json: expected a list of records, or an object with a list under 'train' or 'data' "
        "(found keys: rows)"
    )
    (tmp_path / "broken.json").write_text('[\n  {"prompt": "a",\n   "chosen" "b"}\n]')
    assert error_of(load_records, tmp_path / "broken.json") == (
        "broken.json:3: invalid JSON (Expecting ':' delimiter at column 13)"
    )


def test_csv_rows_are_located_by_file_line(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text(
        'prompt,chosen,rejected,score\nHi,"Hello\nthere",Go away,1.5\n\n,Once upon a time,Nope,2\nQ,,A,3\n'
    )
    records = load_records(path)
    # the first row starts on line 2 and spans two lines; the blank line 4 is counted
    assert [loc for loc, _ in records] == ["pairs.csv:2", "pairs.csv:5", "pairs.csv:6"]
    examples, errors = check_records(records)
    assert [(e.prompt, e.chosen, e.extra) for e in examples] == [
        ("Hi", "Hello\nthere", {"score": "1.5"}),
        ("", "Once upon a time", {"score": "2"}),
    ]
    assert errors == ["pairs.csv:6: field 'chosen' is empty"]


def test_csv_row_with_wrong_cell_count(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\na,b,c\na,b\n")
    assert error_of(load_records, path) == "pairs.csv:3: row has 2 cells, the header has 3"


def test_parquet_conversational_rows(tmp_path):
    from datasets import Dataset

    rows = [
        {"prompt": [USER], "chosen": [HI], "rejected": [NO], "score": 1.0},
        # "name" exists in one message only, so the columnar format fills it with null elsewhere
        {
            "prompt": [{"role": "user", "content": "Hey", "name": "ann"}],
            "chosen": [HI],
            "rejected": [NO],
            "score": 2.0,
        },
    ]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "pairs.parquet"))
    examples = load_preference_data(tmp_path / "pairs.parquet")
    assert [e.location for e in examples] == ["pairs.parquet: row 1", "pairs.parquet: row 2"]
    assert examples[0].prompt == [USER]
    assert examples[1].prompt == [{"role": "user", "content": "Hey", "name": "ann"}]
    assert examples[0].chosen == [HI] and examples[0].rejected == [NO]
    assert examples[1].extra == {"score": 2.0}
    assert examples[0].is_conversational


def test_parquet_via_pandas_with_missing_field(tmp_path):
    import pandas as pd

    pd.DataFrame([PAIR, {"prompt": "x", "chosen": None, "rejected": "y"}]).to_parquet(tmp_path / "p.parquet")
    assert (
        error_of(load_preference_data, tmp_path / "p.parquet")
        == "p.parquet: row 2: field 'chosen' is missing"
    )


def test_saved_dataset_dict_and_dataset(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict(
        {"train": Dataset.from_list([PAIR]), "test": Dataset.from_list([PAIR, {**PAIR, "chosen": "Hello!"}])}
    ).save_to_disk(str(tmp_path / "prefs"))
    test = load_preference_data(tmp_path / "prefs", split="test")
    assert [(e.location, e.chosen) for e in test] == [
        ("prefs[test]: row 1", "Hi!"),
        ("prefs[test]: row 2", "Hello!"),
    ]
    assert len(load_preference_data(tmp_path / "prefs")) == 1
    assert error_of(load_records, tmp_path / "prefs", split="dev") == (
        f"{tmp_path / 'prefs'}: split 'dev' not found (available: train, test)"
    )

    Dataset.from_list([PAIR]).save_to_disk(str(tmp_path / "single"))
    assert load_records(tmp_path / "single") == [("single: row 1", PAIR)]

    (tmp_path / "plain").mkdir()
    assert error_of(load_records, tmp_path / "plain") == (
        f"{tmp_path / 'plain'}: a folder must be a dataset saved with datasets' save_to_disk"
    )


def test_hub_name_is_read_from_the_local_cache_only(tmp_path, monkeypatch):
    import datasets
    from datasets.arrow_writer import ArrowWriter

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    # the layout `datasets` leaves after a dataset was downloaded and prepared once
    folder = tmp_path / "tester___tiny_prefs" / "default" / "0.0.0" / "0123abcd"
    folder.mkdir(parents=True)
    with ArrowWriter(path=str(folder / "tiny_prefs-train.arrow")) as writer:
        writer.write(PAIR)
        writer.finalize()
    info = datasets.DatasetInfo(
        config_name="default",
        dataset_name="tiny_prefs",
        features=datasets.Features({k: datasets.Value("string") for k in PAIR}),
    )
    info.splits = datasets.SplitDict()
    info.splits.add(datasets.SplitInfo("train", num_examples=1))
    info.write_to_directory(str(folder))
    offline_before = datasets.config.HF_HUB_OFFLINE

    assert load_records("tester/tiny_prefs") == [("tester/tiny_prefs[train]: row 1", PAIR)]
    assert error_of(load_records, "tester/not_cached") == (
        "dataset 'tester/not_cached' is not available offline: no such file, and it is not in the local "
        "Hugging Face cache (download it once with network access, or pass a data file)"
    )
    assert offline_before == datasets.config.HF_HUB_OFFLINE  # the offline switch is undone


# ------------------------------------------------------------------------ source errors


def test_missing_file_unknown_type_and_empty_dataset(tmp_path):
    assert error_of(load_records, "x.jsonl") == "data file not found: x.jsonl"
    assert error_of(load_records, "./data/train") == "data file not found: ./data/train"
    (tmp_path / "notes.txt").write_text("hi")
    assert error_of(load_records, tmp_path / "notes.txt") == (
        f"unsupported data file type '.txt': {tmp_path / 'notes.txt'} "
        "(expected .csv, .json, .jsonl, .ndjson, .parquet, or a folder saved with datasets' save_to_disk)"
    )
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    assert error_of(load_preference_data, empty) == f"no records in {empty}: the dataset is empty"
    (tmp_path / "empty.json").write_text("[]")
    assert (
        error_of(load_records, tmp_path / "empty.json")
        == f"no records in {tmp_path / 'empty.json'}: the dataset is empty"
    )
    (tmp_path / "header.csv").write_text("prompt,chosen,rejected\n")
    assert (
        error_of(load_records, tmp_path / "header.csv")
        == f"no records in {tmp_path / 'header.csv'}: the dataset is empty"
    )


def test_invalid_json_line_and_error_collection(tmp_path):
    bad_line = '{"prompt": "a" "chosen": "b"}'  # column 16 is where the comma is missing
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [PAIR, {"prompt": "x", "rejected": "y"}, bad_line, [1, 2], {**PAIR, "rejected": 3}, '"text"'],
    )
    expected = [
        "pairs.jsonl:2: field 'chosen' is missing",
        "pairs.jsonl:3: invalid JSON (Expecting ',' delimiter at column 16)",
        "pairs.jsonl:4: record must be an object with fields prompt/chosen/rejected, got list",
        "pairs.jsonl:5: field 'rejected' must be a string or a list of messages, got int",
        "pairs.jsonl:6: record must be an object with fields prompt/chosen/rejected, got str",
    ]
    examples, errors = check_data(path)
    assert [e.location for e in examples] == ["pairs.jsonl:1"]
    assert errors == expected
    assert error_of(load_preference_data, path) == expected[0] + " (and 4 more invalid records)"
    # without an error list, the unparseable line stops loading; with one, it is collected
    assert error_of(load_records, path) == expected[1]
    collected: list[str] = []
    records = load_records(path, errors=collected)
    assert [loc for loc, _ in records] == [
        "pairs.jsonl:1",
        "pairs.jsonl:2",
        "pairs.jsonl:4",
        "pairs.jsonl:5",
        "pairs.jsonl:6",
    ]
    assert collected == [expected[1]]
    assert check_records(records)[1] == expected[:1] + expected[2:]


def test_invalid_utf8_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(json.dumps(PAIR).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    assert error_of(load_records, path) == "pairs.jsonl:2: not valid UTF-8 (byte 13 of the line)"


def test_one_more_invalid_record_is_singular(tmp_path):
    path = write_jsonl(
        tmp_path / "pairs.jsonl", [{"prompt": "a"}, {"chosen": "b", "rejected": 1, "prompt": "p"}]
    )
    assert error_of(load_preference_data, path) == (
        "pairs.jsonl:1: field 'chosen' is missing (and 1 more invalid record)"
    )


# --------------------------------------------------------------------- record validation


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "p", "rejected": "r"}, "field 'chosen' is missing"),
        ({"prompt": "p", "chosen": "c", "rejected": None}, "field 'rejected' is missing"),
        (
            {"prompt": 5, "chosen": "c", "rejected": "r"},
            "field 'prompt' must be a string or a list of messages, got int",
        ),
        (
            {"prompt": "p", "chosen": {"text": "c"}, "rejected": "r"},
            "field 'chosen' must be a string or a list of messages, got dict",
        ),
        ({"prompt": "p", "chosen": "", "rejected": "r"}, "field 'chosen' is empty"),
        ({"prompt": "p", "chosen": "c", "rejected": " \n"}, "field 'rejected' is empty"),
        ({"prompt": [USER], "chosen": [], "rejected": [NO]}, "field 'chosen' is empty"),
        (
            {"prompt": [USER], "chosen": [HI], "rejected": [{"role": "assistant", "content": ""}]},
            "field 'rejected' is empty",
        ),
        (
            {"prompt": [USER], "chosen": [{"content": "Hi!"}], "rejected": [NO]},
            "field 'chosen[0]' message needs 'role' and 'content'",
        ),
        (
            {"prompt": [USER, "hello"], "chosen": [HI], "rejected": [NO]},
            "field 'prompt[1]' must be a message object, got str",
        ),
        (
            {"prompt": [{"role": "user", "content": 3}], "chosen": [HI], "rejected": [NO]},
            "field 'prompt[0].content' must be a string, got int",
        ),
        (
            {"prompt": [{"role": " ", "content": "x"}], "chosen": [HI], "rejected": [NO]},
            "field 'prompt[0].role' is empty",
        ),
        (
            {"prompt": [USER], "chosen": [HI], "rejected": [USER]},
            "field 'rejected[0]' must be an assistant message, got role 'user'",
        ),
        (
            {"prompt": "Say hi.", "chosen": [HI], "rejected": "No."},
            "field 'prompt' must be a list of messages when 'chosen' is one, got a string",
        ),
        (
            {"chosen": [USER, HI], "rejected": "Say hi. No."},
            "fields 'chosen' and 'rejected' must both be strings or both lists of messages",
        ),
        ("just text", "record must be an object with fields prompt/chosen/rejected, got str"),
    ],
)
def test_validation_errors_name_location_and_field(record, message):
    assert error_of(validate_record, "pairs.jsonl:7", record) == f"pairs.jsonl:7: {message}"


def test_empty_prompt_is_allowed_for_continuation_data():
    example = validate_record("a.jsonl:1", {"prompt": "", "chosen": "Once upon", "rejected": "Nope"})
    assert example.prompt == ""
    assert quality_report([example])["empty_prompts"] == 1


def test_string_answers_to_a_conversation_become_assistant_messages():
    example = validate_record("a.jsonl:1", {"prompt": [USER], "chosen": "Hi!", "rejected": [NO]})
    assert example.prompt == [USER]
    assert example.chosen == [HI] and example.rejected == [NO]
    assert example.is_conversational


def test_empty_message_list_prompt_is_an_empty_prompt():
    example = validate_record("a.jsonl:1", {"prompt": [], "chosen": [HI], "rejected": [NO]})
    assert example.prompt == [] and quality_report([example])["empty_prompts"] == 1


# ----------------------------------------------------------------------- implicit prompt


def test_implicit_prompt_splits_at_a_word_boundary():
    assert split_implicit_prompt("The sky is blue.", "The sky is black.") == (
        "The sky is",
        " blue.",
        " black.",
    )
    # a run of whitespace goes with the completions, so the prompt ends on a word
    assert split_implicit_prompt("Q: 2+2?\n\nA: 4", "Q: 2+2?\n\nA: 5") == ("Q: 2+2?\n\nA:", " 4", " 5")
    # one completion extending the other: the split backs off so neither is empty
    assert split_implicit_prompt("The sky is blue", "The sky is blue today") == (
        "The sky is",
        " blue",
        " blue today",
    )


def test_implicit_prompt_through_a_record():
    example = validate_record(
        "a.jsonl:2", {"chosen": "The sky is blue.", "rejected": "The sky is black.", "id": 1}
    )
    assert (example.prompt, example.chosen, example.rejected, example.extra) == (
        "The sky is",
        " blue.",
        " black.",
        {"id": 1},
    )


def test_implicit_prompt_string_errors():
    assert error_of(validate_record, "a.jsonl:3", {"chosen": "Yes.", "rejected": "No."}) == (
        "a.jsonl:3: no field 'prompt', and 'chosen' and 'rejected' share no beginning to use as the prompt"
    )
    assert error_of(validate_record, "a.jsonl:4", {"chosen": "Theory", "rejected": "Thesis"}) == (
        "a.jsonl:4: no field 'prompt', and the beginning that 'chosen' and 'rejected' share (\"The\") "
        "has no whitespace boundary to split the prompt at"
    )
    # the only split point leaves 'chosen' with nothing but a space
    assert error_of(validate_record, "a.jsonl:5", {"chosen": "a b ", "rejected": "a b  c"}) == (
        "a.jsonl:5: field 'chosen' is empty"
    )


def test_implicit_prompt_for_conversations():
    system = {"role": "system", "content": "Be kind."}
    chosen = [
        system,
        USER,
        HI,
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Welcome"},
    ]
    prompt, chosen_rest, rejected_rest = split_implicit_prompt(chosen, [system, USER, NO])
    assert prompt == [system, USER]
    assert chosen_rest == chosen[2:]
    assert rejected_rest == [NO]

    example = validate_record("c.jsonl:1", {"chosen": [USER, HI], "rejected": [USER, NO]})
    assert (example.prompt, example.chosen, example.rejected) == ([USER], [HI], [NO])


def test_implicit_prompt_conversation_errors():
    assert error_of(validate_record, "c.jsonl:2", {"chosen": [HI], "rejected": [NO]}) == (
        "c.jsonl:2: no field 'prompt', and 'chosen' and 'rejected' share no leading message "
        "to use as the prompt"
    )
    assert error_of(
        validate_record, "c.jsonl:3", {"chosen": [USER, HI], "rejected": [USER, HI, USER, NO]}
    ) == (
        "c.jsonl:3: no field 'prompt', and nothing of 'chosen' remains after the messages it shares "
        "with the other completion"
    )
    # the answers differ only from a user turn on: the completions would not start with the assistant
    other = {"role": "user", "content": "Other"}
    assert error_of(
        validate_record, "c.jsonl:4", {"chosen": [USER, HI, USER, HI], "rejected": [USER, HI, other, NO]}
    ) == ("c.jsonl:4: field 'chosen[2]' must be an assistant message, got role 'user'")


# ------------------------------------------------------------------------ quality report


def make(prompt, chosen, rejected, i=0) -> PreferenceExample:
    return PreferenceExample(prompt, chosen, rejected, f"h.jsonl:{i}", {})


HAND_MADE = [
    make("the cat sat", "yes it did", "no"),
    make("the cat sat", "yes it did", "no"),  # exact duplicate of the first
    make("a dog ran", "ok", "ok"),  # tie
    make("", "hello there", "hi"),  # empty prompt
    make("the cat ran", "a b c d", "x"),
]


def test_report_numbers_in_words():
    report = quality_report(HAND_MADE)
    assert json.loads(json.dumps(report)) == report
    assert report["num_pairs"] == 5
    assert report["conversational"] == 0
    assert report["exact_duplicates"] == 1
    assert report["duplicate_prompts"] == 1 and report["unique_prompts"] == 4
    assert report["chosen_equals_rejected"] == 1
    assert report["empty_prompts"] == 1
    assert report["length_unit"] == "words"
    # prompt words [3, 3, 3, 0, 3]; chosen [3, 3, 1, 2, 4]; rejected all 1
    assert report["lengths"]["prompt"] == {
        "min": 0,
        "mean": pytest.approx(2.4),
        "median": 3,
        "p95": 3,
        "max": 3,
    }
    # p95 of sorted [1, 2, 3, 3, 4]: position 0.95 * 4 = 3.8 -> 3 + 0.8 * (4 - 3)
    assert report["lengths"]["chosen"] == {
        "min": 1,
        "mean": pytest.approx(2.6),
        "median": 3,
        "p95": pytest.approx(3.8),
        "max": 4,
    }
    assert report["lengths"]["rejected"] == {"min": 1, "mean": 1, "median": 1, "p95": 1, "max": 1}
    # chosen is longer in pairs 1, 2, 4, 5
    assert report["chosen_longer_share"] == pytest.approx(0.8)
    assert report["rejected_longer_share"] == 0
    # unique prompts "the cat sat", "a dog ran", "", "the cat ran": 9 words, 6 distinct;
    # 6 bigrams, "the cat" twice -> 5 distinct
    assert report["distinct_1"] == pytest.approx(6 / 9)
    assert report["distinct_2"] == pytest.approx(5 / 6)
    assert report["truncated_prompts"] is None and report["truncated_pairs"] is None
    assert report["warnings"] == [
        "1 pair(s) (20.0%) have chosen identical to rejected: the preference loss gets no signal from them",
        "1 exact duplicate pair(s) (20.0%): "
        "duplicates weigh those pairs more and can leak between train and eval splits",
        "chosen is longer than rejected in 80.0% of pairs (rejected longer in 0.0%): "
        "the model may learn length instead of quality",
    ]


def test_report_in_tokens_with_truncation():
    lengths = [(10, 8, 3), (10, 8, 3), (4, 2, 2), (0, 7, 1), (12, 3, 4)]
    report = quality_report(HAND_MADE, lengths=lengths, max_seq_length=15, max_prompt_length=8)
    assert report["length_unit"] == "tokens"
    # sorted prompt lengths [0, 4, 10, 10, 12]: p95 position 3.8 -> 10 + 0.8 * 2
    assert report["lengths"]["prompt"] == {
        "min": 0,
        "mean": pytest.approx(7.2),
        "median": 10,
        "p95": pytest.approx(11.6),
        "max": 12,
    }
    assert report["chosen_longer_share"] == pytest.approx(0.6)  # pairs 1, 2, 4
    assert report["truncated_prompts"] == 3  # 10, 10, 12 > 8
    # prompts cut to 8 first: 8+8, 8+8, 4+2, 0+7, 8+4 -> two pairs over 15
    assert report["truncated_pairs"] == 2
    assert not any("longer than rejected" in w for w in report["warnings"])
    assert report["warnings"][-2:] == [
        "3 prompt(s) (60.0%) exceed max_prompt_length=8",
        "2 pair(s) (40.0%) exceed max_seq_length=15: their completions will be truncated",
    ]
    # without prompt truncation the last pair (12 + 4) is over too
    assert quality_report(HAND_MADE, lengths=lengths, max_seq_length=15)["truncated_pairs"] == 3


def test_report_low_chosen_longer_share_and_conversations():
    examples = [
        make([USER], [HI], [{"role": "assistant", "content": "No thanks."}]),
        make([USER], [HI], [{"role": "assistant", "content": "Hi! Hi!"}]),
        make([USER], [HI], [HI]),
    ]
    report = quality_report(examples)
    assert report["conversational"] == 3
    assert report["chosen_equals_rejected"] == 1
    assert report["unique_prompts"] == 1 and report["duplicate_prompts"] == 2
    assert report["chosen_longer_share"] == 0
    assert report["rejected_longer_share"] == pytest.approx(2 / 3)
    assert (
        "chosen is longer than rejected in 0.0% of pairs (rejected longer in 66.7%)" in report["warnings"][-1]
    )


def test_report_of_nothing_and_bad_lengths():
    report = quality_report([])
    assert report["num_pairs"] == 0 and report["lengths"]["prompt"] is None
    assert report["warnings"] == ["no pairs"]
    with pytest.raises(ValueError):
        quality_report(HAND_MADE, lengths=[(1, 2, 3)])


def test_format_report_is_aligned_text():
    text = format_report(
        quality_report(HAND_MADE, lengths=[(10, 8, 3)] * 5, max_seq_length=15, max_prompt_length=8)
    )
    lines = text.splitlines()
    summary = lines[: lines.index("")]
    assert [" ".join(line.split()) for line in summary] == [
        "pairs 5 (0 conversational)",
        "empty prompts 1 (20.0%)",
        "exact duplicates 1 (20.0%)",
        "unique prompts 4 (1 repeated)",
        "chosen == rejected 1 (20.0%)",
        "chosen longer than rejected 100.0% of pairs",
        "prompt distinct-1/2 0.67 / 0.83",
        "prompts > 8 tokens 5 (100.0%)",
        "pairs > 15 tokens 5 (100.0%)",
    ]
    # the values start in one column, two spaces after the longest label
    column = len("chosen longer than rejected") + 2
    assert all(line[column - 1] == " " and line[column] != " " for line in summary)
    header = next(line for line in lines if line.startswith("length (tokens)"))
    assert header.split()[-5:] == ["min", "mean", "median", "p95", "max"]
    prompt_row = lines[lines.index(header) + 1]
    assert prompt_row.split() == ["prompt", "10", "10.0", "10.0", "10.0", "10"]
    assert len(prompt_row) == len(header)
    assert lines[-1].startswith("  - ")
    assert format_report(quality_report([])).splitlines()[0].split()[:2] == ["pairs", "0"]


# -- SFT and unpaired (KTO) data ------------------------------------------------------------------


def test_sft_data_in_every_shape(tmp_path):
    from preftune.data import load_sft_data

    path = tmp_path / "sft.jsonl"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    records = [
        {"prompt": "The sky is", "completion": " blue."},
        {"messages": messages},
        {"text": "I loved this movie."},
        {"prompt": "Is it good?", "chosen": " Yes.", "rejected": " No."},  # a pair: its chosen answer
        {"prompt": [{"role": "user", "content": "hi"}], "completion": "hello"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    a, b, c, d, e = load_sft_data(path)
    assert (a.kind, a.prompt, a.completion) == ("completion", "The sky is", " blue.")
    assert (b.kind, b.messages) == ("messages", messages)
    assert (c.kind, c.text) == ("text", "I loved this movie.")
    assert (d.kind, d.prompt, d.completion, d.location) == ("completion", "Is it good?", " Yes.", "sft.jsonl:4")
    assert e.completion == [{"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "p"}, "sft.jsonl:2: record needs 'prompt' and 'completion', 'messages', 'text', or a preference pair's 'chosen'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "sft.jsonl:2: field 'messages' has no assistant message to learn from"),
        ({"text": 3}, "sft.jsonl:2: field 'text' must be a string, got int"),
        ({"prompt": "p", "completion": " "}, "sft.jsonl:2: field 'completion' is empty"),
        ({"messages": [{"role": "assistant"}]}, "sft.jsonl:2: field 'messages[0]' message needs 'role' and 'content'"),
    ],
)
def test_sft_data_errors_name_line_and_field(tmp_path, record, message):
    from preftune.data import load_sft_data

    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(record) + "\n")
    assert error_of(load_sft_data, path) == message


def test_unpaired_data_and_pairs_split_in_two(tmp_path):
    from preftune.data import load_unpaired_data

    path = tmp_path / "kto.csv"
    path.write_text('prompt,completion,label\nIs it good?, Yes.,true\nIs it good?, No.,False\n')
    good, bad = load_unpaired_data(path)
    assert (good.prompt, good.completion, good.label) == ("Is it good?", " Yes.", True)
    assert (bad.completion, bad.label, bad.location) == (" No.", False, "kto.csv:3")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "chosen": " a", "rejected": " b"}) + "\n")
    assert [(e.completion, e.label) for e in load_unpaired_data(pairs)] == [(" a", True), (" b", False)]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "p", "completion": " c"}, "kto.jsonl:1: field 'label' is missing (true for a desirable completion, false for an undesirable one)"),
        ({"prompt": "p", "completion": " c", "label": 2}, "kto.jsonl:1: field 'label' must be true (desirable) or false (undesirable), got 2"),
        ({"prompt": "p", "label": True}, "kto.jsonl:1: field 'completion' is missing (KTO data is prompt/completion/label, or preference pairs)"),
        ({"prompt": "p", "chosen": " c"}, "kto.jsonl:1: field 'rejected' is missing"),
    ],
)
def test_unpaired_data_errors_name_line_and_field(tmp_path, record, message):
    from preftune.data import load_unpaired_data

    path = tmp_path / "kto.jsonl"
    path.write_text(json.dumps(record) + "\n")
    assert error_of(load_unpaired_data, path) == message

"""Prepared data: the Arrow token tables equal the plain per-record tokenization on every record
shape and chat template, are cached by fingerprint, and a killed preparation leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from chat_families import FAMILIES, family_tokenizer
from conftest import build_tiny_tokenizer
from preftune.batching import tokenize_dataset, tokenize_unpaired
from preftune.data import load_preference_data, load_sft_data, load_unpaired_data
from preftune.errors import PreftuneError
from preftune.prepared import PairItems, SequenceItems, UnpairedItems, prepare, split_rows
from preftune.sequences import tokenize_sft

SYSTEM = {"role": "system", "content": "Be brief."}
PAIRS = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " black."},
    {"prompt": [SYSTEM, {"role": "user", "content": "Hi there"}], "chosen": "Hello!", "rejected": "Go away."},
    {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Yes."}],
     "rejected": [{"role": "assistant", "content": "No, I loved this movie, it was wonderful and great."}]},
    {"chosen": "The grass is green.", "rejected": "The grass is black."},
    {"chosen": [{"role": "user", "content": "Is it?"}, {"role": "assistant", "content": "good"}],
     "rejected": [{"role": "user", "content": "Is it?"}, {"role": "assistant", "content": "bad"}]},
    {"prompt": "", "chosen": "yes", "rejected": "no"},
]
UNPAIRED = [
    {"prompt": "The sky is", "completion": " blue.", "label": True},
    {"prompt": "The sky is", "completion": " black.", "label": False},
    {"prompt": "I loved this movie,", "completion": " it was great.", "label": True},
    {"prompt": "Is it", "chosen": " good", "rejected": " bad"},
]
SFT = [
    {"prompt": "The sky is", "completion": " blue."},
    {"prompt": [SYSTEM, {"role": "user", "content": "Hi there"}], "completion": "Hello, it was wonderful and great."},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                  {"role": "user", "content": "and?"}, {"role": "assistant", "content": "good"}]},
    {"text": "I loved this movie, it was wonderful and great."},
    {"prompt": "Is it", "chosen": " good", "rejected": " bad"},
]


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tokenizers():
    yield "chatml", build_tiny_tokenizer()
    for name in FAMILIES:
        if name != "gemma-2-it.jinja":  # refuses the system message these records carry
            yield name, family_tokenizer(name)


@pytest.mark.parametrize(("name", "tokenizer"), list(tokenizers()), ids=lambda v: v if isinstance(v, str) else "")
def test_pair_tables_equal_plain_tokenization(tmp_path, name, tokenizer):
    data_file = write(tmp_path / "pairs.jsonl", PAIRS)
    data = prepare(data_file, "train", "pairs", tokenizer, cache_dir=str(tmp_path), progress=False)
    for max_seq, max_prompt in ((256, None), (12, 5)):
        items = PairItems(data, np.arange(len(data)), 0, max_seq, max_prompt)
        plain, stats = tokenize_dataset(tokenizer, load_preference_data(data_file), max_seq, max_prompt)
        assert [vars(i) for i in items] == [vars(p) for p in plain]
        assert items.summary() == (stats.summary(), stats.examples)
        assert items.lengths.tolist() == [p.num_tokens for p in plain]


def test_unpaired_and_sft_tables_equal_plain_tokenization(tmp_path):
    tok = family_tokenizer("gemma-3-it.jinja")
    unpaired = write(tmp_path / "kto.jsonl", UNPAIRED)
    data = prepare(unpaired, "train", "unpaired", tok, cache_dir=str(tmp_path), progress=False)
    rows = np.array([4, 0, 2, 1])  # a view in another order: partners are drawn within it
    items = UnpairedItems(data, rows, 3, 10, 4, seed=5)
    examples = load_unpaired_data(unpaired)
    plain, _ = tokenize_unpaired(tok, [examples[r] for r in rows], 10, 4, 5)
    assert [vars(i) for i in items] == [dict(vars(p), index=p.index + 3) for p in plain]

    sft = write(tmp_path / "sft.jsonl", SFT)
    data = prepare(sft, "train", "sft", tok, cache_dir=str(tmp_path), progress=False)
    for packing in (False, True):
        for completion_only in (True, False):
            items = SequenceItems(data, np.arange(len(data)), 0, 24, 6, completion_only, packing)
            plain, stats = tokenize_sft(tok, load_sft_data(sft), 24, 6, completion_only, packing)
            assert [(r.index, [vars(s) for s in r.sequences]) for r in items] == [
                (r.index, [vars(s) for s in r.sequences]) for r in plain
            ]
            assert items.summary() == (stats.summary(), stats.locations, stats.no_loss_tokens)


def test_several_processes_give_the_same_table(tmp_path):
    tok = build_tiny_tokenizer()
    rows = [{"prompt": f"Question {i}: is it good?", "chosen": f" yes {i}", "rejected": f" no {i % 7}"} for i in range(2500)]
    data_file = write(tmp_path / "many.jsonl", rows)
    one = prepare(data_file, "train", "pairs", tok, cache_dir=str(tmp_path / "a"), num_proc=1, progress=False)
    two = prepare(data_file, "train", "pairs", tok, cache_dir=str(tmp_path / "b"), num_proc=2, progress=False)
    assert len(list((two.folder).glob("tokens*.arrow"))) == 2
    a = PairItems(one, np.arange(len(one)), 0, 64, None)
    b = PairItems(two, np.arange(len(two)), 0, 64, None)
    assert all(vars(a[j]) == vars(b[j]) for j in range(0, 2500, 7))
    assert a.lengths.tolist() == b.lengths.tolist()


def test_the_cache_is_hit_on_a_rerun_and_missed_after_any_change(tmp_path):
    tok = build_tiny_tokenizer()
    data_file = write(tmp_path / "pairs.jsonl", PAIRS)
    first = prepare(data_file, "train", "pairs", tok, cache_dir=str(tmp_path), progress=False)
    again = prepare(data_file, "train", "pairs", tok, cache_dir=str(tmp_path), progress=False)
    assert not first.from_cache and again.from_cache and again.folder == first.folder

    # one byte of data
    data_file.write_text(data_file.read_text().replace("blue", "blur"))
    changed = prepare(data_file, "train", "pairs", tok, cache_dir=str(tmp_path), progress=False)
    assert not changed.from_cache and changed.folder != first.folder
    assert tok.decode(PairItems(changed, np.arange(1), 0, 64, None)[0].chosen_ids).startswith(" blur")

    # one byte of the chat template, and the template's arguments
    tok.chat_template = tok.chat_template.replace("<|im_start|>assistant", "<|im_start|>assistant ", 1)
    assert tok.chat_template != build_tiny_tokenizer().chat_template
    templated = prepare(data_file, "train", "pairs", tok, cache_dir=str(tmp_path), progress=False)
    assert not templated.from_cache and templated.folder not in (first.folder, changed.folder)
    from preftune import chat

    chat.configure(tok, {"flag": True})
    assert not prepare(data_file, "train", "pairs", tok, cache_dir=str(tmp_path), progress=False).from_cache

    # truncation is a view of the untruncated table: the table is reused, the ids follow the new limit
    cached = prepare(data_file, "train", "pairs", tok, cache_dir=str(tmp_path), progress=False)
    assert cached.from_cache
    short = PairItems(cached, np.arange(len(cached)), 0, 8, 3)
    plain, _ = tokenize_dataset(tok, load_preference_data(data_file), 8, 3)
    assert [vars(i) for i in short] == [vars(p) for p in plain]
    assert short.fingerprint() != PairItems(cached, np.arange(len(cached)), 0, 9, 3).fingerprint()


def test_invalid_records_are_reported_as_the_readers_report_them(tmp_path):
    tok = build_tiny_tokenizer()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PAIRS[0]) + "\n{not json\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(PreftuneError) as info:
        prepare(bad, "train", "pairs", tok, cache_dir=str(tmp_path), progress=False)
    with pytest.raises(PreftuneError) as plain:
        load_preference_data(bad)
    assert str(info.value) == str(plain.value) == (
        "bad.jsonl:2: invalid JSON (Expecting property name enclosed in double quotes at column 2) (and 1 more invalid record)"
    )
    assert not (tmp_path / "data").exists() or not [p for p in (tmp_path / "data").iterdir()]


def test_a_killed_preparation_leaves_no_entry(tmp_path):
    """SIGKILL while tokenizing: no cache entry appears, and the next run prepares the data anew."""
    rows = [{"prompt": f"Question {i}: " + "is it good? " * 20, "chosen": " yes " * 30, "rejected": " no " * 30} for i in range(40000)]
    data_file = write(tmp_path / "big.jsonl", rows)
    tok_dir = tmp_path / "tok"
    build_tiny_tokenizer().save_pretrained(tok_dir)
    script = (
        "import sys; from transformers import AutoTokenizer; from preftune.prepared import prepare\n"
        f"prepare({str(data_file)!r}, 'train', 'pairs', AutoTokenizer.from_pretrained({str(tok_dir)!r}), "
        f"cache_dir={str(tmp_path)!r}, num_proc=1, progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    root = tmp_path / "data"
    deadline = time.time() + 120
    # tokenizing has begun once the map's output file (written under a temporary name) appears
    # beside the examples file
    while time.time() < deadline and proc.poll() is None and not [
        p for p in root.glob(".tmp-*/*") if p.name not in ("examples.arrow", "manifest.json")
    ]:
        time.sleep(0.02)
    assert proc.poll() is None, "the preparation ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [p.name for p in root.iterdir() if not p.name.startswith(".tmp-")] == []

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    small = write(tmp_path / "big.jsonl", rows[:50])  # the same path, fewer records: a new entry
    data = prepare(small, "train", "pairs", tok, cache_dir=str(tmp_path), progress=False)
    assert not data.from_cache and len(data) == 50
    assert [p.name for p in root.iterdir() if p.name.startswith(".tmp-")] == []  # the dead process's work is gone


def test_split_rows_holds_out_what_split_for_eval_holds_out():
    from preftune.training.plan import split_for_eval

    for n, split in ((40, 0.1), (40, 8), (7, 0.5)):
        train, held = split_rows(n, split, seed=3)
        a, b = split_for_eval(list(range(n)), split, 3)
        assert train.tolist() == a and held.tolist() == b


def test_data_check_streams_the_same_report(tmp_path, tiny_model_dir, capsys):
    """`data check` counts one example at a time and takes token lengths from the prepared table:
    the report equals the list-based report with lengths from the per-record encoders."""
    from transformers import AutoTokenizer

    from preftune.batching import encode_completion, encode_prompt
    from preftune.cli import main
    from preftune.quality import quality_report

    rows = PAIRS + [PAIRS[0], dict(PAIRS[3], rejected=PAIRS[3]["chosen"])]  # a duplicate and a tie
    data_file = write(tmp_path / "pairs.jsonl", rows)
    assert main(["data", "check", str(data_file), "--model", str(tiny_model_dir), "--max-seq-length", "16", "--format", "json"]) == 0
    streamed = json.loads(capsys.readouterr().out)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = load_preference_data(data_file)
    lengths = [(len(encode_prompt(tok, e.prompt)), len(encode_completion(tok, e.prompt, e.chosen)),
                len(encode_completion(tok, e.prompt, e.rejected))) for e in examples]
    expected = quality_report(examples, lengths=lengths, max_seq_length=16, max_prompt_length=8)
    assert {k: streamed[k] for k in expected} == json.loads(json.dumps(expected))
    assert streamed["exact_duplicates"] == 1 and streamed["chosen_equals_rejected"] == 1 and streamed["length_unit"] == "tokens"

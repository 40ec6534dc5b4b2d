"""Sampling: prompts in, seeded and resumable samples files out, on a tiny random model."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from preftune.batching import encode_prompt
from preftune.errors import PreftuneError
from preftune.collect.generation import (
    PromptRecord,
    SamplingSettings,
    _GumbelMax,
    as_chat,
    chat_prompts,
    generate_file,
    load_generation_model,
    load_prompts,
    read_samples,
    sample_batch,
    sample_seed,
    scoring_rows,
)

TEXTS = ["The sky is", "I loved this", "good bad happy", "Question: what is", "I hated this film"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_generation_model(str(tiny_model_dir))


def prompts(texts=TEXTS) -> list[PromptRecord]:
    return [PromptRecord(i, t, f"p.txt:{i + 1}") for i, t in enumerate(texts)]


SETTINGS = SamplingSettings(num_samples=3, temperature=1.0, max_new_tokens=6, seed=7)


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_load_prompts_from_text_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  \nsecond prompt\n")
    got = load_prompts(txt)
    assert [(p.index, p.prompt, p.location) for p in got] == [(0, "first prompt", "p.txt:1"), (1, "second prompt", "p.txt:4")]

    jsonl = tmp_path / "p.jsonl"
    messages = [{"role": "user", "content": "Hi"}]
    jsonl.write_text(json.dumps({"prompt": "a", "label": "pos"}) + "\n" + json.dumps({"prompt": messages}) + "\n")
    got = load_prompts(jsonl)
    assert [(p.prompt, p.extra) for p in got] == [("a", {"label": "pos"}), (messages, {})]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a"}\n{"text": "b"}\n', "p.jsonl:2: field 'prompt' is missing"),
        ('{"prompt": "a"}\n{"prompt": "  "}\n', "p.jsonl:2: field 'prompt' is empty"),
        ('{"prompt": 3}\n', "p.jsonl:1: field 'prompt' must be a string or a list of messages, got int"),
        ('{"prompt": [{"role": "user"}]}\n', "p.jsonl:1: field 'prompt[0]' message needs 'role' and 'content'"),
    ],
)
def test_bad_prompts_name_line_and_field(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(PreftuneError) as err:
        load_prompts(path)
    assert str(err.value) == message


def test_chat_template_for_chat_models(tiny_tokenizer):
    assert as_chat("hi", tiny_tokenizer, None) == [{"role": "user", "content": "hi"}]
    assert as_chat("hi", tiny_tokenizer, False) == "hi"
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert as_chat(messages, tiny_tokenizer, False) is messages


def test_gumbel_max_draws_from_the_softmax():
    """The per-row sampler is exact: draw frequencies match softmax(logits)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    draws = Counter()
    for seed in range(4000):
        noisy = _GumbelMax([seed], torch.device("cpu"))(None, logits)
        draws[int(noisy.argmax())] += 1
    expected = torch.softmax(logits[0], -1)
    for token in range(4):
        assert abs(draws[token] / 4000 - expected[token].item()) < 0.025, (draws, expected)


def test_sample_seeds_are_stable_and_distinct():
    assert sample_seed(0, 1, 2) == sample_seed(0, 1, 2)
    seeds = {sample_seed(s, i, j) for s in range(3) for i in range(10) for j in range(4)}
    assert len(seeds) == 120


def test_greedy_matches_transformers_greedy(tiny):
    model, tokenizer = tiny
    ids = tokenizer("The sky is")["input_ids"]
    (samples,) = sample_batch(model, tokenizer, [ids], [0], SamplingSettings(num_samples=1, temperature=0, max_new_tokens=5))
    reference = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=5, pad_token_id=tokenizer.pad_token_id)
    assert samples.token_ids[0] == reference[0, len(ids) :].tolist()[: len(samples.token_ids[0])]
    assert samples.completions[0] == tokenizer.decode(samples.token_ids[0][: samples.lengths[0]], skip_special_tokens=True)


def test_same_seed_same_file_and_batch_size_does_not_matter(tiny, tmp_path):
    model, tokenizer = tiny
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    generate_file(model, tokenizer, prompts(), a, SETTINGS, model_name="tiny", batch_size=2, progress=False)
    generate_file(model, tokenizer, prompts(), b, SETTINGS, model_name="tiny", batch_size=5, progress=False)
    assert a.read_text() == b.read_text()
    other = SamplingSettings(num_samples=3, temperature=1.0, max_new_tokens=6, seed=8)
    generate_file(model, tokenizer, prompts(), c, other, model_name="tiny", batch_size=2, progress=False)
    assert [r["completions"] for r in lines(a)] != [r["completions"] for r in lines(c)]

    records = lines(a)
    assert [r["index"] for r in records] == [0, 1, 2, 3, 4]
    first = records[0]
    assert first["prompt"] == [{"role": "user", "content": "The sky is"}]
    assert len(first["completions"]) == 3 and len(first["lengths"]) == 3
    assert first["sampling"] == {"model": "tiny", "num_samples": 3, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6, "seed": 7}
    for r in records:
        for length, stopped in zip(r["lengths"], r["stopped"]):
            assert length <= 6 and (stopped or length == 6)


def test_scoring_rows_are_the_sampled_ids_beside_their_prompt(tiny, tmp_path):
    # In-memory samples equal the file's, whatever the batch width; the scoring rows are each
    # sample's prompt ids beside the very ids it generated.
    from preftune.batching import encode_prompt
    from preftune.eval.evaluation import sample_prompts
    from preftune.collect.generation import chat_prompts

    model, tokenizer = tiny
    path = tmp_path / "s.jsonl"
    generate_file(model, tokenizer, prompts(), path, SETTINGS, model_name="tiny", batch_size=2, progress=False)
    chats = chat_prompts(prompts(), tokenizer)
    samples = sample_prompts(model, tokenizer, chats, SETTINGS, rows=7, progress=False)
    assert [s.completions for s in samples] == [r["completions"] for r in lines(path)]
    prompt_rows, completion_rows = scoring_rows(tokenizer, chats, samples)
    assert len(prompt_rows) == len(completion_rows) == len(TEXTS) * 3
    assert prompt_rows[4] == encode_prompt(tokenizer, [{"role": "user", "content": TEXTS[1]}])
    assert completion_rows[4] == samples[1].token_ids[1]


def test_resume_after_interruption_gives_the_uninterrupted_file(tiny, tmp_path):
    model, tokenizer = tiny
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    generate_file(model, tokenizer, prompts(), whole, SETTINGS, model_name="tiny", batch_size=2, progress=False)

    calls = []

    def interrupted(ids, indices):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(indices)
        return sample_batch(model, tokenizer, ids, indices, SETTINGS)

    with pytest.raises(KeyboardInterrupt):
        generate_file(model, tokenizer, prompts(), resumed, SETTINGS, model_name="tiny", batch_size=2, progress=False, sampler=interrupted)
    assert [r["index"] for r in lines(resumed)] == [0, 1]
    # A run killed in the middle of a write leaves a torn last line: it is dropped and redone.
    with open(resumed, "a") as handle:
        handle.write('{"index": 2, "prompt": "good b')

    seen = []

    def counting(ids, indices):
        seen.extend(indices)
        return sample_batch(model, tokenizer, ids, indices, SETTINGS)

    summary = generate_file(model, tokenizer, prompts(), resumed, SETTINGS, model_name="tiny", batch_size=2, progress=False, sampler=counting)
    assert seen == [2, 3, 4] and summary["skipped"] == 2 and summary["samples"] == 9
    assert resumed.read_text() == whole.read_text()


def test_resume_refuses_other_settings_or_prompts(tiny, tmp_path):
    model, tokenizer = tiny
    out = tmp_path / "s.jsonl"
    generate_file(model, tokenizer, prompts()[:2], out, SETTINGS, model_name="tiny", batch_size=2, progress=False)
    hotter = SamplingSettings(num_samples=3, temperature=1.5, max_new_tokens=6, seed=7)
    with pytest.raises(PreftuneError, match=r"s.jsonl:1: written with temperature=1.0, this run asks temperature=1.5"):
        generate_file(model, tokenizer, prompts(), out, hotter, model_name="tiny", progress=False)
    with pytest.raises(PreftuneError, match=r"s.jsonl:1: prompt 0 differs from p.txt:1"):
        generate_file(model, tokenizer, prompts(["other"] + TEXTS[1:]), out, SETTINGS, model_name="tiny", progress=False)
    generate_file(model, tokenizer, prompts(), out, hotter, model_name="tiny", overwrite=True, progress=False)
    assert len(read_samples(out)) == 5


def test_bad_settings(tiny, tmp_path):
    model, tokenizer = tiny
    for settings, message in [
        (SamplingSettings(num_samples=0), "--num-samples must be a whole number >= 1"),
        (SamplingSettings(temperature=-1), "--temperature must be >= 0"),
        (SamplingSettings(top_p=0), "--top-p must be in (0, 1]"),
        (SamplingSettings(max_new_tokens=0), "--max-new-tokens must be >= 1"),
    ]:
        with pytest.raises(PreftuneError) as err:
            generate_file(model, tokenizer, prompts(), tmp_path / "x.jsonl", settings, model_name="tiny", progress=False)
        assert message in str(err.value)


def test_lora_adapter_folder_loads_on_its_base(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from preftune.models import apply_lora, load_tokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = apply_lora(base, r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    for name, param in tuned.named_parameters():
        if "lora_B" in name:
            param.data.normal_()  # a trained-looking adapter, so it changes the outputs
    folder = tmp_path / "final"
    tuned.save_pretrained(folder)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(folder)

    model, tokenizer = load_generation_model(str(folder))
    ids = torch.tensor([tokenizer("The sky is")["input_ids"]])
    with torch.no_grad():
        expected = tuned.eval()(ids).logits
        got = model(ids).logits
        with model.disable_adapter():
            plain = model(ids).logits
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, plain)


def test_several_temperatures_sample_at_each_and_say_which(tiny, tmp_path):
    model, tokenizer = tiny
    single, both = tmp_path / "single.jsonl", tmp_path / "both.jsonl"
    generate_file(model, tokenizer, prompts(), single, SETTINGS, model_name="tiny", batch_size=2, progress=False)
    summary = generate_file(
        model, tokenizer, prompts(), both, SETTINGS, model_name="tiny", batch_size=2, progress=False, temperatures=[1.0, 0.5]
    )
    assert summary["samples"] == 5 * 3 * 2
    one, two = lines(single), lines(both)
    assert "temperatures" not in one[0]  # a single temperature writes the records it always did
    for a, b in zip(one, two):
        assert b["temperatures"] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]
        assert b["sampling"] == {**a["sampling"], "temperature": [1.0, 0.5]}
        assert len(b["completions"]) == len(b["lengths"]) == len(b["stopped"]) == 6
        # The first temperature's samples are those of a run at that temperature alone.
        assert b["completions"][:3] == a["completions"] and b["lengths"][:3] == a["lengths"]
    # The second temperature's samples are seeded as samples 3, 4, 5 of each prompt.
    chats = chat_prompts(prompts(), tokenizer)
    ids = [encode_prompt(tokenizer, p.prompt) for p in chats]
    cooler = sample_batch(model, tokenizer, ids, list(range(5)), SamplingSettings(3, 0.5, 1.0, 6, 7), first_sample=3)
    assert [r["completions"][3:] for r in two] == [s.completions for s in cooler]
    # A resume with one temperature fewer is refused, naming both settings.
    with pytest.raises(PreftuneError, match=r"both.jsonl:1: written with temperature=\[1.0, 0.5\], this run asks temperature=1.0"):
        generate_file(model, tokenizer, prompts(), both, SETTINGS, model_name="tiny", progress=False)
    with pytest.raises(PreftuneError, match="--temperature: each value once, got 1 1"):
        generate_file(model, tokenizer, prompts(), both, SETTINGS, model_name="tiny", progress=False, temperatures=[1.0, 1.0])
    with pytest.raises(PreftuneError, match="--temperature must be >= 0"):
        generate_file(model, tokenizer, prompts(), both, SETTINGS, model_name="tiny", progress=False, temperatures=[1.0, -1])


def test_the_progress_bar_moves_with_every_batch(tiny, tmp_path, monkeypatch):
    """The bar counts samples (its rate is samples/s) and moves after each generate call, not
    once at the end."""
    import tqdm.auto

    model, tokenizer = tiny
    bars = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.updates = []
            bars.append(self)

        def update(self, n=1):
            self.updates.append(n)
            return super().update(n)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    seen = []

    def watching(ids, indices):
        seen.append(bars[0].n)  # where the bar stood when this call began
        return sample_batch(model, tokenizer, ids, indices, SETTINGS)

    generate_file(model, tokenizer, prompts(), tmp_path / "s.jsonl", SETTINGS, model_name="tiny", batch_size=2, progress=True, sampler=watching)
    (bar,) = bars
    assert bar.unit == "sample" and bar.total == 15
    assert seen == [0, 6, 12] and bar.updates == [6, 6, 3] and bar.n == 15
    # The transformers sampler reports samples as they end; the bar still reaches the total.
    generate_file(model, tokenizer, prompts(), tmp_path / "t.jsonl", SETTINGS, model_name="tiny", batch_size=2, progress=True)
    assert bars[1].n == 15 and sum(bars[1].updates) == 15 and len(bars[1].updates) >= 3


def test_samples_are_reported_as_they_end_within_a_generate_call(tiny_model_dir, tiny_tokenizer):
    """Greedy rows of the tiny model, with a token they draw made the EOS: each sample is reported
    at the step it draws it, the ones that run to max_new_tokens when the call returns."""
    import copy

    model, tokenizer = load_generation_model(str(tiny_model_dir))
    chats = chat_prompts(prompts(), tokenizer)
    ids = [encode_prompt(tokenizer, p.prompt) for p in chats]
    greedy = SamplingSettings(num_samples=1, temperature=0, max_new_tokens=6)
    free = sample_batch(model, tokenizer, ids, list(range(5)), greedy)
    assert not any(s.stopped[0] for s in free)
    rows = [s.token_ids[0] for s in free]
    eos = next(t for t in rows[0][1:] if t not in rows[0][:1])  # a token row 0 first draws at step >= 2
    ends = [row.index(eos) + 1 if eos in row else None for row in rows]  # the step each row draws it
    expected = [sum(1 for e in ends if e == step) for step in sorted({e for e in ends if e})]
    expected += [ends.count(None)] if None in ends else []

    tok = copy.deepcopy(tokenizer)
    tok.eos_token = tok.convert_ids_to_tokens(eos)
    model.generation_config.eos_token_id = eos
    reports = []
    samples = sample_batch(model, tok, ids, list(range(5)), greedy, on_samples=reports.append)
    print("steps at which each row draws the EOS:", ends, "reports:", reports)
    assert reports == expected and sum(reports) == 5, (ends, reports)
    assert [s.stopped[0] for s in samples] == [e is not None for e in ends]
    assert [s.lengths[0] for s in samples] == [e - 1 if e else 6 for e in ends]

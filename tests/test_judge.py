"""The pairwise judge on tiny seeded models: probabilities against the model's own forward pass and a
head whose answer preference is a known constant, both orders, determinism, rankings and pairs, eval's
judged win rate, agreement with a label store, and the one-line errors."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sqlite3
from pathlib import Path

import pytest
import torch

from preftune.cli import main
from preftune.collect.judge import DEFAULT_PROMPT, JudgePrompt, load_judge_prompt, make_judge
from preftune.collect.rewards import get_reward
from preftune.errors import PreftuneError

LOGIT_GAP = 0.8  # logit("A") - logit("B") of the constant judge, whatever it reads


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def answer_ids(tokenizer) -> tuple[int, int]:
    return tokenizer.convert_tokens_to_ids("A"), tokenizer.convert_tokens_to_ids("B")


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny random Llama whose answer rows are scaled up, so responses move P(A) visibly."""
    from conftest import build_tiny_model

    model = build_tiny_model(len(tiny_tokenizer), seed=1)
    a, b = answer_ids(tiny_tokenizer)
    with torch.no_grad():
        model.lm_head.weight[a] *= 10
        model.lm_head.weight[b] *= 10
    folder = tmp_path_factory.mktemp("judge-llama")
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def constant_judge_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Phi (its output head has a bias) whose rows for "A" and "B" are equal and whose
    biases differ by LOGIT_GAP: logit(A) - logit(B) is LOGIT_GAP at every position."""
    from transformers import AutoModelForCausalLM, CONFIG_MAPPING

    config = CONFIG_MAPPING["phi"](
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    a, b = answer_ids(tiny_tokenizer)
    with torch.no_grad():
        model.lm_head.weight[b] = model.lm_head.weight[a]
        model.lm_head.bias[a] = 0.3 + LOGIT_GAP
        model.lm_head.bias[b] = 0.3
    folder = tmp_path_factory.mktemp("judge-phi")
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@functools.lru_cache(maxsize=None)
def _loaded(folder: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def p_answer_a(folder: Path, prompt: str, a: str, b: str, template: str = DEFAULT_PROMPT) -> float:
    """By hand: the judging prompt as one unpadded chat turn, the model's own forward, and the
    softmax over the logits of "A" and "B" at the next position."""
    model, tokenizer = _loaded(str(folder))
    text = template.replace("{prompt}", prompt).replace("{response_a}", a).replace("{response_b}", b)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    with torch.no_grad():
        logits = model(**tokenizer(rendered, add_special_tokens=False, return_tensors="pt")).logits[0, -1].double()
    ia, ib = answer_ids(tokenizer)
    return 1.0 / (1.0 + math.exp(float(logits[ib] - logits[ia])))


def p_first_by_hand(folder: Path, prompt: str, first: str, second: str, template: str = DEFAULT_PROMPT) -> float:
    """P(first better): the mean of P("A") with first shown as A and P("B") with it shown as B."""
    return (p_answer_a(folder, prompt, first, second, template) + 1.0 - p_answer_a(folder, prompt, second, first, template)) / 2


def quiet(judge):
    judge.progress = False
    return judge


PROMPTS = ["The sky is", "Question: what is two plus two? Answer:", "I loved this movie"]
FIRSTS = ["blue.", "four.", "it was wonderful and great, I loved this movie, yes"]
SECONDS = ["black and awful and sad and terrible", "no", "bad"]


# --------------------------------------------------------------------------------------- probabilities


def test_a_constant_answer_preference_gives_the_hand_computed_figures(constant_judge_dir):
    judge = quiet(get_reward(f"judge:{constant_judge_dir}"))
    verdicts = judge.judge(PROMPTS, FIRSTS, SECONDS)
    p_a = 1 / (1 + math.exp(-LOGIT_GAP))  # softmax over the two answers: sigmoid of the gap
    for v in verdicts:
        assert v.p_ab == pytest.approx(p_a, abs=1e-6)  # P("A") with the first response shown as A
        assert v.p_ba == pytest.approx(1 - p_a, abs=1e-6)  # P("B") with it shown as B
        assert v.p == pytest.approx(0.5, abs=1e-6)  # a judge that only follows the position prefers neither
        assert v.orders_disagree
    stats = judge.stats.as_dict()
    assert stats == {"pairs": 3, "orders_disagree": 1.0, "mean_p_answer_a": pytest.approx(p_a, abs=1e-6)}
    assert judge.summary() == (
        f"judge:{constant_judge_dir}: 3 pairs judged in both orders; the orders picked different winners on 100.0% of "
        f"them; mean P(answer A) {p_a:.3f} (0.5 = no position bias)"
    )


def test_probabilities_are_the_models_own_softmax_over_the_answers_in_both_orders(judge_dir):
    judge = quiet(make_judge(f"judge:{judge_dir}", batch_size=4))  # 6 prompts of several lengths: padded batches
    verdicts = judge.judge(PROMPTS, FIRSTS, SECONDS)
    for v, prompt, first, second in zip(verdicts, PROMPTS, FIRSTS, SECONDS):
        assert v.p_ab == pytest.approx(p_answer_a(judge_dir, prompt, first, second), abs=1e-6)
        assert v.p_ba == pytest.approx(1 - p_answer_a(judge_dir, prompt, second, first), abs=1e-6)
        assert v.p == pytest.approx(p_first_by_hand(judge_dir, prompt, first, second), abs=1e-6)
    assert len({round(v.p, 6) for v in verdicts}) == 3  # the responses, not only the position, move it


def test_swapping_the_responses_flips_the_preference(judge_dir):
    judge = quiet(get_reward(f"judge:{judge_dir}"))
    forward = judge.judge(PROMPTS, FIRSTS, SECONDS)
    swapped = judge.judge(PROMPTS, SECONDS, FIRSTS)
    for f, s in zip(forward, swapped):
        assert s.p == pytest.approx(1 - f.p, abs=1e-6)
        assert s.p_ab == pytest.approx(1 - f.p_ba, abs=1e-6) and s.p_ba == pytest.approx(1 - f.p_ab, abs=1e-6)


def test_a_judge_run_is_deterministic(judge_dir):
    records = [{"prompt": p, "completions": [f, s, f + " yes"]} for p, f, s in zip(PROMPTS, FIRSTS, SECONDS)]
    one = get_reward(f"judge:{judge_dir}").score_records(records, progress=False)
    two = get_reward(f"judge:{judge_dir}").score_records(records, progress=False)
    assert one == two


def test_group_scores_are_mean_win_probabilities(judge_dir):
    completions = ["good, it was great.", "bad", "good, it was great.", "sad and awful"]
    matrix = quiet(get_reward(f"judge:{judge_dir}")).win_matrices(["Is it good?"], [completions])[0]
    for j in range(4):
        for k in range(4):
            if completions[j] == completions[k]:
                expected = 0.5  # the same text: the two orders are one question, not asked
            elif j < k:
                expected = p_first_by_hand(judge_dir, "Is it good?", completions[j], completions[k])
            else:
                expected = 1 - p_first_by_hand(judge_dir, "Is it good?", completions[k], completions[j])
            assert matrix[j][k] == pytest.approx(expected, abs=1e-6)
    scores = quiet(get_reward(f"judge:{judge_dir}")).score_groups(["Is it good?"], [completions])[0]
    assert scores == pytest.approx([(sum(row) - row[j]) / 3 for j, row in enumerate(matrix)], abs=1e-9)
    assert sum(scores) / 4 == pytest.approx(0.5, abs=1e-6)


# --------------------------------------------------------------------------------------- commands


def test_pairs_command_with_a_judge_pairs_by_mean_win_probability(tmp_path, judge_dir):
    records = [
        {"index": i, "prompt": p, "completions": [f, s, f"{s} {f}"], "label": i}
        for i, (p, f, s) in enumerate(zip(PROMPTS, FIRSTS, SECONDS))
    ]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "pairs.jsonl"
    assert main(["pairs", str(samples), "--reward", f"judge:{judge_dir}", "-o", str(out)]) == 0

    expected = []
    for r in records:
        c = r["completions"]
        p = {(j, k): p_first_by_hand(judge_dir, r["prompt"], c[j], c[k]) for j in range(3) for k in range(3) if j != k}
        scores = [sum(p[(j, k)] for k in range(3) if k != j) / 2 for j in range(3)]
        best, worst = max(range(3), key=lambda j: scores[j]), min(range(3), key=lambda j: scores[j])
        expected.append((c[best], c[worst], scores[best], scores[worst], p[(best, worst)]))
    got = read_jsonl(out)
    assert [(g["chosen"], g["rejected"]) for g in got] == [e[:2] for e in expected]
    for g, (_, _, chosen_score, rejected_score, judged) in zip(got, expected):
        assert g["chosen_score"] == pytest.approx(chosen_score, abs=1e-6)
        assert g["rejected_score"] == pytest.approx(rejected_score, abs=1e-6)
        assert g["judge_probability"] == pytest.approx(judged, abs=1e-6)
        assert "win_probabilities" not in g and g["label"] in (0, 1, 2)

    # `score` writes the same rankings into the samples file, the matrix beside them.
    assert main(["score", str(samples), "--reward", f"judge:{judge_dir}", "-o", str(tmp_path / "scored.jsonl")]) == 0
    scored = read_jsonl(tmp_path / "scored.jsonl")
    assert scored[0]["reward"] == f"judge:{judge_dir}"
    assert scored[0]["win_probabilities"][0][1] == pytest.approx(p_first_by_hand(judge_dir, PROMPTS[0], FIRSTS[0], SECONDS[0]), abs=1e-6)


def test_a_judge_prompt_file_replaces_the_built_in_one(tmp_path, judge_dir):
    template = "Prompt: {prompt}\nA) {response_a}\nB) {response_b}\nWhich is more positive, A or B? {not a placeholder"
    (tmp_path / "judge.txt").write_text(template)
    judge = quiet(get_reward(f"judge:{judge_dir}", judge_prompt=tmp_path / "judge.txt"))
    v = judge.judge(PROMPTS[:1], FIRSTS[:1], SECONDS[:1])[0]
    assert v.p == pytest.approx(p_first_by_hand(judge_dir, PROMPTS[0], FIRSTS[0], SECONDS[0], template), abs=1e-6)
    assert v.p != pytest.approx(p_first_by_hand(judge_dir, PROMPTS[0], FIRSTS[0], SECONDS[0]), abs=1e-6)
    # A response holding a placeholder's spelling is shown as written, not filled in.
    assert JudgePrompt(template).render("p", "{response_b}", "x").splitlines()[1] == "A) {response_b}"


@pytest.mark.parametrize(
    "text, message",
    [
        ("{prompt}\n{response_a}\n{response_c}", "judge.txt:3: unknown placeholder {response_c} (the placeholders are {prompt}, {response_a}, {response_b})"),
        ("{prompt} {response_a}", "judge.txt: no {response_b} placeholder"),
    ],
)
def test_bad_judge_prompt_files_are_one_line_errors(tmp_path, text, message):
    (tmp_path / "judge.txt").write_text(text)
    with pytest.raises(PreftuneError, match=message.replace("{", r"\{").replace("}", r"\}").replace("(", r"\(").replace(")", r"\)")):
        load_judge_prompt(tmp_path / "judge.txt")
    with pytest.raises(PreftuneError, match="file not found"):
        load_judge_prompt(tmp_path / "missing.txt")


def test_bad_judges_are_one_line_errors_without_a_traceback(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoTokenizer

    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"prompt": "p", "completions": ["a", "b"]}) + "\n")
    plain = tmp_path / "plain"  # a tokenizer without a chat template spells the answer " A": two tokens here
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    from conftest import build_tiny_model

    build_tiny_model(len(tokenizer)).save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    cases = [
        (["score", str(samples), "--reward", "judge:"], "--reward judge: names no judge model"),
        (["score", str(samples), "--reward", f"judge:{tmp_path / 'nowhere'}"], f"--reward judge:{tmp_path / 'nowhere'}: model not found"),
        (["score", str(samples), "--reward", "judge:self"], "judge:self judges with the policy being evaluated or trained"),
        (["score", str(samples), "--reward", f"judge:{plain}"], f"judge:{plain}: the tokenizer has no single token for the answer ' A' (it takes 2 tokens)"),
        (["score", str(samples), "--reward", "length", "--judge-prompt", str(samples)], "--judge-prompt is for a judge"),
        (["pairs", str(samples), "--judge-prompt", str(samples), "-o", str(tmp_path / "x.jsonl")], "--judge-prompt needs --reward judge:MODEL"),
    ]
    capsys.readouterr()
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        lines = [line for line in err.splitlines() if line.startswith("preftune:")]  # not transformers' loading bars
        assert len(lines) == 1 and lines[0].startswith(f"preftune: error: {message}"), err
        assert "Traceback" not in err


def test_a_sweep_refuses_a_judge(tmp_path):
    from preftune.eval.sweep import SweepSettings, run_sweep

    with pytest.raises(PreftuneError, match="a pairwise judge gives no reward per sample"):
        run_sweep(SweepSettings(config=str(tmp_path / "c.yaml"), grid=["beta=0.1"], prompts="p.jsonl", reward="judge:self"))


# --------------------------------------------------------------------------------------- eval


def test_eval_judged_win_rate_is_the_mean_judged_probability_over_sample_pairs(tmp_path, tiny_model_dir, judge_dir):
    from conftest import build_tiny_model
    from transformers import AutoTokenizer

    from preftune.api import evaluate

    baseline = tmp_path / "baseline"  # another seed: other samples to compare with
    build_tiny_model(len(AutoTokenizer.from_pretrained(tiny_model_dir)), seed=7).save_pretrained(baseline)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(baseline)
    prompts = ["The sky is", "I loved this movie"]
    common = dict(ref=str(tiny_model_dir), baseline=str(baseline), prompts=prompts, num_samples=2, max_new_tokens=5,
                  bootstrap=200, progress=False)
    result = evaluate(str(tiny_model_dir), reward=f"judge:{judge_dir}", output=tmp_path / "a" / "eval.json", **common)
    s = result["samples"]
    rows = read_jsonl(tmp_path / "a" / "eval_samples.jsonl")
    per_prompt, decided = [], []
    for row in rows:
        text = row["prompt"][0]["content"] if isinstance(row["prompt"], list) else row["prompt"]
        p = [[0.5 if m == b else p_first_by_hand(judge_dir, text, m, b) for b in row["baseline"]] for m in row["model"]]
        assert row["win_probabilities"] == [pytest.approx(r, abs=1e-6) for r in p]
        per_prompt.append(sum(map(sum, p)) / 4)
        decided.append(sum(1.0 if x > 0.5 else 0.5 if x == 0.5 else 0.0 for r in p for x in r) / 4)
    assert s["judged_win_rate"]["mean"] == pytest.approx(sum(per_prompt) / 2, abs=1e-6)
    assert s["judged_decisions"]["mean"] == pytest.approx(sum(decided) / 2)
    assert s["judge"]["name"] == f"judge:{judge_dir}" and s["judge"]["pairs"] == sum(
        m != b for row in rows for m in row["model"] for b in row["baseline"]
    )
    assert "reward" not in s and "win_rate" not in s  # a judge gives no pointwise reward
    from preftune.eval.evaluation import format_eval

    assert "judged win rate over baseline" in format_eval(result)

    # judge:self is the evaluated model: here the same weights as the judge folder give the same figures.
    self_run = evaluate(str(judge_dir), reward="judge:self", output=tmp_path / "b" / "eval.json", **common)
    named_run = evaluate(str(judge_dir), reward=f"judge:{judge_dir}", output=tmp_path / "c" / "eval.json", **common)
    assert self_run["samples"]["judge"]["name"] == "judge:self"
    assert self_run["samples"]["judged_win_rate"]["mean"] == pytest.approx(named_run["samples"]["judged_win_rate"]["mean"], abs=1e-9)


# --------------------------------------------------------------------------------------- label agreement


# item (prompt, first, second) -> votes in the item's order; the majority of item 4 is a tie (no label)
LABEL_ITEMS = [
    ("The sky is", "blue.", "black and awful", ["first", "first", "second"]),
    ("Is it good?", "bad", "good, it was great", ["second", "second", "second"]),
    ("I loved this movie", "it was wonderful", "terrible", ["first", "second", "first"]),
    ("Say hi", "hello", "hi thanks", ["second", "first", "second"]),
    ("Say no", "no", "yes", ["tie", "tie", "first"]),
]


def test_label_export_reports_the_judges_agreement_with_the_majority(tmp_path, judge_dir, capsys):
    from preftune.label.store import Item, LabelStore, item_id

    db = tmp_path / "labels.sqlite"
    store = LabelStore(db, annotators_per_item=3)
    store.add_items([Item(item_id(p, a, b), f"hand:{n}", p, a, b) for n, (p, a, b, _) in enumerate(LABEL_ITEMS)])
    ids = [i.id for i in store.items()]
    store.close()
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        for n, (_, _, _, votes) in enumerate(LABEL_ITEMS):
            for who, vote in zip(("ann", "bob", "cy"), votes):
                choice = {"first": "A", "second": "B", "tie": "tie"}[vote]  # shown in the item's order
                con.execute(
                    "INSERT INTO judgements (item_id, annotator, shown_left, choice, shown_at, answered_at) VALUES (?, ?, 'first', ?, 1, 2)",
                    (ids[n], who, choice),
                )
    out = tmp_path / "pairs.jsonl"
    assert main(["label", "export", "--db", str(db), "--out", str(out), "--judge", str(judge_dir)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.with_suffix(".agreement.json").read_text())["judge"]

    agreed, majority_p, disagree, p_a = 0, [], 0, []
    for prompt, first, second, votes in LABEL_ITEMS[:4]:
        winner = max(set(votes), key=votes.count)
        ab, ba = p_answer_a(judge_dir, prompt, first, second), 1 - p_answer_a(judge_dir, prompt, second, first)
        p = (ab + ba) / 2
        agreed += (p > 0.5) == (winner == "first")
        majority_p.append(p if winner == "first" else 1 - p)
        disagree += (ab > 0.5) != (ba > 0.5)
        p_a.append((ab + 1 - ba) / 2)
    assert report["compared_with_majority"] == 4
    assert report["agreement_with_majority"] == agreed / 4
    assert report["mean_p_majority"] == pytest.approx(sum(majority_p) / 4, abs=1e-6)
    assert report["orders_disagree"] == disagree / 4
    assert report["mean_p_answer_a"] == pytest.approx(sum(p_a) / 4, abs=1e-6)
    assert f"judge:{judge_dir} picks the majority's response on {agreed / 4:.3f} of 4 voted pairs" in printed
    assert "Krippendorff's alpha" in printed

"""How well does a small LLM judge agree with VADER? The embedded SmolLM2-135M-Instruct as a pairwise
judge on the bundled sentiment pairs, whose chosen response VADER scored more positive.

For a seeded draw of pairs from `resources/sentiment/test.jsonl` (VADER margin >= 0.25 by
construction) the judge gives P(chosen better), each pair asked in both orders
(`preftune.collect.judge`). Printed per judging prompt (the built-in "which is better" one, and
`benchmarks/judge_positive.txt`, which asks the task's own question, "which is more positive"):

- accuracy: the share of pairs with P(VADER's chosen better) > 0.5;
- orders disagree: the share of pairs where the two orders pick different winners;
- accuracy on the pairs where both orders agree, and how many they are;
- mean P(chosen better), and mean P(answer A) over both orders (0.5 = no position bias);
- what one order alone would have claimed: the share of pairs whose P("A") > 0.5 with VADER's chosen
  shown as A.

    python benchmarks/judge_agreement.py              # 64 pairs: ~4.5 minutes a judging prompt on 2 shared CPU cores
    python benchmarks/judge_agreement.py --pairs 125  # every test pair
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from preftune.collect.judge import load_judge_prompt, make_judge
from preftune.recipes.quickstart import bundled_data

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64, help="pairs to judge (default: 64)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="judge model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw of pairs (default: 0)")
    args = parser.parse_args()

    records = [json.loads(line) for line in Path(bundled_data("test.jsonl")).read_text().splitlines() if line.strip()]
    records = random.Random(args.seed).sample(records, min(args.pairs, len(records)))
    print(f"{len(records)} VADER pairs from test.jsonl (seed {args.seed}), judge {args.model}")
    print(f"{'judging prompt':<22}{'accuracy':>9}{'orders disagree':>17}{'acc. if consistent':>20}{'mean P(chosen)':>16}{'mean P(A)':>11}{'one order':>11}{'seconds':>9}")
    judge = None
    for label, path in (("built-in", None), ("judge_positive.txt", HERE / "judge_positive.txt")):
        spec = f"judge:{args.model}"
        if judge is None:
            judge = make_judge(spec, judge_prompt=path)
        else:  # the same loaded model, another prompt
            judge.prompt = load_judge_prompt(path)
        judge.progress = False
        started = time.perf_counter()
        verdicts = judge.judge([r["prompt"] for r in records], [r["chosen"] for r in records], [r["rejected"] for r in records])
        seconds = time.perf_counter() - started
        consistent = [v for v in verdicts if not v.orders_disagree]
        accuracy = statistics.fmean(v.p > 0.5 for v in verdicts)
        consistent_accuracy = f"{statistics.fmean(v.p > 0.5 for v in consistent):.3f} of {len(consistent)}" if consistent else "-"
        print(
            f"{label:<22}{accuracy:>9.3f}{statistics.fmean(v.orders_disagree for v in verdicts):>17.3f}{consistent_accuracy:>20}"
            f"{statistics.fmean(v.p for v in verdicts):>16.3f}{statistics.fmean(v.p_answer_a for v in verdicts):>11.3f}{statistics.fmean(v.p_ab > 0.5 for v in verdicts):>11.3f}{seconds:>9.1f}"
        )


if __name__ == "__main__":
    main()

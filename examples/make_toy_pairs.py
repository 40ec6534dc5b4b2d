"""Write `examples/data/toy_pairs.jsonl`: a small, deterministic preference set for trying the
trainer (chosen answers are polite and positive, rejected ones curt and negative).

It exists so `preftune train examples/dpo_lora.yaml` runs anywhere, offline, in about a minute on a
laptop CPU. It is a smoke test of the workflow, not a benchmark of anything.

    python examples/make_toy_pairs.py
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

QUESTIONS = [
    "How was the movie last night?",
    "What do you think of the new restaurant?",
    "Did you enjoy the concert?",
    "How is the weather today?",
    "What did you think of the book?",
    "How was your trip to the coast?",
    "Do you like the new design?",
    "How did the presentation go?",
    "What was the hotel like?",
    "How was the game on Sunday?",
    "Is the new phone any good?",
    "How was the museum?",
]
POSITIVE = ["wonderful", "great", "lovely", "delightful", "excellent", "a real pleasure"]
NEGATIVE = ["awful", "terrible", "boring", "a waste of time", "dreadful", "bad"]
DETAILS = ["the people were kind", "everything went smoothly", "I would happily go again", "it made my day"]
COMPLAINTS = ["nothing worked", "I regret it", "never again", "it ruined my day"]


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        question = QUESTIONS[i % len(QUESTIONS)]
        rows.append(
            {
                "prompt": question,
                "chosen": f"It was {rng.choice(POSITIVE)}, {rng.choice(DETAILS)}.",
                "rejected": f"It was {rng.choice(NEGATIVE)}, {rng.choice(COMPLAINTS)}.",
            }
        )
    return rows


def main() -> None:
    out = Path(__file__).parent / "data" / "toy_pairs.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(96)))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Regenerate the bundled sentiment data (`src/preftune/resources/sentiment/`) with preftune's own
commands: the controlled-sentiment task of the DPO paper (Rafailov et al. 2023, section 6.1),
built small and offline.

1. Prompts: the beginnings (4 to 8 words) of real movie-review sentences, the Pang & Lee sentence
   polarity data (200 sentences of it ship in gensim's wheel as `test_data/pang_lee_polarity.cor`),
   each wrapped in "Complete this sentence from a movie review: ...". The sentences are split by
   polarity-stratified draw into train, test and held-out prompts, so no sentence feeds two splits.
2. `preftune generate`: 4 samples per prompt from SmolLM2-135M-Instruct (temperature 0.7, at most
   48 new tokens, seed 0), through its chat template.
3. `preftune score --reward sentiment`: VADER's compound score of each completion.
4. `preftune pairs --strategy all-pairs --min-margin 0.25`: every two samples of a prompt whose
   scores differ by at least 0.25, the higher one chosen (4 samples give up to 6 pairs, as in the
   DPO paper's setup).

gensim is needed only here, to read its copy of the sentences (it is not a dependency of preftune):

    pip install gensim
    python examples/make_sentiment_data.py            # about 10 minutes on two CPU cores

Generation resumes where it stopped if interrupted (the samples live in --work).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEST = ROOT / "src" / "preftune" / "resources" / "sentiment"
INSTRUCTION = "Complete this sentence from a movie review: {prefix}"
HELDOUT_PER_LABEL = 32
TEST_PER_LABEL = 16
MODEL = "smollm2-135m-instruct"
SHORT_WORDS = 5  # a beginning of at most this many words is `short`


def polarity_file() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("gensim is needed to read the movie-review sentences: pip install gensim")
    path = Path(spec.submodule_search_locations[0]) / "test" / "test_data" / "pang_lee_polarity.cor"
    if not path.is_file():
        sys.exit(f"{path} is missing from this gensim install")
    return path


def detokenize(words: list[str]) -> str:
    """The corpus is lower-cased and tokenized ("it's so laddish , only"): rejoin punctuation and
    capitalise the first letter so the prompt reads like a sentence."""
    text = " ".join(words)
    text = re.sub(r" ([,.;:!?)](?:\s|$))", r"\1", text + " ").strip()
    text = text.replace("( ", "(").replace(" n't", "n't")
    return text[:1].upper() + text[1:]


def prefix_length(prefix: str) -> str:
    """`short` (up to 5 words) or `long`: a grouping field for `preftune eval --by prefix_length`,
    since a longer beginning commits the completion to more of the review's own sentiment."""
    return "short" if len(prefix.split()) <= SHORT_WORDS else "long"


def read_prompts(path: Path, seed: int) -> list[dict]:
    rng = random.Random(seed)
    prompts = []
    for number, line in enumerate(path.read_text(encoding="latin-1").splitlines(), start=1):
        label, _, sentence = line.partition(" ")
        words = sentence.split()
        if len(words) < 6:
            continue  # too short to leave anything to complete after a 4-word beginning
        size = rng.randint(4, min(8, len(words) - 2))
        while size > 1 and not re.search(r"[a-z0-9]", words[size - 1]):
            size -= 1  # end the beginning on a word, not on punctuation
        prefix = detokenize(words[:size])
        prompts.append(
            {
                "prompt": INSTRUCTION.format(prefix=prefix),
                "prefix": prefix,
                "label": label.removeprefix("__label__"),
                "source_line": number,
                "prefix_length": prefix_length(prefix),
            }
        )
    return prompts


def split(prompts: list[dict], seed: int) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    parts: dict[str, list[dict]] = {"train": [], "test": [], "heldout": []}
    for label in sorted({p["label"] for p in prompts}):
        group = [p for p in prompts if p["label"] == label]
        rng.shuffle(group)
        parts["heldout"] += group[:HELDOUT_PER_LABEL]
        parts["test"] += group[HELDOUT_PER_LABEL : HELDOUT_PER_LABEL + TEST_PER_LABEL]
        parts["train"] += group[HELDOUT_PER_LABEL + TEST_PER_LABEL :]
    for rows in parts.values():
        rows.sort(key=lambda p: p["source_line"])
    return parts


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def preftune(*args: str) -> None:
    command = [sys.executable, "-m", "preftune", *args]
    print("+ preftune", " ".join(args), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/sentiment-data", help="folder for prompts and samples (default: runs/sentiment-data)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    DEST.mkdir(parents=True, exist_ok=True)

    parts = split(read_prompts(polarity_file(), args.seed), args.seed)
    for name, rows in parts.items():
        write_jsonl(work / f"prompts_{name}.jsonl", rows)
        print(f"{name}: {len(rows)} prompts", flush=True)

    for name in ("train", "test"):
        samples = str(work / f"samples_{name}.jsonl")
        preftune(
            "generate", str(work / f"prompts_{name}.jsonl"), "-o", samples, "--model", MODEL,
            "--num-samples", "4", "--temperature", "0.7", "--max-new-tokens", "48", "--seed", str(args.seed),
            "--batch-size", "32",
        )  # fmt: skip
        preftune("score", samples, "--reward", "sentiment")
        preftune(
            "pairs", samples, "-o", str(work / f"pairs_{name}.jsonl"),
            "--strategy", "all-pairs", "--min-margin", "0.25",
        )  # fmt: skip
        shutil.copyfile(work / f"pairs_{name}.jsonl", DEST / f"{name}.jsonl")
    for name in ("heldout", "train"):
        shutil.copyfile(work / f"prompts_{name}.jsonl", DEST / f"prompts_{name}.jsonl")
    print(f"wrote {DEST}")


if __name__ == "__main__":
    main()

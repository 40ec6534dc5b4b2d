"""preftune from Python, as in a notebook: a model object and a `datasets.Dataset` in, a trained
model out, then its evaluation, fresh samples and the model card.

    python examples/python_api.py                      # the embedded SmolLM2-135M-Instruct
    python examples/python_api.py --model FOLDER --steps 2

On two idle CPU cores the default run takes about four minutes (the embedded model is converted
once, ~25 s, the first time). The data are the bundled movie-review sentiment pairs of `preftune
quickstart`; the reward of the fresh samples is VADER's sentiment.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics

import datasets
from transformers import AutoModelForCausalLM, AutoTokenizer

import preftune
from preftune.models import resolve_model_path
from preftune.recipes.quickstart import bundled_data


def read_pairs(name: str, n: int) -> datasets.Dataset:
    """The first `n` bundled pairs, as the `datasets.Dataset` a notebook would hold."""
    rows = [json.loads(line) for line in bundled_data(name).read_text().splitlines()[:n]]
    return datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a model folder or the embedded alias")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps (default: 12)")
    parser.add_argument("--output-dir", default="runs/python_api")
    args = parser.parse_args()
    # The library logs through `logging` and prints nothing: show its lines as a notebook would.
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")

    folder = resolve_model_path(args.model)  # the embedded alias becomes a plain model folder
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train_pairs, test_pairs = read_pairs("train.jsonl", 96), read_pairs("test.jsonl", 32)

    def show(record: dict) -> None:
        if "eval_loss" in record:
            print(f"step {record['step']}: eval loss {record['eval_loss']:.4f}, accuracy {record['eval_rewards/accuracies']:.2f}")
        else:
            print(f"step {record['step']}: loss {record['loss']:.4f}, margin {record['rewards/margins']:+.4f}")

    config = {
        "model_name": args.model,  # with a model object, only the name the run folder and model card record
        "strategy": "dpo",
        "beta": 0.1,
        "lora_r": 16,
        "lora_alpha": 32,
        "reference": "adapter",  # the base model is the adapter switched off: nothing precomputed
        "learning_rate": 5e-4,
        "max_steps": args.steps,
        "per_device_train_batch_size": 8,
        "max_seq_length": 128,
        "logging_steps": 4,
        "output_dir": args.output_dir,
        "overwrite_output_dir": True,
        "progress_bar": False,
    }
    result = preftune.train(
        config, model=model, tokenizer=tokenizer, train_dataset=train_pairs, eval_dataset=test_pairs, callbacks=[show]
    )
    print(f"trained: {type(result.model).__name__}, loss {result.metrics['loss']:.4f}, folder {result.output_dir}")

    report = preftune.evaluate(result, pairs=test_pairs, progress=False)
    accuracy = report["pairs"]["accuracy"]
    print(f"held-out preference accuracy {accuracy['mean']:.3f} (95% CI {accuracy['ci'][0]:.3f} to {accuracy['ci'][1]:.3f})")

    prompts = [
        [{"role": "user", "content": "Complete this sentence from a movie review: The plot"}],
        [{"role": "user", "content": "Complete this sentence from a movie review: Its actors"}],
    ]
    samples = preftune.generate(result.model, prompts, tokenizer=result.tokenizer, num_samples=2, max_new_tokens=24, progress=False)
    scored = preftune.score(samples, "sentiment", progress=False)
    print(f"mean sentiment of fresh samples: {statistics.fmean(s for r in scored for s in r['scores']):+.3f}")
    print(scored[0]["completions"][0])

    card = (result.output_dir / "final" / "README.md").read_text()
    print("\n".join(card.splitlines()[:12]))


if __name__ == "__main__":
    main()

"""Data at scale: time to the first optimizer step and peak memory for 10k, 100k and 1M pairs,
first run and rerun, preftune beside TRL's DPOTrainer preparing the same data with the same tokenizer.

Synthetic pairs of about 500 SmolLM2 tokens each (a ~250-token prompt, two ~125-token completions)
are trained on by a tiny random Llama (2 layers, hidden 64, SmolLM2's 49k vocabulary), so the figures
are the data path's: reading, validating, tokenizing, batching. Both tools run a full fine-tune
with a frozen copy as reference (no reference pass), batch 4, one optimizer step, fp32, in a fresh
process each. A "first run" starts from empty caches (preftune's and `datasets`'); a "rerun" keeps
the caches the first run left.

Reported: seconds from the start of the worker to the end of the first optimizer step, peak RSS of
the main process and of its worker processes (tokenization on several processes), and the growth of
the main process's peak per pair (KB) between sizes.

    pip install trl                                  # TRL is a benchmark-only dependency
    python benchmarks/bench_data.py                   # 10k and 100k, both tools; 1M preftune only
    python benchmarks/bench_data.py --sizes 10000 --tools preftune
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()

WORDS = (
    "the a of to and in is was it for on with as at by from this that film story movie people time way "
    "good great bad long short new old first last many more most other some such only own same so than "
    "too very can will just should now plot actor scene music light city night world life love war"
).split()


def make_data(path: Path, pairs: int, seed: int = 0) -> None:
    """~500 SmolLM2 tokens a pair: a ~250-word prompt and two ~125-word completions (these words are
    one token each, with their leading space)."""
    rng = random.Random(seed)
    words = WORDS

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(max(4, int(n * rng.uniform(0.8, 1.2)))))

    with open(path, "w") as f:
        for _ in range(pairs):
            f.write(json.dumps({"prompt": text(250), "chosen": " " + text(125), "rejected": " " + text(125)}) + "\n")


def make_model(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from preftune.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def peaks() -> dict[str, float]:
    return {
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "children_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


# ---------------------------------------------------------------------------------------------
# Workers: each runs in a fresh process and prints one JSON line


def worker_preftune(args: argparse.Namespace) -> dict:
    from preftune.training.recipe import Trainer
    from preftune.config import TrainConfig, validate

    cfg = validate(TrainConfig(
        model_name=args.model, dataset=str(args.data), output_dir=str(args.out_dir), per_device_train_batch_size=4,
        max_steps=1, learning_rate=1e-6, lora_r=0, reference="copy", eval_split=0, save_steps=10**9,
        logging_steps=1, progress_bar=False, max_seq_length=1024, max_prompt_length=512, lr_scheduler_type="constant",
        warmup_ratio=0.0, seed=0, cache_dir=str(args.cache_dir),
    ))
    first_step: list[float] = []

    def callback(record: dict) -> bool:
        if not first_step:
            first_step.append(time.perf_counter() - STARTED)
        return False  # stop after the first step

    t = Trainer(cfg, callbacks=[callback])
    t.setup()
    prepared = time.perf_counter() - STARTED
    t.train()
    return {"first_step_seconds": first_step[0], "setup_seconds": prepared, **peaks()}


def worker_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    os.environ["HF_DATASETS_CACHE"] = str(args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    data = load_dataset("json", data_files=str(args.data), split="train", cache_dir=str(args.cache_dir))
    first_step: list[float] = []

    class FirstStep(TrainerCallback):
        def on_step_end(self, a, state, control, **k):
            if not first_step:
                first_step.append(time.perf_counter() - STARTED)
            control.should_training_stop = True

    config = DPOConfig(
        output_dir=str(args.out_dir), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-6, bf16=False,
        use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, max_length=1024,
        beta=0.1, loss_type="sigmoid", dataloader_num_workers=0, seed=0, gradient_checkpointing=False,
        dataset_num_proc=args.num_proc,
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[FirstStep()])
    trainer.train()
    return {"first_step_seconds": first_step[0], **peaks()}


# ---------------------------------------------------------------------------------------------


def run_worker(tool: str, data: Path, model: str, cache: Path, num_proc: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--worker", tool, "--data", str(data), "--model", model, "--out-dir", out,
               "--cache-dir", str(cache), "--num-proc", str(num_proc)]
        env = dict(os.environ, HF_DATASETS_CACHE=str(cache), TOKENIZERS_PARALLELISM="true")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--tools", default="trl,preftune")
    parser.add_argument("--trl-max", type=int, default=100000, help="largest size TRL runs at (1M would need ~27 GB)")
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", default=None, help="where data and caches go (default: a temporary folder)")
    parser.add_argument("--worker")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--model")
    parser.add_argument("--out-dir", type=Path)
    parser.add_argument("--cache-dir", type=Path)
    args = parser.parse_args()
    if args.worker:
        result = worker_preftune(args) if args.worker == "preftune" else worker_trl(args)
        print(json.dumps(result))
        return

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-data-"))
    root.mkdir(parents=True, exist_ok=True)
    model = root / "model"
    if not (model / "config.json").is_file():
        make_model(model)
    tools = args.tools.split(",")
    rows = []
    print(f"{'pairs':>9} {'tool':<9} {'run':<6} {'first step s':>13} {'peak MB':>9} {'workers MB':>11}", flush=True)
    for size in (int(s) for s in args.sizes.split(",")):
        data = root / f"pairs-{size}.jsonl"
        if not data.is_file():
            make_data(data, size)
        for tool in tools:
            if tool == "trl" and size > args.trl_max:
                continue
            cache = root / f"cache-{tool}-{size}"
            shutil.rmtree(cache, ignore_errors=True)
            for run in ("first", "rerun"):
                r = run_worker(tool, data, str(model), cache, args.num_proc)
                rows.append({"pairs": size, "tool": tool, "run": run, **r})
                if "error" in r:
                    print(f"{size:>9} {tool:<9} {run:<6} error: {r['error']}", flush=True)
                else:
                    print(f"{size:>9} {tool:<9} {run:<6} {r['first_step_seconds']:>13.1f} {r['peak_mb']:>9.0f} "
                          f"{r['children_peak_mb']:>11.0f}", flush=True)
            shutil.rmtree(cache, ignore_errors=True)
    print("\npreftune / TRL (first run):")
    for size in sorted({r["pairs"] for r in rows}):
        got = {(r["tool"], r["run"]): r for r in rows if r["pairs"] == size and "error" not in r}
        p, t = got.get(("preftune", "first")), got.get(("trl", "first"))
        if p and t:
            print(f"{size:>9} pairs: time to first step x{p['first_step_seconds'] / t['first_step_seconds']:.2f}, "
                  f"peak RSS x{p['peak_mb'] / t['peak_mb']:.2f}")
    mine = sorted((r for r in rows if r["tool"] == "preftune" and r["run"] == "first" and "error" not in r), key=lambda r: r["pairs"])
    for a, b in zip(mine, mine[1:]):
        growth = (b["peak_mb"] - a["peak_mb"]) * 1024 / (b["pairs"] - a["pairs"])
        print(f"preftune peak RSS growth {a['pairs']} -> {b['pairs']} pairs: {growth:.2f} KB a pair")
    (root / "bench_data.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""preftune vs TRL's DPOTrainer, side by side: same model, same data, same settings.

Each measurement runs in a fresh subprocess (so peak memory is that run's alone), TRL and preftune
alternately, on two synthetic datasets of the same words:

- prompt-heavy: prompts about 6x longer than the completions (long instructions or documents);
- completion-heavy: short prompts, long completions.

Settings shared by both: full fine-tune (or LoRA on all linear layers with `--lora R`), fp32 on CPU
(bf16 on GPU), gradient checkpointing off for both (TRL's own default is on) or, with
`--gradient-checkpointing`, on for both, AdamW, the same batch, the same number of steps, no
evaluation, no checkpoints, each tool's default reference handling (TRL: a frozen copy of the model
scored every step, or under LoRA the model with its adapter disabled, every step; preftune:
reference log-probs computed in one pass before training, whose time is counted in preftune's
end-to-end figure).

Reported per run: median step time (first step excluded as warm-up), real tokens/s (prompt +
chosen + rejected tokens of the pairs processed, no padding, the same count for both tools),
end-to-end tokens/s (all steps plus preftune's reference pass), peak memory (peak RSS of the process on
CPU; peak allocated CUDA memory on GPU), and the ratios preftune / TRL.

    pip install trl                      # TRL is a benchmark-only dependency
    python benchmarks/bench_vs_trl.py                       # CPU, a random-init 70M-parameter Llama
    python benchmarks/bench_vs_trl.py --lora 16             # the same with LoRA r=16
    python benchmarks/bench_vs_trl.py --device cuda --model smollm2-135m-instruct --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the a of to and in is was it for on with as at by from this that film story movie people time way "
    "good great bad long short new old first last many more most other some such only own same so than "
    "too very can will just should now plot actor scene music light city night world life love war"
).split()

SHAPES = {
    # (prompt words, completion words): about 1.3 tokens a word with the SmolLM2 tokenizer.
    "prompt-heavy": (300, 50),
    "completion-heavy": (30, 200),
}


def make_data(path: Path, shape: str, pairs: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    prompt_words, completion_words = SHAPES[shape]

    def text(n: int) -> str:
        n = max(4, int(n * rng.uniform(0.8, 1.2)))
        return " ".join(rng.choice(WORDS) for _ in range(n))

    with open(path, "w") as f:
        for _ in range(pairs):
            f.write(json.dumps({"prompt": text(prompt_words), "chosen": " " + text(completion_words),
                                "rejected": " " + text(completion_words)}) + "\n")


def make_random_model(path: Path) -> None:
    """A random-init Llama with SmolLM2's tokenizer: ~70M parameters, most of them in the
    49k-vocabulary embedding and output head, as in small real models."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from preftune.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def pair_tokens(model: str, data: Path) -> list[int]:
    """Real tokens of each pair by the scoring rule: prompt + chosen + rejected."""
    from preftune.batching import encode_completion, encode_prompt
    from preftune.data import load_preference_data
    from preftune.models import load_tokenizer

    tok = load_tokenizer(model)
    return [
        len(encode_prompt(tok, e.prompt)) + len(encode_completion(tok, e.prompt, e.chosen))
        + len(encode_completion(tok, e.prompt, e.rejected))
        for e in load_preference_data(data)
    ]


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------
# Workers: each runs in its own process and prints one JSON line


def worker_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from preftune.models import resolve_model_path

    folder = resolve_model_path(args.model)
    bf16 = args.device == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    data = load_dataset("json", data_files=str(args.data), split="train")
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    config = DPOConfig(
        output_dir=str(args.out_dir), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=1e-6, bf16=bf16, use_cpu=args.device == "cpu", report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, max_length=args.max_length, beta=0.1, loss_type="sigmoid",
        dataloader_num_workers=0, seed=0, lr_scheduler_type="constant", warmup_steps=0,
        # TRL's DPOConfig turns gradient checkpointing on by default: set it as for preftune.
        gradient_checkpointing=args.gradient_checkpointing,
    )
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        # TRL's default reference under PEFT: the same model with the adapter disabled, every step.
        peft_config = LoraConfig(r=args.lora, lora_alpha=2 * args.lora, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         callbacks=[Timer()], peft_config=peft_config)
    started = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - started
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_times": times, "total_seconds": total, "first_loss": losses[0] if losses else None,
            "peak_mb": peak_memory_mb(args.device)}


def worker_preftune(args: argparse.Namespace) -> dict:
    from preftune.training.recipe import Trainer
    from preftune.config import TrainConfig, validate

    cfg = validate(TrainConfig(
        model_name=args.model, dataset=str(args.data), output_dir=str(args.out_dir),
        per_device_train_batch_size=args.batch_size, max_steps=args.steps, learning_rate=1e-6,
        bf16=args.device == "cuda", lora_r=args.lora, lora_alpha=2 * args.lora or 32, lora_dropout=0.0,
        lora_target_modules="all-linear", eval_split=0, gradient_checkpointing=args.gradient_checkpointing,
        save_steps=10**9, logging_steps=1,
        progress_bar=False, max_seq_length=args.max_length, max_prompt_length=args.max_length - 256,
        beta=0.1, loss_type="sigmoid", lr_scheduler_type="constant", warmup_ratio=0.0, seed=0,
        cache_dir=str(args.out_dir / "cache"),
    ))
    t = Trainer(cfg)
    started = time.perf_counter()
    t.setup()
    setup_seconds = time.perf_counter() - started  # includes the one reference pass
    loop_started = time.perf_counter()
    t.train()
    total = time.perf_counter() - loop_started
    records = [json.loads(line) for line in (args.out_dir / "metrics.jsonl").read_text().splitlines()]
    return {"step_times": [r["step_seconds"] for r in records if "loss" in r], "total_seconds": total,
            "setup_seconds": setup_seconds, "reference_seconds": getattr(t, "reference_seconds", 0.0),
            "first_loss": records[0]["loss"], "peak_mb": peak_memory_mb(args.device)}


# ---------------------------------------------------------------------------------------------


def run_worker(tool: str, args: argparse.Namespace, data: Path, model: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--worker", tool, "--data", str(data), "--model", model,
               "--out-dir", out, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), "--device", args.device, "--lora", str(args.lora)]
        if args.gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{tool} worker failed:\n{done.stderr[-4000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(result: dict, tokens_per_step: float, steps: int) -> dict:
    timed = result["step_times"][1:] or result["step_times"]
    step = statistics.median(timed)
    # Every step plus the one-off reference pass (preftune); model loading and saving excluded for both.
    end_to_end = sum(result["step_times"]) + result.get("reference_seconds", 0.0)
    return {"step_s": step, "tok_s": tokens_per_step / step, "e2e_tok_s": tokens_per_step * steps / end_to_end,
            "peak_mb": result["peak_mb"], "first_loss": result["first_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=("trl", "preftune"))
    parser.add_argument("--data", type=Path)
    parser.add_argument("--out-dir", type=Path)
    parser.add_argument("--model", default="random", help="'random' (a random-init 70M Llama) or any preftune model name")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on for both tools (default: off for both)")
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank on all linear layers; 0: full fine-tune")
    parser.add_argument("--datasets", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=1, help="alternate TRL/preftune this many times per dataset")
    args = parser.parse_args()

    if args.worker:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        result = (worker_trl if args.worker == "trl" else worker_preftune)(args)
        print(json.dumps(result))
        return

    work = Path(tempfile.mkdtemp(prefix="bench-"))
    model = args.model
    if model == "random":
        model = str(work / "random-llama")
        make_random_model(Path(model))
    import torch

    print(f"model: {args.model} | device: {args.device} ({torch.get_num_threads()} threads) | batch {args.batch_size} "
          f"| {args.steps} steps | {f'LoRA r={args.lora}' if args.lora else 'full fine-tune'} "
          f"| {'bf16' if args.device == 'cuda' else 'fp32'} | gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}")
    header = f"{'dataset':<17} {'tool':<9} {'step s':>8} {'tok/s':>9} {'e2e tok/s':>10} {'peak MB':>9} {'loss@1':>8}"
    rows, ratios = [], []
    for shape in args.datasets:
        data = work / f"{shape}.jsonl"
        make_data(data, shape, pairs=args.batch_size * args.steps)
        tokens = pair_tokens(model, data)
        tokens_per_step = sum(tokens) / args.steps
        results: dict[str, list[dict]] = {"trl": [], "preftune": []}
        for _ in range(args.repeats):
            for tool in ("trl", "preftune"):
                results[tool].append(summarise(run_worker(tool, args, data, model), tokens_per_step, args.steps))
        best = {tool: min(rs, key=lambda r: r["step_s"]) for tool, rs in results.items()}
        for tool in ("trl", "preftune"):
            r = best[tool]
            rows.append(f"{shape:<17} {tool:<9} {r['step_s']:>8.3f} {r['tok_s']:>9.1f} {r['e2e_tok_s']:>10.1f} "
                        f"{r['peak_mb']:>9.0f} {r['first_loss']:>8.4f}")
        ratios.append(
            f"{shape:<17} throughput x{best['preftune']['tok_s'] / best['trl']['tok_s']:.2f} "
            f"(end-to-end x{best['preftune']['e2e_tok_s'] / best['trl']['e2e_tok_s']:.2f}), "
            f"peak memory x{best['preftune']['peak_mb'] / best['trl']['peak_mb']:.2f}  "
            f"[{sum(tokens) / len(tokens):.0f} real tokens a pair]"
        )
    print(header)
    print("\n".join(rows))
    print("preftune / TRL:")
    print("\n".join(ratios))


if __name__ == "__main__":
    main()

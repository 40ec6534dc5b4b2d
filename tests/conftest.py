"""Shared fixtures: a tiny tokenizer and a tiny random-weight Llama, built offline and seeded.

Nothing here downloads: the tokenizer is a byte-level BPE trained in a fraction of a second on a
few synthetic sentences, and the model is built from a config with random weights.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from helpers import synthetic_pairs


@pytest.fixture
def _propagate_logs():
    """The project's log lines reach pytest's capture (caplog) in the modules that use this."""
    logging.getLogger("preftune").propagate = True


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """48 synthetic pairs (`helpers.synthetic_pairs`) as JSONL."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(48)))
    return path

@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """The tests' precomputed references and converted models go to a temporary cache, not the
    user's (subprocesses inherit it through the environment). `PREFTUNE_SLOW_TESTS` runs keep the
    user's cache, so the real model is converted once, not every session."""
    if os.environ.get("PREFTUNE_SLOW_TESTS"):
        yield
        return
    old = os.environ.get("PREFTUNE_CACHE")
    os.environ["PREFTUNE_CACHE"] = str(tmp_path_factory.mktemp("preftune-cache"))
    yield
    if old is None:
        os.environ.pop("PREFTUNE_CACHE", None)
    else:
        os.environ["PREFTUNE_CACHE"] = old


CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The sky is blue. The sky is black. The grass is green.",
    "I loved this movie, it was wonderful and great.",
    "I hated this film, it was terrible and awful.",
    "good bad happy sad yes no maybe the a an of to and in is was it",
    "Question: what is two plus two? Answer: four.",
    "user assistant system hello hi thanks please",
] * 20


def build_tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer with BOS/EOS/PAD-less setup like many causal LMs (pad unset)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def build_tiny_model(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A folder that `from_pretrained` loads: tiny random Llama + the tiny tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = build_tiny_model(len(tiny_tokenizer))
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


# Debian's chromium driven by Playwright (its own browser downloads are never used).
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed"
    if not os.path.exists(CHROMIUM):
        return "Debian's chromium is not installed (apt-get install chromium)"
    return None


@pytest.fixture
def browser():
    missing = _browser_missing()
    if missing:
        if os.environ.get("PREFTUNE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"PREFTUNE_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


# A tiny preference task every test of evaluation, sweeps and reports can share.
TASK_POSITIVE = ["good", "great", "happy", "yes", "wonderful"]
TASK_NEGATIVE = ["bad", "awful", "sad", "no", "terrible"]


def task_pairs(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    return [
        {
            "prompt": f"Question: is it {rng.choice(TASK_POSITIVE + TASK_NEGATIVE)}? Answer:",
            "chosen": f" {rng.choice(TASK_POSITIVE)}, it was {rng.choice(TASK_POSITIVE)}.",
            "rejected": f" {rng.choice(TASK_NEGATIVE)}, it was {rng.choice(TASK_NEGATIVE)}.",
        }
        for _ in range(n)
    ]


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory, tiny_model_dir):
    """A two-beta sweep of LoRA runs on the tiny model, evaluated on pairs and on 4 prompts."""
    import json

    from preftune.eval.sweep import SweepSettings, run_sweep

    root = tmp_path_factory.mktemp("sweep")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task_pairs(24)))
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task_pairs(8, seed=1)))
    prompts = [{"prompt": r["prompt"]} for r in task_pairs(3, seed=2)] + [{"prompt": "Say <script>alert(1)</script> & go"}]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    (root / "config.yaml").write_text(
        f"model_name: {tiny_model_dir}\ndataset: {root / 'train.jsonl'}\noutput_dir: {root / 'sweep'}\n"
        "lora_r: 4\nlora_alpha: 8\nlearning_rate: 0.01\nmax_steps: 3\nper_device_train_batch_size: 8\n"
        "eval_split: 0\nlogging_steps: 1\nsave_steps: 2\nprogress_bar: false\n"
    )
    settings = SweepSettings(
        config=str(root / "config.yaml"),
        grid=["beta=0.1,0.5"],
        prompts=str(root / "prompts.jsonl"),
        reward="length",
        pairs=str(root / "test.jsonl"),
        num_samples=2,
        best_of=(1, 2, 4),
        max_new_tokens=6,
        progress=False,
    )
    rows = run_sweep(settings)
    return root, settings, rows

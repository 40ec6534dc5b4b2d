"""Two CPU processes through `accelerate launch` (gloo) train exactly like one process with the same
global batch: same per-step loss and final weights, metrics written once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import synthetic_pairs

CONFIG = """\
strategy: {strategy}
model_name: {model}
dataset: {data}
output_dir: {out}
max_steps: 3
per_device_train_batch_size: {batch}
gradient_accumulation_steps: 2
learning_rate: 5e-3
adam_epsilon: 1.0
lr_scheduler_type: constant
warmup_ratio: 0
logging_steps: 1
lora_r: 0
eval_split: 6
max_seq_length: 64
progress_bar: false
cache_dir: {out}-cache
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(cmd, env, timeout=300):
    """Run a launcher in its own process group; on a timeout kill the whole group, so hung worker
    processes do not outlive the test."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# DPO, and the strategies whose step is built differently: SFT normalises by trained tokens, KTO
# computes its KL reference point over the whole global batch before the micro-batches, ORPO adds
# an NLL term, and the reward model is a sequence classifier.
@pytest.mark.parametrize("strategy", ["dpo", "sft", "kto", "orpo", "reward"])
def test_two_processes_match_one(tmp_path, tiny_model_dir, strategy):
    data = tmp_path / "pairs.jsonl"
    # 30 training pairs with a global batch of 8: the last step of the epoch is short (6 pairs).
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(36, seed=5)))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}

    two = tmp_path / "two"
    (tmp_path / "two.yaml").write_text(CONFIG.format(strategy=strategy, model=tiny_model_dir, data=data, out=two, batch=2))
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", "preftune", "train", str(tmp_path / "two.yaml"),
    ]
    done = run_group(launch, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x 2 processes" in done.stderr

    one = tmp_path / "one"
    (tmp_path / "one.yaml").write_text(CONFIG.format(strategy=strategy, model=tiny_model_dir, data=data, out=one, batch=4))
    done = subprocess.run([sys.executable, "-m", "preftune", "train", str(tmp_path / "one.yaml")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = records(two), records(one)
    assert [r["step"] for r in a] == [1, 2, 3, 3]  # written once, by the main process
    for x, y in zip(a, b):
        key = "loss" if "loss" in x else "eval_loss"
        assert abs(x[key] - y[key]) < 1e-5, (x, y)
    wa = load_file(str(two / "final" / "model.safetensors"))
    wb = load_file(str(one / "final" / "model.safetensors"))
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-5), name


def test_bco_pair_with_a_short_last_step_matches_one_process(tmp_path, tiny_model_dir):
    """5 pairs, 2 processes, batch 2 x 2 accumulation: one process gets 3 pairs (two micro-batches),
    the other 2 (one). BCO's running mean is reduced once per step over the global batch, so the
    processes stay in step and the run equals one process."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(5, seed=7)))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    extra = "loss_type: bco_pair\n"

    def config(out, batch):
        text = CONFIG.format(strategy="dpo", model=tiny_model_dir, data=data, out=out, batch=batch)
        return text.replace("eval_split: 6", "eval_split: 0") + extra

    two, one = tmp_path / "two", tmp_path / "one"
    (tmp_path / "two.yaml").write_text(config(two, 2))
    (tmp_path / "one.yaml").write_text(config(one, 4))
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", "preftune", "train", str(tmp_path / "two.yaml"),
    ]
    done = run_group(launch, env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([sys.executable, "-m", "preftune", "train", str(tmp_path / "one.yaml")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = records(two), records(one)
    assert [r["step"] for r in a] == [1, 2, 3]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x, y)

"""FSDP2 (`fsdp: full_shard`) on two CPU processes (gloo): the same run as one process, sharded
checkpoints that resume exactly after SIGKILL, a consolidated `final/` that loads, two "nodes" on
loopback; and the config's one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from preftune.config import TrainConfig, validate
from preftune.errors import PreftuneError
from test_distributed import CONFIG, free_port, records, run_group
from helpers import synthetic_pairs

ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


def launch(config, port=None):
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port or free_port()), "-m", "preftune", "train", str(config),
    ]


def write(tmp_path, name, strategy, model, data, batch, extra=""):
    out = tmp_path / name
    (tmp_path / f"{name}.yaml").write_text(
        CONFIG.format(strategy=strategy, model=model, data=data, out=out, batch=batch) + extra
    )
    return tmp_path / f"{name}.yaml", out


def weights(final):
    files = sorted(final.glob("*.safetensors"))
    assert files, final
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(36, seed=5)))
    return path


@pytest.mark.parametrize("strategy, lora", [("dpo", 0), ("dpo", 4), ("sft", 0), ("kto", 0)])
def test_fsdp_two_processes_match_one(tmp_path, tiny_model_dir, data, strategy, lora):
    extra = f"lora_r: {lora}\nlora_dropout: 0.0\n" if lora else ""  # dropout draws differ by process
    two_cfg, two = write(tmp_path, "two", strategy, tiny_model_dir, data, 2, "fsdp: full_shard\n" + extra)
    done = run_group(launch(two_cfg), ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FSDP2 on a cpu mesh of 2 processes: 2 x LlamaDecoderLayer, then the root; this process holds" in done.stderr
    if strategy in ("dpo", "kto"):  # the reference pass ran sharded: each process scored its share
        assert "(2 processes, each its share)" in done.stderr

    one_cfg, one = write(tmp_path, "one", strategy, tiny_model_dir, data, 4, extra)
    done = subprocess.run([sys.executable, "-m", "preftune", "train", str(one_cfg)], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = records(two), records(one)
    assert [r["step"] for r in a] == [1, 2, 3, 3]
    for x, y in zip(a, b):
        key = "loss" if "loss" in x else "eval_loss"
        assert abs(x[key] - y[key]) < 1e-5, (x, y)
    wa, wb = weights(two / "final"), weights(one / "final")
    assert wa.keys() == wb.keys()
    for name in wb:
        assert torch.allclose(wa[name], wb[name], atol=1e-5), name
    if lora:
        assert (two / "final" / "adapter_config.json").is_file()
    else:  # the consolidated folder is a normal transformers model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(two / "final")
        assert torch.equal(model.state_dict()["model.norm.weight"], wb["model.norm.weight"])


def test_sharded_checkpoint_resumes_exactly_after_sigkill(tmp_path, tiny_model_dir, data):
    extra = "fsdp: full_shard\nsave_steps: 2\n"
    full_cfg, full = write(tmp_path, "full", "dpo", tiny_model_dir, data, 2, extra)
    killed_cfg, killed = write(tmp_path, "killed", "dpo", tiny_model_dir, data, 2, extra)
    for cfg in (full_cfg, killed_cfg):
        cfg.write_text(cfg.read_text().replace("max_steps: 3", "max_steps: 6"))
    done = run_group(launch(full_cfg), ENV)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(launch(killed_cfg), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step-2" / "manifest.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "the run finished before it could be killed"
    killed_cfg.write_text(killed_cfg.read_text() + "resume_from_checkpoint: latest\n")
    done = run_group(launch(killed_cfg), ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr
    a, b = records(killed), records(full)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        key = "loss" if "loss" in x else "eval_loss"
        assert abs(x[key] - y[key]) < 1e-6, (x, y)
    wa, wb = weights(killed / "final"), weights(full / "final")
    for name in wb:
        assert torch.equal(wa[name], wb[name]), name


def test_two_nodes_on_loopback_match_one_process(tmp_path, tiny_model_dir, data):
    """Two launchers, one process each, `--nnodes 2` with ranks 0 and 1, rendezvous on 127.0.0.1:
    the multi-node command of the README, on one machine."""
    cfg, out = write(tmp_path, "nodes", "dpo", tiny_model_dir, data, 2, "fsdp: full_shard\n")
    port = free_port()

    def node(rank):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "preftune", "train", str(cfg)]
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    nodes = [node(0), node(1)]
    try:
        results = [p.communicate(timeout=300) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert all(p.returncode == 0 for p in nodes), results[0][1][-2000:] + results[1][1][-2000:]
    one_cfg, one = write(tmp_path, "one", "dpo", tiny_model_dir, data, 4)
    done = subprocess.run([sys.executable, "-m", "preftune", "train", str(one_cfg)], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for x, y in zip(records(out), records(one)):
        key = "loss" if "loss" in x else "eval_loss"
        assert abs(x[key] - y[key]) < 1e-5, (x, y)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"fsdp": "full"}, "'fsdp' must be one of"),
        ({"fsdp_config": {"cpu_offload": True}}, "'fsdp_config' needs 'fsdp': full_shard or shard_grad_op"),
        ({"fsdp": "full_shard", "fsdp_config": {"wrapp": ["LlamaDecoderLayer"]}},
         "unknown key 'fsdp_config.wrapp' (did you mean 'wrap'?)"),
        ({"fsdp": "full_shard", "fsdp_config": {"cpu_offload": "yes"}}, "'fsdp_config.cpu_offload' must be true, false or null"),
    ],
)
def test_fsdp_config_errors_are_one_line(settings, message):
    with pytest.raises(PreftuneError) as err:
        validate(TrainConfig(**settings))
    assert message in str(err.value) and "\n" not in str(err.value)

"""Memory estimates: parameter counts match the real model and PEFT, components add up by hand."""

from __future__ import annotations

import pytest

from preftune.config import TrainConfig
from preftune.estimate import GiB, estimate, largest_batch, model_shape, parse_size
from preftune.models import apply_lora, load_model


def test_counts_match_the_real_model_and_peft(tiny_model_dir):
    shape = model_shape(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    assert shape.params == sum(p.numel() for p in model.parameters()) == 39072
    assert (shape.hidden, shape.intermediate, shape.layers, shape.vocab) == (32, 64, 2, 320)
    lora = apply_lora(model, r=4, alpha=8, dropout=0.0)
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert trainable == 4 * shape.lora_params_per_rank


def test_components_by_hand(tiny_model_dir):
    shape = model_shape(str(tiny_model_dir))
    cfg = TrainConfig(max_seq_length=96, max_prompt_length=32, lora_r=4, reference="copy")
    full = estimate(shape, cfg, "full", batch_size=2, checkpointing=False, bf16=False)
    assert full["weights"] == 39072 * 4 and full["gradients"] == 39072 * 4 and full["optimizer"] == 39072 * 8
    assert full["reference"] == 39072 * 4  # a frozen fp32 copy
    tokens = 2 * (32 + 2 * 64)  # batch x (prompt + chosen + rejected budgets)
    assert full["activations"] == tokens * 2 * (10 * 32 + 4 * 64) * 4
    assert full["output head"] == min(1024, 2 * 2 * 64) * 320 * 4 * 3
    assert full["total"] == pytest.approx(sum(v for k, v in full.items() if k != "total"))
    lora = estimate(shape, cfg, "lora", batch_size=2, checkpointing=True, bf16=True)
    trainable = 4 * shape.lora_params_per_rank
    assert lora["gradients"] == trainable * 4 and lora["optimizer"] == trainable * 8
    assert lora["activations"] == tokens * 2 * 32 * 2 + tokens * (10 * 32 + 4 * 64) * 2
    assert lora["total"] < full["total"]


def test_each_strategy_has_its_own_layout(tiny_model_dir):
    shape = model_shape(str(tiny_model_dir))
    per_token = 2 * (10 * 32 + 4 * 64) * 4  # layers x per-layer values x fp32

    def parts(**keys):
        cfg = TrainConfig(max_seq_length=96, max_prompt_length=32, reference="copy", **keys)
        return estimate(shape, cfg, "full", batch_size=2, checkpointing=False, bf16=False)

    dpo, plain = parts(strategy="dpo"), parts(strategy="dpo", share_prompt=False)
    assert plain["activations"] == 2 * 2 * 96 * per_token and dpo["activations"] == 2 * (32 + 128) * per_token
    assert parts(strategy="sft")["activations"] == 2 * 96 * per_token
    assert parts(strategy="sft")["output head"] == 2 * 96 * 320 * 4 * 3
    kto = parts(strategy="kto")
    assert kto["activations"] == 2 * 96 * per_token and kto["output head"] == 2 * 64 * 320 * 4 * 3
    assert kto["reference"] == 39072 * 4  # KTO keeps its reference
    for strategy in ("sft", "orpo", "simpo", "cpo", "reward"):  # these train without one
        assert parts(strategy=strategy)["reference"] == 0, strategy
    reward = parts(strategy="reward")
    assert reward["activations"] == 2 * 2 * 96 * per_token and reward["output head"] == 0
    # The LM head (untied here: 320 x 32) gives way to a 32 -> 1 score head.
    assert shape.head_params == 320 * 32
    from preftune.models import load_reward_model

    real = load_reward_model(str(tiny_model_dir), pad_token_id=0)
    assert sum(p.numel() for p in real.parameters()) == 39072 - 320 * 32 + 32
    assert reward["weights"] == (39072 - 320 * 32 + 32) * 4


def test_fitting_and_sizes(tiny_model_dir):
    shape = model_shape(str(tiny_model_dir))
    cfg = TrainConfig(max_seq_length=96)
    assert parse_size("16GB") == 16 * GiB and parse_size("512MiB") == 512 * 2**20
    assert largest_batch(shape, cfg, "full", False, True, budget=80 * GiB) == 64
    assert largest_batch(shape, cfg, "full", False, True, budget=0.1 * GiB) == 0  # the runtime alone is 0.5 GiB


def test_fsdp_divides_the_states_and_adds_the_gathered_units(tiny_model_dir):
    shape = model_shape(str(tiny_model_dir))
    cfg = TrainConfig(max_seq_length=96, max_prompt_length=32, lora_r=0, reference="copy")
    one = estimate(shape, cfg, "full", batch_size=2, checkpointing=False, bf16=False)
    two = estimate(shape, cfg, "full", batch_size=2, checkpointing=False, bf16=False, num_processes=2)
    root = shape.vocab * shape.hidden + shape.head_params  # embeddings and the untied head
    layer = (39072 - root) / 2
    assert root == 2 * 320 * 32 and layer == 9296
    assert two["weights"] == 39072 * 4 / 2 and two["gradients"] == 39072 * 4 / 2 and two["optimizer"] == 39072 * 8 / 2
    assert two["reference"] == 39072 * 4 / 2
    assert two["gathered"] == (root + 2 * layer) * 4 + 39072 / 2 * 4
    assert two["activations"] == one["activations"] and one["gathered"] == 0
    qlora = estimate(shape, cfg, "qlora", batch_size=2, checkpointing=False, bf16=True, num_processes=2)
    assert qlora == estimate(shape, cfg, "qlora", batch_size=2, checkpointing=False, bf16=True)  # not sharded


def test_estimate_command_with_processes(tiny_model_dir, tmp_path):
    import subprocess
    import sys

    config = tmp_path / "c.yaml"
    config.write_text(f"model_name: {tiny_model_dir}\nlora_r: 0\n")
    done = subprocess.run([sys.executable, "-m", "preftune", "estimate", str(config), "--gpu-memory", "80GB",
                           "--num-processes", "8"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "FSDP2 over 8 processes (full and lora sharded, qlora per device)" in done.stdout
    assert "full   (lora_r: 0, fsdp: full_shard): per_device_train_batch_size 64" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "preftune", "estimate", str(config), "--num-processes", "0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and bad.stderr.strip() == "preftune: error: --num-processes must be >= 1, got 0"

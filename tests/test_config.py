"""Config: file formats, `--set`, typed validation, unknown keys with suggestions."""

from __future__ import annotations

import json

import pytest
import yaml

from preftune.config import TrainConfig, load_config, parse_override, to_yaml
from preftune.errors import PreftuneError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_and_json_give_the_same_config(tmp_path):
    data = {"model_name": "m", "dataset": "d.jsonl", "beta": 0.2, "lora_r": 8, "learning_rate": 1e-5}
    a = load_config(write(tmp_path, "c.yaml", yaml.safe_dump(data)))
    b = load_config(write(tmp_path, "c.json", json.dumps(data)))
    assert a == b
    assert a.beta == 0.2 and a.lora_r == 8 and a.learning_rate == 1e-5


def test_seed_style_keys_are_all_accepted(tmp_path):
    text = """
strategy: dpo
task: sentiment
model_name: smollm2-135m-instruct
dataset: pairs.jsonl
provider: transformers
num_train_epochs: 3
per_device_train_batch_size: 2
gradient_accumulation_steps: 4
learning_rate: 5e-5
lora_r: 16
lora_alpha: 32
lora_dropout: 0.05
use_4bit: false
bf16: false
max_seq_length: 512
warmup_ratio: 0.1
eval_split: 0.1
"""
    cfg = load_config(write(tmp_path, "c.yaml", text))
    # YAML 1.1 reads 5e-5 as a string; it must still be the number the user meant.
    assert cfg.learning_rate == pytest.approx(5e-5)
    assert cfg.num_train_epochs == 3.0 and isinstance(cfg.num_train_epochs, float)
    assert cfg.task == "sentiment"


def test_unknown_key_names_the_closest(tmp_path):
    path = write(tmp_path, "c.yaml", "learning_rat: 0.1\n")
    with pytest.raises(PreftuneError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: unknown key 'learning_rat' (did you mean 'learning_rate'?)"


def test_wrong_type_is_named(tmp_path):
    path = write(tmp_path, "c.yaml", "per_device_train_batch_size: four\n")
    with pytest.raises(PreftuneError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: 'per_device_train_batch_size' must be a whole number, got 'four'"


def test_out_of_range_values(tmp_path):
    for text, fragment in [
        ("beta: -1\n", "'beta' must be > 0, got -1.0"),
        ("eval_split: 1.5\n", "'eval_split' must be 0, a fraction in (0, 1) or a whole count"),
        ("lr_scheduler_type: cosin\n", "'lr_scheduler_type' must be one of constant, constant_with_warmup, linear, cosine; got 'cosin' (did you mean 'cosine'?)"),
        ("reference: adapter\nlora_r: 0\n", "'reference: adapter' needs LoRA"),
        ("loss_type: sigmod\n", "sigmoid"),
        ("use_4bit: true\nlora_r: 0\n", "'use_4bit' trains through LoRA"),
    ]:
        with pytest.raises(PreftuneError) as err:
            load_config(write(tmp_path, "c.yaml", text))
        assert fragment in str(err.value), (text, str(err.value))


def test_set_overrides_parse_yaml_values(tmp_path):
    path = write(tmp_path, "c.yaml", "beta: 0.1\nlora_r: 16\nmax_length: 128\n")
    cfg = load_config(path, ["beta=0.2", "lora_r=0", "bf16=false", "loss_type=[sigmoid, sft]", "max_seq_length=64"])
    assert cfg.beta == 0.2 and cfg.lora_r == 0 and not cfg.use_lora and cfg.bf16 is False
    assert cfg.loss_type == ["sigmoid", "sft"]
    assert cfg.max_seq_length == 64  # the override wins over the file's alias
    assert parse_override("lora_r=null") == ("lora_r", None)
    with pytest.raises(PreftuneError, match=r"--set: unknown key 'bta' \(did you mean 'beta'\?\)"):
        load_config(path, ["bta=1"])
    with pytest.raises(PreftuneError, match="expected KEY=VALUE"):
        load_config(path, ["beta"])


def test_trl_names_are_aliases(tmp_path):
    cfg = load_config(write(tmp_path, "c.yaml", "max_length: 256\nmodel_name_or_path: x\n"))
    assert cfg.max_seq_length == 256 and cfg.model_name == "x"


def test_rpo_alpha_adds_an_sft_term():
    cfg = TrainConfig(rpo_alpha=0.5)
    assert cfg.loss_mix() == (["sigmoid", "sft"], [1.0, 0.5])
    assert TrainConfig(loss_type=["sigmoid", "sft"], loss_weights=[1, 2]).loss_mix() == (["sigmoid", "sft"], [1.0, 2.0])


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, "c.yaml", "beta: 0.3\n"))
    text = to_yaml(cfg)
    again = load_config(write(tmp_path, "r.yaml", text))
    assert again == cfg
    assert set(yaml.safe_load(text)) == set(TrainConfig().to_dict())


def test_bad_files(tmp_path):
    with pytest.raises(PreftuneError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    path = write(tmp_path, "c.json", '{"beta": 0.1,}')
    with pytest.raises(PreftuneError, match=r"c.json:1: invalid JSON"):
        load_config(path)
    path = write(tmp_path, "c.yaml", "- 1\n- 2\n")
    with pytest.raises(PreftuneError, match="must be a mapping"):
        load_config(path)


def test_every_training_example_config_is_valid():
    from pathlib import Path

    from preftune.config import load_config, read_config_file
    from preftune.recipes.pipeline import load_pipeline

    root = Path(__file__).resolve().parent.parent / "examples"
    names = ("dpo_lora.yaml", "dpo_full.json", "sft.yaml", "kto.yaml", "orpo.yaml", "simpo.yaml", "cpo.yaml",
             "reward_model.yaml", "sft_dpo_pipeline.yaml")  # what `preftune train` runs (not iterate/sweep configs)
    paths = [root / name for name in names]
    strategies = set()
    for path in paths:
        if "stages" in read_config_file(path):
            strategies.update(c.strategy for c in load_pipeline([path]))
        else:
            strategies.add(load_config(path).strategy)
    assert strategies == {"sft", "dpo", "kto", "orpo", "simpo", "cpo", "reward"}


# ---------------------------------------------------------------------------------------------
# Keys a strategy does not read are refused, naming the strategies they apply to


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"strategy": "reward", "use_liger_kernel": True},
         "config: 'use_liger_kernel' applies to strategies sft, dpo, kto, orpo, simpo and cpo, not 'reward'"),
        ({"strategy": "dpo", "desirable_weight": 2.0, "simpo_gamma": 1.0},
         "config: 'desirable_weight' applies to strategy kto, not 'dpo'\n"
         "config: 'simpo_gamma' applies to strategy simpo, not 'dpo'"),
        ({"strategy": "orpo", "f_divergence_type": "js_divergence"},
         "config: 'f_divergence_type' applies to strategy dpo, not 'orpo'"),
        ({"strategy": "simpo", "f_alpha": 0.3}, "config: 'f_alpha' applies to strategy dpo, not 'simpo'"),
        ({"strategy": "sft", "share_prompt": False},
         "config: 'share_prompt' applies to strategies dpo, orpo, simpo and cpo, not 'sft'"),
        ({"strategy": "reward", "share_prompt": False},
         "config: 'share_prompt' applies to strategies dpo, orpo, simpo and cpo, not 'reward'"),
        ({"strategy": "reward", "max_prompt_length": 64, "router_aux_loss_coef": 0.0},
         "config: 'max_prompt_length' applies to strategies sft, dpo, kto, orpo, simpo and cpo, not 'reward'\n"
         "config: 'router_aux_loss_coef' applies to strategies sft, dpo, kto, orpo, simpo and cpo, not 'reward'"),
        ({"strategy": "dpo", "completion_only_loss": False}, "config: 'completion_only_loss' applies to strategy sft, not 'dpo'"),
        ({"strategy": "sft", "beta": 0.2}, "config: 'beta' applies to strategies dpo, kto, orpo, simpo and cpo, not 'sft'"),
        ({"strategy": "kto", "margin_weighting": True},
         "config: 'margin_weighting' weighs preference pairs; strategy 'kto' has none (it applies to strategies dpo, orpo, "
         "simpo, cpo and reward)"),
        ({"strategy": "reward", "provider": "unsloth"},
         "config: strategy 'reward' loads its model with transformers; 'provider: unsloth' loads causal LMs only"),
    ],
)
def test_a_key_the_strategy_does_not_read_is_refused(keys, message):
    from preftune.config import from_dict
    from preftune.errors import PreftuneError

    with pytest.raises(PreftuneError) as err:
        from_dict(keys)
    assert str(err.value) == message


def test_keys_at_their_defaults_and_hf_provider_are_accepted():
    from preftune.config import from_dict, resolve

    # A resolved config of another strategy carries every key at its default: it loads.
    settings = resolve(from_dict({**TrainConfig(strategy="dpo").to_dict(), "strategy": "reward", "provider": "hf"}))
    assert settings.model.provider == "transformers" and settings.lora.lora_r == 16
    assert settings.reference.reference == "none" and settings.optim.per_device_eval_batch_size == 4


def test_a_pipelines_shared_keys_reach_the_stages_that_read_them(tmp_path):
    from preftune.recipes.pipeline import load_pipeline

    path = tmp_path / "p.yaml"
    path.write_text(
        "dataset: d.jsonl\nbeta: 0.3\nshare_prompt: false\noutput_dir: runs/p\n"
        "stages:\n  - strategy: sft\n  - strategy: dpo\n"
    )
    sft, dpo = load_pipeline([path], ["simpo_gamma=0.9"])
    assert (sft.beta, sft.share_prompt, sft.simpo_gamma) == (0.1, True, 0.5)  # not SFT's keys: left out
    assert (dpo.beta, dpo.share_prompt, dpo.simpo_gamma) == (0.3, False, 0.5)
    path.write_text("dataset: d.jsonl\nstages:\n  - strategy: sft\n    beta: 0.3\n  - strategy: dpo\n")
    from preftune.errors import PreftuneError

    with pytest.raises(PreftuneError, match=r"stages\[0\]: 'beta' applies to strategies dpo, kto, orpo, simpo and cpo, not 'sft'"):
        load_pipeline([path])

"""SFT then DPO as one pipeline on a tiny model: the SFT result is DPO's start and its reference, a
rerun skips finished stages, and stage configs chain whichever way they are written."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from preftune.cli import main
from preftune.errors import PreftuneError
from preftune.recipes.pipeline import load_pipeline
from helpers import read_metrics

pytestmark = pytest.mark.usefixtures("_propagate_logs")

SHARED = """\
model_name: {model}
dataset: {data}
output_dir: {out}
per_device_train_batch_size: 4
learning_rate: 5e-3
lr_scheduler_type: constant
warmup_ratio: 0
logging_steps: 1
eval_split: 8
lora_r: 4
lora_alpha: 8
max_seq_length: 64
progress_bar: false
seed: 3
"""


def test_sft_then_dpo_end_to_end(tmp_path, tiny_model_dir, pairs_file, capsys):
    out = tmp_path / "pipe"
    config = tmp_path / "pipe.yaml"
    config.write_text(SHARED.format(model=tiny_model_dir, data=pairs_file, out=out) + (
        f"cache_dir: {tmp_path / 'cache'}\n"
        "stages:\n"
        "  - strategy: sft\n"
        "    max_steps: 12\n"
        "  - strategy: dpo\n"
        "    max_steps: 2\n"
    ))
    assert main(["train", str(config)]) == 0
    sft, dpo = out / "1-sft", out / "2-dpo"
    assert (sft / "final" / "adapter_config.json").is_file() and (sft / "final_merged" / "config.json").is_file()
    assert yaml.safe_load((sft / "config.resolved.yaml").read_text())["merge_lora"] is True
    assert yaml.safe_load((dpo / "config.resolved.yaml").read_text())["model_name"] == str(sft / "final_merged")
    assert (dpo / "final" / "adapter_config.json").is_file()
    # DPO starts from the SFT model and uses it as the reference: its first loss is ln 2.
    first = read_metrics(dpo)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4) and first["rewards/margins"] == pytest.approx(0, abs=1e-5)

    # The same step from the base model scores the chosen completions lower: SFT raised them.
    base = tmp_path / "base.yaml"
    base.write_text(SHARED.format(model=tiny_model_dir, data=pairs_file, out=tmp_path / "base") + "max_steps: 1\n"
                    f"cache_dir: {tmp_path / 'cache'}\n")
    assert main(["train", str(base)]) == 0
    assert first["logps/chosen"] > read_metrics(tmp_path / "base")[0]["logps/chosen"] + 1.0

    # A rerun finds both stages finished with the same config and skips them.
    capsys.readouterr()
    before = (dpo / "metrics.jsonl").read_text()
    assert main(["train", str(config)]) == 0
    assert capsys.readouterr().err.count("already finished with this config; skipped") == 2
    assert (dpo / "metrics.jsonl").read_text() == before


def test_stage_files_chain_and_settings_are_checked(tmp_path, tiny_model_dir, pairs_file):
    a, b = tmp_path / "sft.yaml", tmp_path / "dpo.yaml"
    a.write_text(SHARED.format(model=tiny_model_dir, data=pairs_file, out=tmp_path / "sft") + "strategy: sft\n")
    b.write_text(SHARED.format(model=tiny_model_dir, data=pairs_file, out=tmp_path / "dpo") + "strategy: dpo\n")
    sft, dpo = load_pipeline([a, b], ["max_steps=3"])
    assert (sft.strategy, sft.merge_lora, sft.max_steps) == ("sft", True, 3)
    assert dpo.model_name == str(tmp_path / "sft" / "final_merged") and dpo.max_steps == 3
    # A full fine-tune hands over final/.
    _, dpo = load_pipeline([a, b], ["lora_r=0"])
    assert dpo.model_name == str(tmp_path / "sft" / "final")

    stages = tmp_path / "stages.yaml"
    stages.write_text(SHARED.format(model=tiny_model_dir, data=pairs_file, out=tmp_path / "p") +
                      "stages:\n  - strategy: sft\n  - strategy: dpo\n    model_name: other\n")
    with pytest.raises(PreftuneError, match=r"stages\[1\]: 'model_name' of a later stage is the previous stage's result"):
        load_pipeline([stages])
    stages.write_text(SHARED.format(model=tiny_model_dir, data=pairs_file, out=tmp_path / "p") +
                      "stages:\n  - strategy: reward\n  - strategy: dpo\n")
    with pytest.raises(PreftuneError, match="a reward model ends a pipeline"):
        load_pipeline([stages])
    stages.write_text(SHARED.format(model=tiny_model_dir, data=pairs_file, out=tmp_path / "p") +
                      "stages:\n  - strategy: sft\n  - strategy: dpo\n    beta: -1\n")
    with pytest.raises(PreftuneError, match=r"stages\[1\]: 'beta' must be > 0"):
        load_pipeline([stages])  # every stage is checked before the first one trains
    assert json.dumps([c.output_dir for c in load_pipeline([a, b])]) == json.dumps([str(tmp_path / "sft"), str(tmp_path / "dpo")])

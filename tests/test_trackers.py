"""`report_to` through accelerate's trackers: one two-process run logs to TensorBoard, W&B (offline),
MLflow and Trackio, and each tracker's own local store, read back with that tracker's reader, holds
exactly the values of `metrics.jsonl` (train and eval records) at their steps, and the resolved
config once as hyperparameters; the second process logs nothing. A missing tracker package stops
the run before training with one line."""

from __future__ import annotations

import json
import os
import struct
import sys
import zlib
from pathlib import Path

import pytest
import yaml

from preftune.config import TrainConfig, from_dict
from preftune.errors import PreftuneError
from preftune.training.tracking import hyperparameters, missing_packages, start, tracker_names

from test_distributed import free_port, run_group
from helpers import synthetic_pairs

TRACKED = ["tensorboard", "wandb", "mlflow", "trackio"]

CONFIG = """\
model_name: {model}
dataset: {data}
output_dir: {out}
max_steps: 3
per_device_train_batch_size: 2
learning_rate: 5e-3
lr_scheduler_type: constant
warmup_ratio: 0
logging_steps: 1
eval_steps: 2
eval_split: 4
lora_r: 0
max_seq_length: 64
progress_bar: false
cache_dir: {out}-cache
report_to: [tensorboard, wandb, mlflow, trackio]
tracker_project: preftune-tests
run_name: tiny-dpo
"""


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_model_dir):
    """One run on two CPU processes (gloo) with every tracker; each writes only local files."""
    for name in TRACKED:
        pytest.importorskip("torch.utils.tensorboard" if name == "tensorboard" else name)
    root = tmp_path_factory.mktemp("tracked")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(16, seed=7)))
    out = root / "run"
    (root / "config.yaml").write_text(CONFIG.format(model=tiny_model_dir, data=data, out=out))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_", "TRACKIO_"))}
    env.update(
        ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true",
        WANDB_CONFIG_DIR=str(root / "wandb-config"), WANDB_CACHE_DIR=str(root / "wandb-cache"),
        WANDB_DATA_DIR=str(root / "wandb-data"), TRACKIO_DIR=str(root / "trackio"),
    )
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", "preftune", "train", str(root / "config.yaml"),
    ]
    done = run_group(launch, env, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    config = yaml.safe_load((out / "config.resolved.yaml").read_text())
    return out, records, config, root / "trackio", done.stderr


def expected(records: list[dict]) -> dict[tuple[int, str], float]:
    """Every value of metrics.jsonl by (step, name), train and eval records alike."""
    values = {(r["step"], k): v for r in records for k, v in r.items() if k != "step"}
    assert any(k.startswith("eval_") for _, k in values) and any(k == "loss" for _, k in values)
    return values


def test_the_run_says_which_trackers_it_started(tracked_run):
    out, records, config, _, stderr = tracked_run
    assert "trackers: tensorboard, wandb, mlflow, trackio (run tiny-dpo, project preftune-tests)" in stderr
    assert stderr.count("trackers: ") == 1  # the main process only
    assert [r["step"] for r in records] == [1, 2, 2, 3, 3]  # train at 1, 2, 3; eval at 2 and the end


# -- TensorBoard: event files through tensorboard's EventAccumulator


def test_tensorboard_event_files_hold_every_record(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out, records, config, _, _ = tracked_run
    folder = out / "tensorboard" / "tiny-dpo"
    events = sorted(folder.rglob("events.out.tfevents.*"))
    assert len(events) == 2  # the scalars, and the hyperparameters in their own subfolder: one process wrote
    scalars = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    scalars.Reload()
    got = {(e.step, tag): e.value for tag in scalars.Tags()["scalars"] for e in scalars.Scalars(tag)}
    want = expected(records)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key  # stored as float32

    hparams_dir = next(p.parent for p in events if p.parent != folder)
    acc = EventAccumulator(str(hparams_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in content
    start_info = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    logged = {k: getattr(v, v.WhichOneof("kind")) for k, v in start_info.hparams.items()}
    flat = {k: v for k, v in hyperparameters(config).items() if v is not None}  # TensorBoard skips None
    assert logged.keys() == flat.keys()
    for key, value in flat.items():
        assert logged[key] == (pytest.approx(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value), key


# -- W&B: the offline run's transaction log (`run-ID.wandb`), read record by record


def wandb_records(path: Path):
    """The records of a W&B transaction log: a 7-byte header (':W&B', 0xBEE1, version 0), then
    LevelDB's log format (32 KiB blocks; each chunk a CRC-32 of its type byte and data, its length
    and type: full, first, middle, last), each record a `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += room
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_holds_every_record_and_the_config_once(tracked_run):
    out, records, config, _, _ = tracked_run
    runs = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1  # one process, one run
    got: dict[tuple[int, str], float] = {}
    configs, run_records = [], []
    for record in wandb_records(runs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            step = record.history.step.num
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):  # W&B's own _step, _runtime, _timestamp
                    got[(step, key)] = json.loads(item.value_json)
        elif kind == "config":
            configs.append({i.key: json.loads(i.value_json) for i in record.config.update if not i.key.startswith("_")})
        elif kind == "run":
            run_records.append(record.run)
    assert got == expected(records)  # exact: W&B keeps doubles
    assert [(r.project, r.display_name) for r in run_records] == [("preftune-tests", "tiny-dpo")]
    assert configs == [hyperparameters(config)]


# -- MLflow: the SQLite store in output_dir through MlflowClient


def test_mlflow_store_holds_every_record_and_the_params(tracked_run):
    from mlflow.tracking import MlflowClient

    out, records, config, _, _ = tracked_run
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("preftune-tests")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "tiny-dpo" and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    got = {(m.step, key): m.value for key in runs[0].data.metrics for m in client.get_metric_history(run_id, key)}
    assert got == expected(records)
    assert runs[0].data.params == {k: str(v) for k, v in hyperparameters(config).items()}
    assert experiment.artifact_location == (out / "mlartifacts").as_uri()


# -- Trackio: its project database, read through its own storage class


def test_trackio_database_holds_every_record_and_the_config(tracked_run, monkeypatch):
    trackio_storage = pytest.importorskip("trackio.sqlite_storage")
    out, records, config, trackio_dir, _ = tracked_run
    # trackio reads TRACKIO_DIR once, at import; this process imported it with its own.
    monkeypatch.setattr(trackio_storage, "TRACKIO_DIR", trackio_dir)
    storage = trackio_storage.SQLiteStorage
    assert storage.get_runs("preftune-tests") == ["tiny-dpo"]
    got = {}
    for row in storage.get_logs("preftune-tests", "tiny-dpo"):
        for key, value in row.items():
            if key not in ("step", "timestamp"):
                got[(row["step"], key)] = value
    assert got == expected(records)
    logged = {k: v for k, v in storage.get_run_config("preftune-tests", "tiny-dpo").items() if not k.startswith("_")}
    assert logged == hyperparameters(config)


# -- names, flattening, missing packages, other processes


def test_report_to_names_and_validation():
    assert tracker_names("none") == [] and tracker_names("wandb") == ["wandb"]
    assert tracker_names(["tensorboard", "mlflow"]) == ["tensorboard", "mlflow"]
    assert from_dict({"report_to": ["tensorboard", "wandb"]}).report_to == ["tensorboard", "wandb"]
    assert from_dict({"project": "p", "run_name": "r"}).tracker_project == "p"
    assert from_dict({"project_name": "q"}).tracker_project == "q"
    with pytest.raises(PreftuneError, match=r"^config: 'report_to' must be one of .*; got 'wandbb' \(did you mean 'wandb'\?\)$"):
        from_dict({"report_to": ["tensorboard", "wandbb"]})
    with pytest.raises(PreftuneError, match="none cannot be combined"):
        from_dict({"report_to": ["none", "wandb"]})
    with pytest.raises(PreftuneError, match="'tracker_init_kwargs' must be one of"):
        from_dict({"tracker_init_kwargs": {"wandbb": {}}})


def test_all_means_every_installed_tracker(monkeypatch):
    import accelerate.tracking

    for name in ("aim", "comet_ml", "swanlab", "clearml", "dvclive", "trackio"):
        monkeypatch.setattr(accelerate.tracking, f"is_{name}_available", lambda: False)
    names = tracker_names("all")
    assert "trackio" not in names and set(names) <= {"tensorboard", "wandb", "mlflow"}
    assert tracker_names(["trackio", "all"])[0] == "trackio"  # named ones stay, and are checked


def test_hyperparameters_are_flat_scalars():
    cfg = TrainConfig(loss_type=["sigmoid", "sft"], columns={"prompt": "question"}, fsdp_config={})
    flat = hyperparameters(cfg.to_dict())
    assert flat["loss_type"] == '["sigmoid", "sft"]' and flat["columns.prompt"] == "question"
    assert flat["fsdp_config"] == "{}" and flat["task"] is None and flat["beta"] == 0.1
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in flat.values())


@pytest.mark.parametrize("how", ["import", "accelerate"])
def test_a_missing_tracker_package_stops_the_run_before_training(tmp_path, tiny_model_dir, monkeypatch, capsys, how):
    pytest.importorskip("wandb")
    import accelerate.tracking

    from preftune.cli import main

    if how == "import":  # the package cannot be imported
        monkeypatch.setitem(sys.modules, "wandb", None)
    else:  # accelerate finds no wandb
        monkeypatch.setattr(accelerate.tracking, "is_wandb_available", lambda: False)
    line = "report_to: wandb needs the wandb package, which is not installed: pip install 'preftune[track]'"
    assert missing_packages(["tensorboard", "wandb"]) == [line]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(8)))
    out = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(f"model_name: {tiny_model_dir}\ndataset: {data}\noutput_dir: {out}\nmax_steps: 1\n")
    capsys.readouterr()
    code = main(["train", str(config), "--set", "report_to=[tensorboard, wandb]"])
    err = capsys.readouterr().err
    assert code != 0 and [l for l in err.splitlines() if "error" in l] == [f"preftune: error: {line}"]
    assert not (out / "metrics.jsonl").exists() and not (out / "tensorboard").exists()


def test_other_processes_start_no_tracker(tmp_path):
    cfg = from_dict({"report_to": TRACKED, "output_dir": str(tmp_path / "run")})
    tracking = start(cfg, tmp_path / "run", is_main=False)
    assert tracking.trackers == []
    tracking.log({"step": 1, "loss": 0.5})
    tracking.finish()
    assert not (tmp_path / "run").exists()

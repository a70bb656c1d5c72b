"""MLflow tracking of the bundle workflows (docs/tracking.md): ``--tracking bundles/common/configs/mlflow.json`` on
training (the options as parameters, the loss of each iteration and of each epoch, the validation metric, the
executed config) and on evaluation (its metrics and its summary table as artefacts), read back from the store with
``MlflowClient``; MONAI's built-in ``--tracking mlflow`` refused for training in one line; the pieces without MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bundle_helpers import SMALL_TRAIN
from ignite.engine import Events

from anofpdm_monai.apps import options
from anofpdm_monai.apps.evaluate import EvaluationRun, summary_metrics
from anofpdm_monai.apps.tracking import bundle_params, executed_config, settings_file
from anofpdm_monai.apps.workflow import run_workflow
from anofpdm_monai.bundle import config_files
from anofpdm_monai.data.datalist import write_datalist
from anofpdm_monai.data.synthetic import make_dataset, phantom_anatomy

BUNDLE = "anofpdm_atlas"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> dict:
    """A training run and an evaluation run of its checkpoint, both tracked into one SQLite store."""
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("alembic")
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("tracking")
    data = root / "data"
    anatomy = phantom_anatomy((32, 40, 24), spacing=6.0)
    dl = make_dataset(data, anatomy, {"training": 2, "validation": 1, "test": 2}, ["t1w"])
    write_datalist(dl, root / "datalist.json")
    uri = f"sqlite:///{root / 'store' / 'mlruns.db'}"
    common = {
        "dataset_dir": str(data),
        "datalist": str(root / "datalist.json"),
        "cache_dir": str(root / "cache"),
        "tracking": str(settings_file()),
        "tracking_uri": uri,
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        run_workflow(BUNDLE, "train", output_dir=str(root / "model"), **common, **SMALL_TRAIN)
        run_workflow(
            BUNDLE,
            "calibrate",
            output_dir=str(root / "cal"),
            checkpoint=str(root / "model" / "model.pt"),
            guidance_scales=[1.0],
            t_max=100,
            stride=50,
            progress=False,
            device="cpu",
            **common,
        )
        run_workflow(
            BUNDLE,
            "evaluate",
            output_dir=str(root / "eval"),
            checkpoint=str(root / "model" / "model.pt"),
            methods=["intensity"],
            seeds=[0],
            median_kernel=3,
            min_component_size=0,
            progress=False,
            device="cpu",
            **common,
        )
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(BUNDLE)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert len(runs) == 3, [r.info.run_name for r in runs]
    return {"client": client, "train": runs[0], "calibrate": runs[1], "evaluate": runs[2], "root": root}


def _artifacts(client, run) -> list[str]:
    return sorted(a.path for a in client.list_artifacts(run.info.run_id))


def test_training_logs_options_losses_validation_metric_and_config(tracked):
    client, run = tracked["client"], tracked["train"]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["image_size"] == "32" and params["network_size"] == "tiny" and params["batch_size"] == "8"
    assert params["num_epochs"] == "1" and params["learning_rate"] == "0.0001" and params["modalities"] == '["t1w"]'
    assert params["output_dir"] == str(tracked["root"] / "model")  # given on the command line: a plain value
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(history) > 0 and [m.step for m in history] == list(range(1, len(history) + 1))
    epoch = client.get_metric_history(run.info.run_id, "train_loss_epoch")
    assert [m.step for m in epoch] == [1]
    assert epoch[0].value == pytest.approx(sum(m.value for m in history) / len(history), rel=1e-5)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_mse")] == [1]
    (config,) = _artifacts(client, run)
    assert config.startswith("config_") and config.endswith(".json")
    logged = json.loads(Path(client.download_artifacts(run.info.run_id, config)).read_text())
    assert logged["image_size"] == 32 and logged["network_size"] == "tiny"


def test_evaluation_logs_metrics_and_the_summary_table(tracked):
    client, run = tracked["client"], tracked["evaluate"]
    assert run.info.status == "FINISHED"
    assert run.data.params["methods"] == '["intensity"]' and run.data.params["seeds"] == "[0]"
    summary = json.loads((tracked["root"] / "eval" / "evaluation" / "summary.json").read_text())
    expected = summary_metrics(summary)
    assert expected and "intensity/mixed_dice" in expected
    for key, value in expected.items():
        logged = run.data.metrics[key]
        assert logged == pytest.approx(value, nan_ok=True), key
    files = _artifacts(client, run)
    assert {"summary.json", "summary.md", "metrics.csv"} <= set(files), files
    assert any(f.startswith("config_") for f in files), files
    table = Path(client.download_artifacts(run.info.run_id, "summary.md")).read_text()
    assert table == (tracked["root"] / "eval" / "evaluation" / "summary.md").read_text()


def test_calibration_logs_its_options_and_the_calibration_file(tracked):
    client, run = tracked["client"], tracked["calibrate"]
    assert run.info.status == "FINISHED"
    assert run.data.params["stride"] == "50" and run.data.params["guidance_scales"] == "[1.0]"
    assert "calibration.json" in _artifacts(client, run)
    logged = json.loads(Path(client.download_artifacts(run.info.run_id, "calibration.json")).read_text())
    assert logged == json.loads((tracked["root"] / "cal" / "calibration.json").read_text())


def test_monai_default_mlflow_settings_are_refused_for_training_in_one_line():
    files = config_files(BUNDLE, "train")
    with pytest.raises(ValueError, match=r"--tracking mlflow: .*use --tracking .*mlflow\.json") as info:
        options.check(files, {"tracking": "mlflow"})
    assert "\n" not in str(info.value)
    options.check(config_files(BUNDLE, "evaluate"), {"tracking": "mlflow", "experiment_name": "e"})
    options.check(files, {"tracking": str(settings_file()), "run_name": "r", "tracking_uri": "sqlite:////tmp/x.db"})
    with pytest.raises(ValueError, match="no such settings file"):
        options.check(files, {"tracking": "nowhere.json"})


def test_executed_config_and_bundle_params(tmp_path):
    # MONAI's save_execute_config for a plain --output_dir is text, not an expression
    assert executed_config("/out + '/config_20260101_120000.json'") == "/out/config_20260101_120000.json"
    assert executed_config("/out/config_20260101_120000.json") == "/out/config_20260101_120000.json"
    assert executed_config(None) is None and bundle_params(None) == {}
    config = {
        "imports": ["$import os"],
        "image_size": 32,
        "device": "$torch.device('cpu')",
        "methods": ["a", "b"],
        "resume": True,
        "network_def": {"_target_": "x"},
        "handlers": [],
        "run_name": "r",
        "_meta_": {"version": "1"},
    }
    path = tmp_path / "config_20260101_120000.json"
    path.write_text(json.dumps(config))
    assert bundle_params(f"{tmp_path} + '/{path.name}'") == {
        "image_size": "32",
        "methods": '["a", "b"]',
        "resume": "true",
    }


def test_evaluation_run_is_an_engine_with_the_summary_metrics():
    summary = {"methods": {"m": {"metrics": {"dice": {"mean": 0.5, "std": 0.1}}}}}
    seen = {}

    class Handler:
        def attach(self, engine):
            engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.update(e.state.metrics))

    calls = []
    run = EvaluationRun(lambda: calls.append(1) or summary, val_handlers=[Handler()])
    assert run.run() is summary and calls == [1]
    assert seen == {"m/dice": 0.5, "m/dice_std": 0.1}
    assert summary_metrics(None) == {}

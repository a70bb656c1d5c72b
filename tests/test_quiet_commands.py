"""The documented commands print no noise (issue 24 item 5): no ignite "Engine run resuming from iteration 0, ..."
on runs that resume nothing (trainer, validation, calibration, inference), no MONAI "Not all config files are in
..." from this package's entry points (``run_workflow``, which the demo uses), no meaningless epoch total under a
time or iteration budget (the progress bar and the epoch log show what is left), and the datalist command
imports neither torch nor MONAI.

``python -m monai.bundle run`` itself still logs MONAI's "Not all config files" line (it is logged by MONAI before
any code of this package runs): only ``run_workflow`` is checked for it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ignite.engine import Engine

from anofpdm_monai.bundle import config_files
from anofpdm_monai.data.datalist import write_datalist
from anofpdm_monai.data.synthetic import make_dataset, phantom_anatomy
from anofpdm_monai.engines import ProgressBar, ResumeLogFilter, TimeBudget
from anofpdm_monai.engines.handlers import format_duration

REPO = Path(__file__).resolve().parent.parent
BUNDLE = "anofpdm_atlas"
TIMEOUT = 300

FALSE_RESUME = "Engine run resuming from iteration 0,"
CONFIG_ROOT_NOTICE = "Not all config files are in"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{(proc.stdout + proc.stderr)[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Synthetic ATLAS-like data and the README's training command with a budget (``num_epochs`` huge, as when
    the budget rules), with its progress bar on."""
    root = tmp_path_factory.mktemp("quiet")
    data = root / "data"
    splits = {"training": 2, "validation": 1, "test": 1}
    dl = make_dataset(data, phantom_anatomy((32, 40, 24), spacing=6.0), splits, ["t1w"])
    datalist = root / "datalist.json"
    write_datalist(dl, datalist)
    common = {"dataset_dir": str(data), "datalist": str(datalist), "cache_dir": str(root / "cache"), "device": "cpu"}
    train = {
        **common,
        "output_dir": str(root / "model"),
        "image_size": 32,
        "network_size": "tiny",
        "batch_size": 8,
        "val_batch_size": 16,
        "num_workers": 0,
        "num_epochs": 100000,
        "time_limit": 600,
        "max_iterations": 7,
        "preview_interval": 0,
    }
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config_files(BUNDLE, "train"))]
    for k, v in train.items():
        cmd += [f"--{k}", str(v)]
    proc = _run(cmd, cwd=root)
    return {"root": root, "common": common, "checkpoint": root / "model" / "model.pt", "proc": proc}


def test_training_command_shows_the_budget_and_no_false_resume(trained):
    out, err = trained["proc"].stdout, trained["proc"].stderr
    assert trained["checkpoint"].is_file()
    assert FALSE_RESUME not in out + err  # neither the trainer's nor the validation's
    assert "/100000]" not in err, err[-2000:]  # the bar: no meaningless epoch total
    assert re.search(r"Epoch 1 \(\d+m \d{2}s left, iteration \d/7\)", err), err[-2000:]
    assert re.search(r"epoch 1: \d+m \d{2}s left, iteration \d/7", out), out[-2000:]  # the epoch log
    assert "iteration limit 7 reached" in out


def test_run_workflow_calibration_and_inference_are_quiet(trained):
    """Through ``anofpdm_monai.apps.workflow.run_workflow`` (the demo's way): neither MONAI's config-folder notice nor
    ignite's resume line of the calibration's and the inference's evaluators."""
    root, common = trained["root"], trained["common"]
    calibration = root / "calibration.json"
    calibrate = {
        **common,
        "checkpoint": str(trained["checkpoint"]),
        "output_dir": str(root),
        "calibration_file": str(calibration),
        "guidance_scales": [1.0, 3.0],
        "t_max": 200,
        "stride": 50,
    }
    inference = {
        **{k: v for k, v in common.items() if k != "cache_dir"},
        "checkpoint": str(trained["checkpoint"]),
        "calibration": str(calibration),
        "output_dir": str(root / "inference"),
    }
    script = (
        "import json, sys\n"
        "from anofpdm_monai.apps.workflow import run_workflow\n"
        f"run_workflow({BUNDLE!r}, 'calibrate', **json.loads(sys.argv[1]))\n"
        f"run_workflow({BUNDLE!r}, 'inference', **json.loads(sys.argv[2]))\n"
    )
    proc = _run([sys.executable, "-c", script, json.dumps(calibrate), json.dumps(inference)], cwd=root)
    output = proc.stdout + proc.stderr
    assert calibration.is_file() and "inference: 1 done" in output, output[-3000:]
    assert CONFIG_ROOT_NOTICE not in output
    assert FALSE_RESUME not in output


def _touch_brats2021(root: Path, n: int) -> Path:
    for i in range(n):
        case = f"BraTS2021_{i:05d}"
        (root / case).mkdir(parents=True)
        for name in ("flair", "t1", "t1ce", "t2", "seg"):
            (root / case / f"{case}_{name}.nii.gz").write_bytes(b"")
    return root


@pytest.mark.parametrize("help_only", [False, True], ids=["folder scan", "--help"])
def test_datalist_command_imports_neither_torch_nor_monai(tmp_path, help_only):
    root = _touch_brats2021(tmp_path / "brats", 5)
    output = tmp_path / "datalist.json"
    argv = ["--help"] if help_only else ["brats2021", "--root", str(root), "--output", str(output)]
    script = (
        "import json, runpy, sys\n"
        "sys.argv = ['datalist', *json.loads(sys.argv[1])]\n"
        "try:\n"
        "    runpy.run_module('anofpdm_monai.apps.datalist', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "heavy = sorted(m for m in ('torch', 'monai', 'ignite') if m in sys.modules)\n"
        "print(json.dumps({'code': code, 'heavy': heavy}))\n"
    )
    proc = _run([sys.executable, "-c", script, json.dumps(argv)], cwd=tmp_path)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "heavy": []}, proc.stdout + proc.stderr
    assert help_only or json.loads(output.read_text())["training"]


def test_data_package_names_still_import():
    import anofpdm_monai.data as data
    from anofpdm_monai.data import LAYOUTS, SliceDataset, VolumePreprocessor

    assert LAYOUTS and SliceDataset.__name__ == "SliceDataset" and data.VolumePreprocessor is VolumePreprocessor
    assert set(data.__all__) <= set(dir(data))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        data.nope  # noqa: B018


# --------------------------------------------------------------------------------------------------- in process


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.2, "1s"), (45, "45s"), (750, "12m 30s"), (7500, "2h 05m"), (-3, "0s")]
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def _loss_engine() -> Engine:
    return Engine(lambda e, b: {"loss": 0.5})


def test_progress_bar_shows_the_budget_instead_of_the_epoch_total(capsys, caplog):
    engine = _loss_engine()
    TimeBudget(600, iterations=4).attach(engine)
    ProgressBar().attach(engine)
    with caplog.at_level(logging.INFO, logger="anofpdm_monai.engines.handlers"):
        engine.run(range(3), max_epochs=100000)
    err = capsys.readouterr().err
    assert engine.state.iteration == 4
    assert "100000" not in err and re.search(r"Epoch 2 \(\d+m \d{2}s left, iteration 4/4\)", err), err
    assert [r for r in caplog.messages if re.fullmatch(r"epoch 1: \d+m \d{2}s left, iteration 3/4", r)]

    engine = _loss_engine()  # no budget: ignite's look
    ProgressBar().attach(engine)
    engine.run(range(3), max_epochs=2)
    err = capsys.readouterr().err
    assert "Epoch [2/2]: [1/3]" in err and "loss=0.5" in err


def test_resume_line_only_for_a_real_resume(caplog):
    engine = Engine(lambda e, b: e.terminate() if e.state.iteration == 2 else None)
    ResumeLogFilter().attach(engine)
    ResumeLogFilter().attach(engine)
    assert sum(isinstance(f, ResumeLogFilter) for f in engine.logger.filters) == 1
    with caplog.at_level(logging.INFO, logger=engine.logger.name):
        engine.state.max_epochs = 2  # as a MONAI engine's state: ignite calls the first run a resume
        engine.state.epoch_length = 3
        engine.run(range(3))
        assert not [m for m in caplog.messages if "resuming" in m]
        engine.run(range(3))  # after the termination at iteration 2: a real resume
    assert [m for m in caplog.messages if m.startswith("Engine run resuming from iteration 2,")]

"""The bundle commands' options mean what they say (anofpdm_monai/apps/options.py): booleans in any spelling
(``--use_ema false`` used to be true), unknown options refused with the closest name, ``--help`` listing the options
and running nothing, type and value errors naming the option before any work; through
``anofpdm_monai.apps.workflow.run_workflow`` and the real ``python -m monai.bundle run`` command."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import fire
import pytest
import torch
from test_volume_inference import BRATS, GRID, SIZE, _tiny_net

from anofpdm_monai.apps import options
from anofpdm_monai.apps.errors import install, root_cause
from anofpdm_monai.apps.workflow import run_workflow
from anofpdm_monai.bundle import WORKFLOWS, config_files
from anofpdm_monai.calibration import Calibration, CalibrationError
from anofpdm_monai.data import VolumePreprocessor
from anofpdm_monai.data.synthetic import make_case, phantom_anatomy
from anofpdm_monai.networks import load_network, save_checkpoint
from anofpdm_monai.settings import AnoFPDMSettings

REPO = Path(__file__).resolve().parents[1]
BUNDLE = "anofpdm_brats21"
COMMON = REPO / "bundles" / "common" / "configs"


def _workflow_files(workflow: str) -> list[str]:
    """The config files of a workflow as the README runs it (a multi-GPU file on top of its single-process one)."""
    if workflow.startswith("multi_gpu_"):
        return config_files(BUNDLE, workflow.removeprefix("multi_gpu_"), workflow)
    return config_files(BUNDLE, workflow)


def _created(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --------------------------------------------------------------------------------------------------------------------
# booleans
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        *[(word, True) for word in ("true", "True", "TRUE", "yes", "Yes", "on", "ON", "1", " true ")],
        *[(word, False) for word in ("false", "False", "FALSE", "no", "NO", "off", "Off", "0")],
    ],
)
def test_flag_reads_every_spelling(value, expected):
    assert options.flag(value, "use_ema") is expected


@pytest.mark.parametrize("value", ["maybe", "", "flase", 2, -1, 0.0, None, [True]])
def test_flag_refuses_anything_else_naming_the_option(value):
    with pytest.raises(ValueError) as info:
        options.flag(value, "use_ema")
    assert str(info.value) == f"--use_ema must be true or false, got {value!r}"


def test_every_boolean_option_of_every_workflow_is_read_through_flag():
    """A boolean option used as ``@key`` directly would take the string "false" for true again."""
    booleans = set()
    for workflow in WORKFLOWS:
        defaults = options.config_defaults(_workflow_files(workflow))
        booleans |= {k for k, v in defaults.items() if options.option_kind(k, v) == "bool"}
    assert {"use_ema", "overwrite", "debug", "resume", "amp", "progress"} <= booleans
    for path in sorted(COMMON.glob("*.json")):
        text = path.read_text()
        for name in booleans:
            for match in re.finditer(rf"@{name}\b", text):
                before = text[max(0, match.start() - 60) : match.start()]
                through_flag = before.endswith("flag(") and text[match.end() :].startswith(f", '{name}')")
                through_install = name == "debug" and before.endswith("errors.install(debug=")
                assert through_flag or through_install, f"{path.name}: @{name} not read through options.flag"


def test_debug_is_read_like_every_boolean(monkeypatch):
    """``install`` reads ``--debug`` through ``flag``; a bad value is refused with the one-line hook in place."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    install(debug="false")
    with pytest.raises(ValueError, match=r"^--debug must be true or false, got 'maybe'$"):
        install(debug="maybe")
    assert sys.excepthook is not sys.__excepthook__


@pytest.fixture(scope="module")
def ema_model(tmp_path_factory) -> dict:
    """A checkpoint whose EMA weights differ from its raw ones, calibrated for the EMA weights."""
    root = tmp_path_factory.mktemp("ema_model")
    pre = VolumePreprocessor(modalities=BRATS, image_size=SIZE)
    ckpt = save_checkpoint(root / "model.pt", _tiny_net(seed=0), ema=_tiny_net(seed=1), preprocessing=pre.to_dict())
    cal = Calibration(
        guidance_scale=2.0,
        m_max=[0.05, 0.05],
        m_max_joint=0.05,
        tau=0.5,
        settings=AnoFPDMSettings(timesteps=GRID, min_component_size=3),
        map_modalities=["flair", "t2"],
        map_channels=[0, 3],
        checkpoint_digest=load_network(ckpt)[1]["digest"],
        preprocessing=pre.to_dict(),
        datalist="synthetic [validation]",
    )
    return {"root": root, "checkpoint": ckpt, "calibration": cal.save(root / "calibration.json")}


@pytest.mark.parametrize("value, weights", [("false", "model"), ("OFF", "model"), ("0", "model"), ("yes", "ema")])
@pytest.mark.parametrize("workflow", ["inference", "calibrate"])
def test_use_ema_in_the_config_loads_the_weights_it_says(ema_model, workflow, value, weights):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=config_files(BUNDLE, workflow), checkpoint=str(ema_model["checkpoint"]), use_ema=value
    )
    network, info = wf.parser.get_parsed_content("model")
    assert info["weights"] == weights
    expected = load_network(ema_model["checkpoint"], use_ema=weights == "ema")[0].state_dict()
    for key, tensor in network.state_dict().items():
        torch.testing.assert_close(tensor, expected[key], msg=key)


def test_run_workflow_use_ema_false_uses_the_raw_weights(ema_model, tmp_path, monkeypatch):
    """The raw weights are not the ones the calibration was made with: refused as such (with "false" read as
    true, the EMA weights were loaded and the calibration accepted)."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # initialize installs the one-line hook
    common = {"checkpoint": str(ema_model["checkpoint"]), "calibration": str(ema_model["calibration"])}
    with pytest.raises(RuntimeError) as info:
        run_workflow(BUNDLE, "inference", output_dir=str(tmp_path / "out"), device="cpu", use_ema="false", **common)
    cause = root_cause(info.value)
    assert isinstance(cause, CalibrationError), cause
    assert "-model" in str(cause) and "-ema" in str(cause), cause


# --------------------------------------------------------------------------------------------------------------------
# unknown options, types and values
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "workflow, overrides, message",
    [
        ("inference", {"strid": 10}, "unknown option --strid (did you mean --stride?)"),
        ("train", {"num_epoch": 2}, "unknown option --num_epoch (did you mean --num_epochs?)"),
        ("inference", {"config_files": "x.json"}, "unknown option --config_files (did you mean --config_file?)"),
        ("inference", {"xyzzy": 1}, "unknown option --xyzzy (--help lists the options)"),
        ("train", {"stride": 2}, "unknown option --stride (--help lists the options)"),
        ("inference", {"netwrk#size": 1}, "unknown option --netwrk#size (did you mean --network?)"),
        ("inference", {"stride": "ten"}, "--stride must be an integer, got 'ten'"),
        ("calibrate", {"seed": "abc"}, "--seed must be an integer, got 'abc'"),
        ("train", {"num_epochs": 2.5}, "--num_epochs must be an integer, got 2.5"),
        ("train", {"learning_rate": "fast"}, "--learning_rate must be a number, got 'fast'"),
        ("train", {"network_size": 3}, "--network_size must be a string, got 3"),
        ("evaluate", {"seeds": [0, "a"]}, "--seeds must be a list of integers, got [0, 'a']"),
        ("calibrate", {"guidance_scales": 2.0}, "--guidance_scales must be a list of numbers, got 2.0"),
        ("inference", {"overwrite": "sure"}, "--overwrite must be true or false, got 'sure'"),
        ("train", {"amp": "maybe"}, "--amp must be true or false, got 'maybe'"),
        ("train", {"resume": 2}, "--resume must be true or false, got 2"),
        ("inference", {"median_kernel": 4}, "--median_kernel must be odd, got 4"),
        ("evaluate", {"median_kernel": 0}, "--median_kernel must be >= 1, got 0"),
        ("calibrate", {"forward": "sideways"}, "--forward must be one of ['ddim', 'ddpm'], got 'sideways'"),
        ("calibrate", {"stride": 0}, "--stride must be >= 1"),
        ("inference", {"timesteps": "abc"}, "--timesteps must be a list of integers, got 'abc'"),
        ("inference", {"amp": True}, "unknown option --amp (replaced by --precision: fp32, bf16 or fp16)"),
        ("calibrate", {"precision": "fp64"}, "--precision must be one of ['fp32', 'bf16', 'fp16'], got 'fp64'"),
        ("evaluate", {"precision": 16}, "--precision must be a string, got 16"),
        ("calibrate", {"end_step_inclusive": "maybe"}, "--end_step_inclusive must be true or false, got 'maybe'"),
        ("calibrate", {"inversion_timing": "late"}, "--inversion_timing must be one of ['aligned', 'official']"),
        ("calibrate", {"preset": 1}, "--preset must be a string, got 1"),
    ],
)
def test_check_refuses_in_one_line_naming_the_option(workflow, overrides, message):
    with pytest.raises(ValueError) as info:
        options.check(_workflow_files(workflow), overrides)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "workflow, overrides",
    [
        ("train", {"train#trainer#max_epochs": 3, "noise_schedule::beta_end": 0.02, "network_def#dropout": 0.0}),
        ("multi_gpu_inference", {"dataset#data": "$[]", "stride": 10, "use_ema": "False"}),
        ("inference", {"config_file": "x", "meta_file": "m", "logging_file": False, "run_id": "run", "help": True}),
        ("inference", {"tracking": "mlflow", "experiment_name": "e", "run_name": "r"}),
        ("inference", {"seed": "$1 + 1", "precision": "bf16", "output_dir": Path("/tmp/x"), "device": "cpu"}),
        ("inference", {"guidance_scale": 3, "t_max": 300, "stride": None, "median_kernel": 3, "input_dir": None}),
        ("train", {"learning_rate": 1, "time_limit": 4, "progress": "off", "resume": 0, "amp": "no"}),
        ("evaluate", {"seeds": (0, 1), "methods": ["anofpdm"], "classifier_scales": [1, 2.5]}),
    ],
)
def test_check_accepts_what_the_workflow_accepts(workflow, overrides):
    options.check(_workflow_files(workflow), overrides)


def test_option_kinds_name_options_of_the_configs():
    """No stale entry in OPTION_KINDS, and every option whose default is null (or an expression the user sets) has
    a kind."""
    defaults = {}
    for workflow in WORKFLOWS:
        defaults.update(options.config_defaults(_workflow_files(workflow)))
    assert sorted(set(options.OPTION_KINDS) - set(defaults)) == []
    untyped = [k for k, v in defaults.items() if v is None and k not in options.OPTION_KINDS]
    assert untyped == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"strid": 10}, "unknown option --strid (did you mean --stride?)"),
        ({"seed": "abc"}, "--seed must be an integer, got 'abc'"),
        ({"median_kernel": 4}, "--median_kernel must be odd, got 4"),
        ({"use_ema": "maybe"}, "--use_ema must be true or false, got 'maybe'"),
    ],
)
def test_run_workflow_refuses_before_any_work(tmp_path, overrides, message):
    """Nothing is created and nothing is read (the checkpoint does not exist)."""
    common = {"bundle_root": str(tmp_path / "root"), "checkpoint": str(tmp_path / "none.pt"), "device": "cpu"}
    with pytest.raises(ValueError) as info:
        run_workflow(BUNDLE, "inference", **common, **overrides)
    assert str(info.value) == message
    assert _created(tmp_path) == []


def test_run_workflow_help_prints_the_options_and_runs_nothing(tmp_path, capsys):
    assert run_workflow(BUNDLE, "calibrate", bundle_root=str(tmp_path / "root"), help=True) is None
    out = capsys.readouterr().out
    assert out.startswith(f"{BUNDLE} calibrate: python -m monai.bundle run")
    for line in ("  --use_ema ", "  --median_kernel ", "  --tolerance ", "  --guidance_scales "):
        assert line in out, out
    assert re.search(r"^  --batch_size +64$", out, re.M) and re.search(r"^  --use_ema +true$", out, re.M), out
    assert "  --network_def " not in out and "  --imports " not in out  # components are not options
    assert _created(tmp_path) == []


# --------------------------------------------------------------------------------------------------------------------
# the command line, read as fire reads it
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--config_file", "['a.json', 'b.json']", "--use_ema", "false", "--seed=3", "--stride", "-1"],
        ["training", "--config_file", "a.json", "--use-ema", "False", "--nodebug", "--amp"],
        ["--config_file", "a.json", "--help"],
        ["--config_file", "a.json", "-h", "--guidance_scales", "[1.0,3.0]", "--timesteps", "0,10", "--x#y", "{a: 1}"],
        ["--config_file", "a.json", "--checkpoint", "/data/model.pt", "--seed", "007", "--device", "cuda:1"],
    ],
)
def test_parse_command_line_reads_what_fire_passes(args):
    """The same keyword arguments as fire gives MONAI's ``run`` (a function with its signature)."""
    from monai.bundle import scripts

    passed = {}

    def run(
        run_id=None,
        init_id=None,
        final_id=None,
        meta_file=None,
        config_file=None,
        logging_file=None,
        tracking=None,
        args_file=None,
        **override,
    ):
        passed.update({k: v for k, v in locals().items() if k not in ("override", "passed") and v is not None})
        passed.update(override)

    assert list(inspect.signature(scripts.run).parameters)[:8] == list(inspect.signature(run).parameters)[:8]
    fire.Fire({"run": run}, command=["run", *args])
    assert options.parse_command_line(["run", *args]) == ("run", passed)


def test_check_command_line_does_nothing_for_a_workflow_run_from_python(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["x", "run", "--config_file", str(config_files(BUNDLE, "train")), "--strid", "1"])
    assert options.command_line() is None  # pytest is __main__, not monai.bundle
    options.check_command_line()


# --------------------------------------------------------------------------------------------------------------------
# the bundle command itself
# --------------------------------------------------------------------------------------------------------------------


def _bundle(workflow: str, overrides: dict, cwd: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config_files(BUNDLE, workflow))]
    for key, value in overrides.items():
        cmd += [f"--{key}"] if value is None else [f"--{key}", str(value)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_bundle_command_help_and_refusals_create_nothing(tmp_path):
    """``--help`` exits 0 listing the options; a typo and a bad median kernel exit 2 with one line; none of them
    creates a folder (``bundle_root``, hence every default output, points into an empty folder here)."""
    work = tmp_path / "work"
    work.mkdir()
    common = {"bundle_root": tmp_path / "root", "checkpoint": tmp_path / "none.pt", "device": "cpu"}
    runs = {
        "help": ({"help": None}, None),
        "typo": ({"strid": 10}, "error: ValueError: unknown option --strid (did you mean --stride?)"),
        "median": ({"median_kernel": 4}, "error: ValueError: --median_kernel must be odd, got 4"),
    }
    procs = {name: _bundle("inference", {**common, **overrides}, work) for name, (overrides, _) in runs.items()}
    done = {name: _finish(proc) for name, proc in procs.items()}
    assert done["help"].returncode == 0, done["help"].stderr[-3000:]
    out = done["help"].stdout
    assert f"{BUNDLE} inference: python -m monai.bundle run" in out, out
    assert re.search(r"^  --overwrite +false$", out, re.M) and re.search(r"^  --stride +null$", out, re.M), out
    for name in ("typo", "median"):
        proc = done[name]
        assert proc.returncode == 2, (name, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert lines == [runs[name][1]], proc.stderr[-3000:]
    assert _created(tmp_path) == ["work"]


def test_bundle_command_overwrite_false_does_not_overwrite(ema_model, tmp_path, monkeypatch):
    """Finished cases (written by the same workflow from Python) are skipped by ``--overwrite false`` and left as
    they were; with "false" read as true they were recomputed."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    input_dir = tmp_path / "BraTS2021_Training_Data"
    case = "BraTS2021_00001"
    make_case(phantom_anatomy((32, 40, 24)), input_dir, case, num_lesions=1, file_pattern="{case}_{modality}.nii.gz")
    out = tmp_path / "out"
    common = {
        "input_dir": str(input_dir),
        "checkpoint": str(ema_model["checkpoint"]),
        "calibration": str(ema_model["calibration"]),
        "output_dir": str(out),
        "device": "cpu",
        "progress": False,
    }
    run_workflow(BUNDLE, "inference", **common)
    assert json.loads((out / "inference_summary.json").read_text())["done"] == [case]
    written = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted((out / case).iterdir())}
    assert written
    proc = _finish(_bundle("inference", {**common, "overwrite": "false"}, tmp_path))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    summary = json.loads((out / "inference_summary.json").read_text())
    assert summary["done"] == [] and summary["skipped"] == [case], summary
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted((out / case).iterdir())} == written

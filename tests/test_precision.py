"""The numeric mode (issue 22): one ``precision`` setting for calibration, inference and evaluation, recorded in the
calibration and the outputs' provenance; a calibration made at one precision is refused at another.

The network here records whether it runs under autocast and at which dtype, so every claim about the mode a path
uses is checked where the network is called.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from test_volume_inference import BRATS, GRID, SIZE, _absolute, _tiny_net

from anofpdm_monai.apps.inference import VolumeInferer
from anofpdm_monai.calibration import Calibration, CalibrationError
from anofpdm_monai.data import VolumePreprocessor
from anofpdm_monai.data.synthetic import make_case, phantom_anatomy
from anofpdm_monai.inferers import AnoFPDMInferer
from anofpdm_monai.networks import load_network, save_checkpoint
from anofpdm_monai.settings import CALIBRATED_FIELDS, PRECISIONS, AnoFPDMSettings, autocast_dtype


class ModeRecorder(nn.Module):
    """eps = 0.3 x (null) or 0.3 x + 0.1 relu(x) (healthy), via a linear layer so that autocast changes its dtype;
    records (autocast enabled, autocast dtype, output dtype) of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.scale.weight.fill_(0.3)
        self.modes: set[tuple[bool, torch.dtype, torch.dtype]] = set()

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        eps = self.scale(x.unsqueeze(-1)).squeeze(-1)
        self.modes.add((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), eps.dtype))
        healthy = (class_labels == 1).view(-1, 1, 1, 1)
        return torch.where(healthy, eps + 0.1 * torch.relu(x), eps)


def test_precision_is_a_checked_calibrated_setting():
    assert PRECISIONS == ("fp32", "bf16", "fp16")
    assert AnoFPDMSettings().precision == "fp32"  # the official code's mode, until a GPU measurement says otherwise
    assert "precision" in CALIBRATED_FIELDS
    assert [autocast_dtype(p) for p in PRECISIONS] == [None, torch.bfloat16, torch.float16]
    assert AnoFPDMSettings(precision="bf16").autocast_dtype is torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        AnoFPDMSettings(precision="fp64")
    assert AnoFPDMSettings().differences(AnoFPDMSettings(precision="bf16"))  # a calibration mismatch


@pytest.mark.parametrize(
    ("precision", "expected"), [("fp32", (False, torch.float32)), ("bf16", (True, torch.bfloat16))]
)
def test_the_network_runs_in_the_settings_mode_and_maps_stay_float32(precision, expected):
    x = torch.rand(3, 4, 8, 8) * 1.8 - 0.9
    net = ModeRecorder()
    inferer = AnoFPDMInferer(
        map_channels=[0, 3], timesteps=[0, 100, 200], m_max=[0.05, 0.05], tau=0.5, seed=0, precision=precision
    )
    out = inferer(x, net)
    assert {(enabled, out_dtype) for enabled, _, out_dtype in net.modes} == {expected}
    if precision == "bf16":
        assert {dtype for _, dtype, _ in net.modes} == {torch.bfloat16}
    # everything after the network is float32 in both modes
    assert out.anomaly_map.dtype == out.divergence.dtype == torch.float32
    assert torch.isfinite(out.anomaly_map).all()


def test_bf16_changes_the_numbers_but_not_grossly():
    """The mode is real (bf16 moves M_t) and the bf16 path is not broken (it stays near fp32) on an analytic net."""
    x = torch.rand(4, 4, 8, 8) * 1.8 - 0.9
    common = dict(map_channels=[0, 3], timesteps=[0, 100, 200], m_max=[0.05, 0.05], tau=0.5, seed=0)
    full = AnoFPDMInferer(precision="fp32", **common)(x, ModeRecorder())
    half = AnoFPDMInferer(precision="bf16", **common)(x, ModeRecorder())
    assert not torch.equal(full.divergence, half.divergence)
    torch.testing.assert_close(half.divergence, full.divergence, rtol=0.05, atol=1e-4)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("precision")
    pre = VolumePreprocessor(modalities=BRATS, image_size=SIZE)
    ckpt = save_checkpoint(root / "model.pt", _tiny_net(), preprocessing=pre.to_dict())
    cal = Calibration(
        guidance_scale=2.0,
        m_max=[0.05, 0.05],
        m_max_joint=0.05,
        tau=0.5,
        settings=AnoFPDMSettings(timesteps=GRID, min_component_size=3, health_score="cosine", precision="fp32"),
        map_modalities=["flair", "t2"],
        map_channels=[0, 3],
        checkpoint_digest=load_network(ckpt)[1]["digest"],
        preprocessing=pre.to_dict(),
        datalist="synthetic [validation]",
    )
    case = _absolute(make_case(phantom_anatomy((32, 40, 12)), root, "case0", num_lesions=1, seed=3), root)
    return {"checkpoint": ckpt, "calibration": cal.save(root / "calibration.json"), "case": case}


def test_the_calibration_file_records_its_precision(model):
    data = json.loads(model["calibration"].read_text())
    assert data["settings"]["precision"] == "fp32"
    assert Calibration.load(model["calibration"]).settings.precision == "fp32"


def test_inference_refuses_a_calibration_made_at_another_precision(model):
    with pytest.raises(CalibrationError) as info:
        VolumeInferer.from_files(model["checkpoint"], model["calibration"], precision="bf16", progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert "precision" in message and "calibration" in message and str(model["calibration"]) in message


def test_inference_runs_at_the_calibration_precision_and_records_it(model, tmp_path):
    vi = VolumeInferer.from_files(model["checkpoint"], model["calibration"], progress=False)
    assert vi.inferer.settings.precision == "fp32" and vi.inferer.autocast_dtype is None
    summary = vi.run([model["case"]], tmp_path / "out")
    assert summary["done"] == ["case0"]
    (provenance,) = (tmp_path / "out").glob("case0*/*_provenance.json")
    made_with = json.loads(provenance.read_text())["made_with"]
    assert made_with["calibration"]["settings"]["precision"] == "fp32"

"""The methods the evaluation compares (docs/method.md §7), with what each is tuned with."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MethodSpec", "METHODS", "ANOFPDM_METHODS", "DEFAULT_METHODS"]


@dataclass(frozen=True)
class MethodSpec:
    """One row of the evaluation table.

    Attributes:
        label: table label (``{channel}`` is replaced by the intensity modality).
        pixel_labels: tuned WITH pixel labels on the validation split (else image labels only).
        stochastic: run over several seeds.
        anofpdm: an AnoFPDM variant (shares the forward process of its forward mode).
        forward: the forward mode of an AnoFPDM variant.
        needs_classifier: needs a separately trained noise-conditioned classifier (``classifier_checkpoint``).
    """

    label: str
    pixel_labels: bool
    stochastic: bool = False
    anofpdm: bool = False
    forward: str = "ddim"
    needs_classifier: bool = False

    @property
    def tuning(self) -> str:
        return "pixel labels" if self.pixel_labels else "image labels only"


#: method key -> spec
METHODS: dict[str, MethodSpec] = {
    "anofpdm": MethodSpec("AnoFPDM (DDIM)", pixel_labels=False, anofpdm=True),
    "anofpdm_ddpm": MethodSpec("AnoFPDM (DDPM)", pixel_labels=False, stochastic=True, anofpdm=True, forward="ddpm"),
    "anofpdm_tuned": MethodSpec("AnoFPDM (DDIM), threshold tuned", pixel_labels=True, anofpdm=True),
    "anofpdm_last": MethodSpec("AnoFPDM (DDIM), S_te only", pixel_labels=False, anofpdm=True),
    "anoddpm": MethodSpec("AnoDDPM (Gaussian)", pixel_labels=True, stochastic=True),
    "ddim": MethodSpec("DDIM", pixel_labels=True),
    "ddim_cfg": MethodSpec("DDIM + classifier-free guidance", pixel_labels=True),
    "ddim_clf": MethodSpec("DDIM + classifier guidance", pixel_labels=True, needs_classifier=True),
    "intensity": MethodSpec("{channel} intensity threshold", pixel_labels=True),
}
ANOFPDM_METHODS = tuple(k for k, v in METHODS.items() if v.anofpdm)
#: the methods evaluated by default: every one that needs nothing beyond the diffusion checkpoint
DEFAULT_METHODS = tuple(k for k, v in METHODS.items() if not v.needs_classifier)

"""anofpdm_monai: AnoFPDM weakly-supervised anomaly segmentation of brain MRI on MONAI.

Subpackages: ``data`` (datalists, transforms, slice cache), ``networks`` (class-conditioned DiffusionModelUNet,
checkpoints), ``engines`` (classifier-free training), ``inferers`` (AnoFPDM, baselines, volume inference), and the
modules ``calibration``, ``metrics`` and ``visualize``.
"""

__version__ = "0.1.0"

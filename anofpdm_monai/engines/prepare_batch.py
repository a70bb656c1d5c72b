"""Batches for MONAI engines: classifier-free-guidance training batches, noisy slice batches of the noise-conditioned
classifier, and slice batches with their image-level labels (the calibration evaluator)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import DiffusionPrepareBatch
from monai.inferers import DiffusionInferer
from monai.utils import CommonKeys, convert_to_tensor

from ..networks.unet import NULL
from ..schedule import NoiseSchedule, classifier_free_guidance

__all__ = [
    "ClassifierFreePrepareBatch",
    "ClassConditionedDiffusionInferer",
    "LabelledNetwork",
    "NoisyClassifierPrepareBatch",
    "SliceLabelPrepareBatch",
]


def _rank() -> int:
    """Rank of this process in the default process group (0 when not distributed)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class ClassifierFreePrepareBatch(DiffusionPrepareBatch):
    """``DiffusionPrepareBatch`` that also passes slice labels, each replaced by the null label with probability
    ``p_uncond`` (classifier-free guidance training).

    MONAI's prepare-batches and inferers pass ``condition`` (a context tensor) but never ``class_labels``; this one
    returns ``(images, noise, (), {"noise", "timesteps", "class_labels"})`` for
    :class:`ClassConditionedDiffusionInferer`.

    With ``seed`` set, all randomness (timesteps, noise, label dropout) comes from a private generator, restarted at
    every ``EPOCH_STARTED`` of the engine it is attached to: a validation loss computed this way is comparable
    between evaluations. Without it, a private generator (seeded from torch's global RNG on first use) is used and
    its state is saved in checkpoints through ``state_dict`` for exact resumption.

    Only what the loss uses goes to the device: the images (as plain tensors, without ``MetaTensor`` metadata), the
    noise, the timesteps and the labels; other batch entries (pixel labels, brain masks, ids) stay where they are.
    The random values are drawn on the images' device: on the CPU straight from the private (CPU) generator, as
    before; on another device (CUDA) from a generator on that device, re-seeded at every batch with a value drawn
    from the private generator. The private generator's state is therefore still all there is to checkpoint (the same
    ``state_dict`` as before) and resumption stays exact; the CUDA streams differ from the CPU ones.

    Args:
        num_train_timesteps: T; timesteps are drawn uniformly from [0, T).
        label_key: batch key of the slice labels (0 healthy, 1 unhealthy).
        p_uncond: probability of replacing a label by the null label.
        null_label: index of the null label.
        seed: restart seed for deterministic (validation) batches.
        max_timestep: draw t from [0, max_timestep) instead of [0, T) (None: T, as the papers). A model that will
            only be queried at small t (e.g. AnoFPDM with t_max 300) then trains on the steps it is used at; the
            schedule itself is unchanged.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        label_key: str = "class_label",
        p_uncond: float = 0.1,
        null_label: int = NULL,
        seed: int | None = None,
        max_timestep: int | None = None,
    ) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name=None)
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
        if max_timestep is not None and not 0 < int(max_timestep) <= num_train_timesteps:
            raise ValueError(f"max_timestep must be in (0, {num_train_timesteps}], got {max_timestep}")
        self.max_timestep = num_train_timesteps if max_timestep is None else int(max_timestep)
        self.label_key = label_key
        self.p_uncond = float(p_uncond)
        self.null_label = int(null_label)
        self.seed = seed
        self.generator = torch.Generator()
        if seed is None:
            # distinct streams per rank under DistributedDataParallel (ranks share the global seed)
            self.generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()) + _rank())
        else:
            self.generator.manual_seed(seed)
        self._device_generators: dict[torch.device, torch.Generator] = {}
        self._batch_generator: torch.Generator | None = None  # the generator of the batch being prepared

    @staticmethod
    def _draws_from_private_generator(device: torch.device) -> bool:
        """Whether the values for ``device`` come straight from the private CPU generator (the CPU), or from a
        per-batch re-seeded generator on the device."""
        return device.type == "cpu"

    def _start_batch(self, device: torch.device | str | None) -> torch.Generator:
        """The generator of the next batch on ``device`` (see the class docstring)."""
        device = torch.device("cpu") if device is None else torch.device(device)
        if self._draws_from_private_generator(device):
            self._batch_generator = self.generator
        else:
            g = self._device_generators.get(device)
            if g is None:
                g = self._device_generators[device] = torch.Generator(device=device)
            # a CPU draw (no device synchronisation) of the batch's seed
            g.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.generator)))
            self._batch_generator = g
        return self._batch_generator

    def _rng(self, device: torch.device) -> torch.Generator:
        g = self._batch_generator
        if g is None or g.device != device:  # a hook called outside __call__
            g = self._start_batch(device)
        return g

    # hooks of DiffusionPrepareBatch, drawn on the images' device (see the class docstring)
    def get_noise(self, images: torch.Tensor) -> torch.Tensor:
        g = self._rng(images.device)
        return torch.randn(images.shape, generator=g, dtype=images.dtype, device=images.device)

    def get_timesteps(self, images: torch.Tensor) -> torch.Tensor:
        g = self._rng(images.device)
        return torch.randint(0, self.max_timestep, (images.shape[0],), generator=g, device=images.device)

    def get_class_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Replace each label by ``null_label`` with probability ``p_uncond`` (``labels`` on the images' device)."""
        labels = labels.reshape(-1).long()
        drop = torch.rand(labels.shape, generator=self._rng(labels.device), device=labels.device) < self.p_uncond
        return torch.where(drop, torch.full_like(labels, self.null_label), labels)

    def _images(
        self, batchdata: Mapping[str, Any], device: str | torch.device | None, non_blocking: bool, **kwargs: Any
    ) -> torch.Tensor:
        """The images on the device as a plain tensor; starts the batch's generator."""
        images = convert_to_tensor(batchdata[CommonKeys.IMAGE], track_meta=False)
        images = images.to(device=device, non_blocking=non_blocking, **kwargs)
        self._start_batch(images.device)
        return images

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        if not isinstance(batchdata, Mapping) or self.label_key not in batchdata:
            raise KeyError(f"batch must be a dict with key '{self.label_key}' (slice labels)")
        images = self._images(batchdata, device, non_blocking, **kwargs)
        # the order of the draws is the order of DiffusionPrepareBatch (noise, timesteps), then the label dropout
        noise = self.get_noise(images)
        timesteps = self.get_timesteps(images)
        labels = torch.as_tensor(batchdata[self.label_key]).to(images.device, non_blocking=non_blocking)
        infer_kwargs = {"noise": noise, "timesteps": timesteps, "class_labels": self.get_class_labels(labels)}
        return images, self.get_target(images, noise, timesteps), (), infer_kwargs

    # ignite-style handler: restart the generator at each epoch of the engine (validation determinism)
    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        if self.seed is not None:
            engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.generator.manual_seed(self.seed))

    def state_dict(self) -> dict[str, Any]:
        """The generator state (checkpointed with the model for exact resumption)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the generator state.

        Checkpoints are written by rank 0 only, so under DistributedDataParallel every rank reads rank 0's state;
        the other ranks then derive a distinct stream from it (rank 0 continues exactly), otherwise all ranks would
        draw the same timesteps and noise after a resume.
        """
        self.generator.set_state(state["generator"])
        rank = _rank()
        if rank > 0 and self.seed is None:
            offset = int(torch.randint(0, 2**62, (1,), generator=self.generator).item())
            self.generator.manual_seed(offset + rank)


class ClassConditionedDiffusionInferer(DiffusionInferer):
    """``DiffusionInferer`` whose training forward passes ``class_labels`` to the network.

    The noisy input is computed with MONAI's scheduler in the input's dtype (float32 during training; AMP only
    affects the network), and the network is called as ``network(x_t, timesteps=t, class_labels=y)``.
    """

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        diffusion_model: torch.nn.Module,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
        mode: str = "crossattn",
        seg: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if class_labels is None:
            raise ValueError("class_labels are required for the class-conditioned network")
        noisy = self.scheduler.add_noise(original_samples=inputs, noise=noise, timesteps=timesteps)
        return diffusion_model(noisy, timesteps=timesteps, class_labels=class_labels)

    def sample(  # type: ignore[override]
        self,
        input_noise: torch.Tensor,
        diffusion_model: torch.nn.Module,
        scheduler: Any = None,
        save_intermediates: bool | None = False,
        intermediate_steps: int | None = 100,
        class_labels: torch.Tensor | int | None = None,
        guidance_scale: float | None = None,
        verbose: bool = True,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """MONAI's sampling loop (``DiffusionInferer.sample``) for the class-conditioned network: slices of class
        ``class_labels`` (0 healthy, 1 unhealthy; one per sample or one for all), with classifier-free guidance
        ``eps = (1 + w) eps_y - w eps_null`` when ``guidance_scale`` w is given. E.g. healthy samples with DDIM:
        ``scheduler = DDIMScheduler(...); scheduler.set_timesteps(50); inferer.sample(noise, net, scheduler,
        class_labels=0, guidance_scale=2.0)``.

        Raises:
            ValueError: without ``class_labels`` (the network has no unconditional mode but the null label).
        """
        _no_conditioning("sample", kwargs)
        model = LabelledNetwork(diffusion_model, _labels(class_labels, input_noise, "sample"), guidance_scale)
        return super().sample(
            input_noise,
            model,  # type: ignore[arg-type]
            scheduler=scheduler,
            save_intermediates=save_intermediates,
            intermediate_steps=intermediate_steps,
            verbose=verbose,
        )

    def get_likelihood(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        diffusion_model: torch.nn.Module,
        scheduler: Any = None,
        save_intermediates: bool | None = False,
        class_labels: torch.Tensor | int | None = None,
        original_input_range: tuple = (-1, 1),
        scaled_input_range: tuple = (-1, 1),
        verbose: bool = True,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """MONAI's variational bound (``DiffusionInferer.get_likelihood``, a DDPM scheduler) of ``inputs`` under the
        class ``class_labels`` (the null label 2 for the unconditional model). The slices are in [-1, 1], which is
        the default input range here (MONAI's default is 0..255 scaled to 0..1).

        Raises:
            ValueError: without ``class_labels``.
        """
        _no_conditioning("get_likelihood", kwargs)
        model = LabelledNetwork(diffusion_model, _labels(class_labels, inputs, "get_likelihood"))
        return super().get_likelihood(
            inputs,
            model,  # type: ignore[arg-type]
            scheduler=scheduler,
            save_intermediates=save_intermediates,
            original_input_range=original_input_range,
            scaled_input_range=scaled_input_range,
            verbose=verbose,
        )


class LabelledNetwork:
    """The class-conditioned network as MONAI's inferers call an unconditioned one,
    ``model(x, timesteps=t, context=None)``: the labels are fixed here, and with ``guidance_scale`` w the output is
    the classifier-free guided ``(1 + w) eps_y - w eps_null`` (one batched call for both labels). A one-element
    ``timesteps`` (MONAI's sampling loop passes ``Tensor((t,))``) is applied to every slice."""

    def __init__(self, network: Any, class_labels: torch.Tensor, guidance_scale: float | None = None) -> None:
        self.network = network
        self.class_labels = class_labels
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: Any = None) -> torch.Tensor:
        b = x.shape[0]
        t = torch.as_tensor(timesteps, device=x.device).reshape(-1).long()
        t = t.expand(b) if t.numel() == 1 else t
        y = self.class_labels.to(x.device)
        if self.guidance_scale is None:
            return self.network(x, timesteps=t, class_labels=y)
        eps = self.network(
            torch.cat([x, x]), timesteps=torch.cat([t, t]), class_labels=torch.cat([y, torch.full_like(y, NULL)])
        )
        return classifier_free_guidance(eps[:b], eps[b:], self.guidance_scale)


def _labels(class_labels: torch.Tensor | int | None, like: torch.Tensor, method: str) -> torch.Tensor:
    if class_labels is None:
        raise ValueError(
            f"{method}() of the class-conditioned network needs class_labels (0 healthy, 1 unhealthy, {NULL} null)"
        )
    y = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    if y.numel() == 1:
        y = y.expand(like.shape[0])
    if y.numel() != like.shape[0]:
        raise ValueError(f"{method}(): {y.numel()} class_labels for a batch of {like.shape[0]}")
    return y.clone()


def _no_conditioning(method: str, kwargs: Mapping[str, Any]) -> None:
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in ("mode",))
    if unknown:
        raise ValueError(f"{method}(): the class-conditioned network takes class_labels, not {unknown}")


class NoisyClassifierPrepareBatch(ClassifierFreePrepareBatch):
    """Batches of the noise-conditioned slice classifier: each slice noised to a uniformly drawn step,
    ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with the diffusion model's schedule, and its slice label (0
    healthy, 1 unhealthy) as the target.

    Returns ``(x_t, labels, (), {"timesteps": t})``, so that MONAI's ``SimpleInferer`` calls
    ``classifier(x_t, timesteps=t)``. Timesteps and noise come from the private generator of
    :class:`ClassifierFreePrepareBatch` (``seed`` for a validation accuracy that is comparable between evaluations,
    ``state_dict`` for exact resumption).

    Args:
        schedule: the diffusion model's :class:`~anofpdm_monai.schedule.NoiseSchedule`.
        label_key: batch key of the slice labels.
        seed: restart seed for deterministic (validation) batches.
        max_timestep: draw t from [0, max_timestep) instead of [0, T).
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        label_key: str = "class_label",
        seed: int | None = None,
        max_timestep: int | None = None,
    ) -> None:
        super().__init__(
            num_train_timesteps=schedule.num_train_timesteps,
            label_key=label_key,
            p_uncond=0.0,
            seed=seed,
            max_timestep=max_timestep,
        )
        self.schedule = schedule

    def __call__(  # type: ignore[override]
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        if not isinstance(batchdata, Mapping) or self.label_key not in batchdata:
            raise KeyError(f"batch must be a dict with key '{self.label_key}' (slice labels)")
        images = self._images(batchdata, device, non_blocking, **kwargs)
        timesteps = self.get_timesteps(images)
        x_t = self.schedule.q_sample(images, timesteps, self.get_noise(images))
        labels = torch.as_tensor(batchdata[self.label_key]).reshape(-1).long().to(images.device)
        return x_t, labels, (), {"timesteps": timesteps}


class SliceLabelPrepareBatch:
    """MONAI prepare-batch of slice batches: the images to the device (plain tensors) and the slice labels
    (``class_label``, 0 healthy, 1 unhealthy) as the target, e.g. for the calibration evaluator; a batch of
    :class:`~anofpdm_monai.data.SliceDataset` items also gives the inferer the slices' ``case_id`` and
    ``slice_index`` (keyword arguments), from which
    :class:`~anofpdm_monai.calibration.CalibrationInferer` keys each slice's forward noise."""

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: torch.device | str | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, tuple, dict[str, Any]]:
        image = convert_to_tensor(batchdata["image"], track_meta=False)
        image = image.to(device=device, non_blocking=non_blocking)
        labels = torch.as_tensor(batchdata["class_label"]).reshape(-1)
        if "slice_index" not in batchdata:
            return image, labels
        return image, labels, (), {"case_id": batchdata.get("case_id"), "slice_index": batchdata["slice_index"]}

"""Ignite/MONAI handlers for training: resumable atomic checkpoints, RNG state, a wall-clock budget and
healthy-guided reconstruction previews.

Every handler has ``attach(engine)``, so it can be listed in ``train_handlers`` of a MONAI ``SupervisedTrainer``.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

from ..inferers.reconstruction import ddim_decode, ddim_encode, reconstruction_grid
from ..io import atomic_link, first_line, torch_save
from ..networks.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, unwrap
from ..networks.unet import HEALTHY, NULL
from ..schedule import NoiseSchedule
from ..settings import DEFAULT_GUIDANCE_SCALE
from ..visualize import save_reconstruction_grid, save_sample_grid

__all__ = [
    "RNGState",
    "EMAState",
    "TrainingCheckpointer",
    "TimeBudget",
    "ReconstructionSaver",
    "ProgressBar",
    "ResumeLogFilter",
    "format_duration",
    "is_main_process",
]

logger = logging.getLogger(__name__)


def is_main_process() -> bool:
    """True unless this is a non-zero rank of an initialised process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class RNGState:
    """The global random states (Python, NumPy, torch CPU and CUDA) as a checkpointable object, so that a
    resumed run draws the same dropout masks and data order as an uninterrupted one.

    The state is made of tensors and plain containers only (the NumPy key as an int64 tensor), so checkpoints load
    with ``torch.load(weights_only=True)``. Under ``torch.distributed`` every rank's state is gathered into the
    checkpoint (``state_dict`` is then a collective: call it on every rank, as :class:`TrainingCheckpointer` does)
    and each rank restores its own. A checkpoint from another world size (or one with rank 0's state only) gives
    rank 0 its state and every other rank a distinct stream derived from it and the rank, with a warning.
    """

    @staticmethod
    def _local() -> dict[str, Any]:
        kind, key, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (the legacy global state code draws from)
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": (
                str(kind),
                torch.from_numpy(np.asarray(key, dtype=np.int64)),
                int(pos),
                int(has_gauss),
                float(gauss),
            ),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @staticmethod
    def _restore(state: Mapping[str, Any]) -> None:
        python = state["python"]
        random.setstate((python[0], tuple(python[1]), python[2]))
        kind, key, pos, has_gauss, gauss = state["numpy"]
        key = key.numpy() if isinstance(key, torch.Tensor) else key
        np.random.set_state((kind, np.asarray(key, dtype=np.uint32), int(pos), int(has_gauss), float(gauss)))  # noqa: NPY002
        torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])

    def state_dict(self) -> dict[str, Any]:
        local = self._local()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, local)
        return {**ranks[0], "ranks": ranks}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        ranks = state.get("ranks")
        if ranks is not None and len(ranks) == world:
            self._restore(ranks[rank])
            return
        self._restore(state)  # rank 0's state
        if rank == 0:
            return
        if ranks is not None:
            logger.warning(
                "checkpoint RNG state is from %d ranks, this run has %d: ranks > 0 get new streams", len(ranks), world
            )
        # a distinct, reproducible stream per rank, derived from rank 0's restored state
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) + rank
        random.seed(seed)
        np.random.seed(seed)  # noqa: NPY002
        torch.manual_seed(seed)


class EMAState:
    """The state of ignite's ``EMAHandler`` beyond the EMA weights, as a checkpointable object: the position of its
    momentum warm-up scheduler. Without it a resumed run restarts the warm-up, and its EMA weights (the ones
    inference uses) differ from an uninterrupted run's.

    Args:
        ema: the ``EMAHandler`` (attached to the trainer before the checkpoint is loaded).
    """

    def __init__(self, ema: Any) -> None:
        self.ema = ema

    def state_dict(self) -> dict[str, Any]:
        scheduler = getattr(self.ema, "momentum_scheduler", None)
        return {"event_index": int(scheduler.event_index)} if scheduler is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        scheduler = getattr(self.ema, "momentum_scheduler", None)
        if scheduler is not None and "event_index" in state:
            scheduler.event_index = int(state["event_index"])


class ResumeLogFilter(logging.Filter):
    """Drops ignite's "Engine run resuming from iteration 0, epoch N until M epochs" line, which resumes nothing;
    ``attach(engine)`` adds it to the engine's logger (once), so it can be listed in MONAI handler lists.

    ignite calls a run a resume whenever the engine's state already has ``max_epochs`` when ``run`` starts, and a
    MONAI engine always does: ``Workflow`` creates its state with ``max_epochs``, and ``Evaluator.run`` sets
    ``max_epochs`` and ``epoch`` (the trainer's epoch - 1) before every validation. So every fresh training run, every
    validation and every calibration or inference run logged "resuming". A run that has done no iteration
    (iteration 0) resumes nothing; a real in-process resume (``run`` again after ``terminate``, iteration > 0) keeps
    the line. A training run resumed from a checkpoint is told by :class:`TrainingCheckpointer`'s own "resumed from
    <file> at epoch N, iteration M" line (the state is restored at ``STARTED``, after ignite's line).
    """

    PREFIX = "Engine run resuming from iteration 0,"

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.PREFIX)

    def attach(self, engine: Engine) -> None:
        if not any(isinstance(f, ResumeLogFilter) for f in engine.logger.filters):
            engine.logger.addFilter(self)


class TrainingCheckpointer:
    """Resumable training checkpoints, written atomically, and the final inference checkpoint.

    - At ``STARTED``, if ``resume`` and ``<save_dir>/checkpoint_latest.pt`` exists, every object of ``save_dict``
      (model, EMA model, optimizer, trainer, RNG state, metadata, ...) is restored, so training continues exactly
      where the last checkpoint left it (``max_epochs`` of the new run is kept). ``metadata`` is restored first, so a
      checkpoint of another architecture or preprocessing is refused with a one-line :class:`CheckpointError`.
    - Every ``save_interval`` epochs (after the handlers attached before it, e.g. validation), the state is saved
      as ``checkpoint_epoch=N.pt`` (the last ``n_saved`` kept) and ``checkpoint_latest.pt`` (a hard link to the
      same file where the file system allows, otherwise a copy; each written through a temporary file and a rename).
    - On ``TERMINATE`` (a time budget, a handler stopping the run), ``checkpoint_latest.pt`` gets the mid-epoch
      state (``save_on_terminate``); resuming from it skips the batches already seen in that epoch (ignite), with a
      new data order for the rest of the epoch. Resuming from an epoch boundary reproduces an uninterrupted run.
    - At ``COMPLETED`` (also after a termination), ``final_name`` gets the inference checkpoint: metadata, model
      and EMA weights (see :func:`anofpdm_monai.networks.save_checkpoint`).

    The engine it is attached to is checkpointed as ``engine_key`` (its iteration), and its AMP gradient scaler as
    ``scaler`` when it has one; this avoids the circular reference of listing the trainer in its own handler's config.

    MONAI's ``CheckpointSaver`` writes non-atomically and ``CheckpointLoader`` needs the file to exist when the
    config is built; this handler covers both for the resume-if-present workflow. Only rank 0 writes.

    Args:
        save_dir: folder of the checkpoints.
        save_dict: name -> object with ``state_dict``/``load_state_dict``; must contain ``model``.
        save_interval: epochs between checkpoints (0: only the final one).
        n_saved: numbered checkpoints kept.
        resume: restore from ``checkpoint_latest.pt`` when present.
        final_name: file name of the inference checkpoint (None: none).
        ema_key: key of the EMA model in ``save_dict`` (stored as ``ema`` in the final checkpoint).
        preprocessing: preprocessing parameters recorded in the final checkpoint.
        engine_key: name under which the attached engine's state is saved (None: not saved).
        save_on_terminate: write ``checkpoint_latest.pt`` when the run is terminated early.
    """

    LATEST = "checkpoint_latest.pt"

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        save_interval: int = 1,
        n_saved: int = 2,
        resume: bool = True,
        final_name: str | None = "model.pt",
        ema_key: str | None = "ema",
        preprocessing: Any = None,
        engine_key: str | None = "trainer",
        save_on_terminate: bool = True,
    ) -> None:
        if "model" not in save_dict:
            raise ValueError("save_dict must contain 'model'")
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.save_interval = int(save_interval)
        self.n_saved = max(1, int(n_saved))
        self.resume = resume
        self.final_name = final_name
        self.ema_key = ema_key
        self.preprocessing = preprocessing
        self.engine_key = engine_key
        self.save_on_terminate = save_on_terminate
        self.resumed_from: Path | None = None

    @property
    def latest(self) -> Path:
        return self.save_dir / self.LATEST

    def attach(self, engine: Engine) -> None:
        if self.engine_key:
            self.save_dict[self.engine_key] = engine
        # ignite logs "resuming from iteration 0, epoch 0" before STARTED on every run, fresh or resumed (the state
        # is restored at STARTED, below): misleading, so dropped; our own line says where a resumed run starts
        ResumeLogFilter().attach(engine)
        scaler = getattr(engine, "scaler", None)  # MONAI trainers with amp=True on CUDA
        if scaler is not None and hasattr(scaler, "state_dict") and "scaler" not in self.save_dict:
            self.save_dict["scaler"] = scaler
        engine.add_event_handler(Events.STARTED, self.load)
        if self.save_interval > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
        if self.save_on_terminate:
            engine.add_event_handler(Events.TERMINATE, self.save_latest)
        if self.final_name:
            engine.add_event_handler(Events.COMPLETED, self.save_final)

    def load(self, engine: Engine) -> None:
        """Remove the temporary files a killed run left while writing a checkpoint, then restore ``save_dict`` from
        ``checkpoint_latest.pt`` when resuming and the file exists."""
        if is_main_process() and self.save_dir.is_dir():
            names = [r"checkpoint_epoch=\d+\.pt", *(re.escape(n) for n in (self.LATEST, self.final_name) if n)]
            stale = re.compile(rf"^\.({'|'.join(names)})\.")
            for path in self.save_dir.iterdir():
                if path.is_file() and stale.match(path.name):
                    path.unlink(missing_ok=True)
                    logger.info("removed %s, left by a killed run", path)
        if not (self.resume and self.latest.is_file()):
            return
        checkpoint = load_checkpoint(self.latest)
        if "model" not in checkpoint:
            raise CheckpointError(f"{self.latest} holds no 'model' state; delete it or set resume to false")
        prior_max_epochs = engine.state.max_epochs
        to_load = {k: v for k, v in self.save_dict.items() if k in checkpoint}
        if "metadata" in to_load:  # first: a clear message for another architecture, before any weight is touched
            try:
                to_load.pop("metadata").load_state_dict(checkpoint["metadata"])
            except CheckpointError as exc:
                hint = "use another output folder or set resume to false"
                raise CheckpointError(f"{self.latest}: {exc}; {hint}") from None
        try:
            Checkpoint.load_objects(to_load=to_load, checkpoint=checkpoint)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"cannot resume from {self.latest}: {first_line(exc)}") from None
        if prior_max_epochs is not None:
            engine.state.max_epochs = max(prior_max_epochs, engine.state.epoch)
        self.resumed_from = self.latest
        logger.info(
            "resumed from %s at epoch %d, iteration %d", self.latest, engine.state.epoch, engine.state.iteration
        )

    def _state(self) -> dict[str, Any]:
        out = {}
        for k, obj in self.save_dict.items():
            out[k] = unwrap(obj).state_dict() if isinstance(obj, torch.nn.Module) else obj.state_dict()
        return out

    def save(self, engine: Engine) -> None:
        """Write ``checkpoint_epoch=N.pt`` and ``checkpoint_latest.pt``, then prune to the last ``n_saved``.

        Every rank collects the state (``RNGState`` gathers all ranks' streams); rank 0 writes."""
        state = self._state()
        if not is_main_process():
            return
        numbered = self.save_dir / f"checkpoint_epoch={engine.state.epoch}.pt"
        torch_save(state, numbered)
        atomic_link(numbered, self.latest)
        pattern = re.compile(r"checkpoint_epoch=(\d+)\.pt$")
        saved = sorted(
            (int(m.group(1)), p) for p in self.save_dir.glob("checkpoint_epoch=*.pt") if (m := pattern.search(p.name))
        )
        for _, p in saved[: -self.n_saved]:
            p.unlink(missing_ok=True)

    def save_latest(self, engine: Engine) -> None:
        """Write ``checkpoint_latest.pt`` only (the state of a terminated run)."""
        state = self._state()  # on every rank: see save
        if is_main_process():
            torch_save(state, self.latest)
            logger.info("run terminated at iteration %d: state saved to %s", engine.state.iteration, self.latest)

    def save_final(self, engine: Engine) -> None:
        """Write the inference checkpoint ``final_name`` (metadata, model, EMA, iteration, epoch)."""
        if not is_main_process() or not self.final_name:
            return
        model = self.save_dict["model"]
        ema = self.save_dict.get(self.ema_key) if self.ema_key else None
        extra = {"iteration": int(engine.state.iteration), "epoch": int(engine.state.epoch)}
        meta = self.save_dict.get("metadata")  # the run's CheckpointMetadata: preprocessing and schedule
        preprocessing = getattr(meta, "preprocessing", None) or self.preprocessing
        schedule = getattr(meta, "schedule", None)
        save_checkpoint(
            self.save_dir / self.final_name, model, ema=ema, preprocessing=preprocessing, schedule=schedule, extra=extra
        )


def format_duration(seconds: float) -> str:
    """``"45s"``, ``"12m 30s"``, ``"2h 05m"`` (seconds rounded up, so a budget shows ``"1s"`` until it is spent)."""
    total = max(0, math.ceil(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


class TimeBudget:
    """Stop training after ``seconds`` of wall-clock time or at iteration ``iterations``, checked every iteration;
    the trainer then completes normally, so the state and the final checkpoint are written. ``None`` or <= 0
    disables a limit.

    ignite's ``TimeLimit`` is not used: under DistributedDataParallel each rank would stop at its own iteration and
    the others would wait forever in the gradient all-reduce. Here the ranks agree (an all-reduce of the stop flag,
    one scalar per iteration) and all stop after the same iteration. The iteration limit counts the engine's total
    iterations (restored on resume), so a resumed run stops at the same model as an uninterrupted one, and two
    runs with the same limit are comparable whatever else loads the machine.

    With a limit, the epoch total (``num_epochs``, often set huge so that the budget rules) means nothing, so what
    is left is shown instead: ``engine.state.budget_left`` holds it as text (``"12m 30s left, iteration 120/500"``,
    updated every iteration; :class:`ProgressBar` shows it instead of the epoch total) and every epoch end logs it
    (``epoch 5: 12m 30s left, iteration 120/500``).

    Args:
        seconds: the wall-clock budget, counted from the engine's ``STARTED`` event.
        iterations: the total number of training iterations.
    """

    def __init__(self, seconds: float | None, iterations: int | None = None) -> None:
        self.seconds = seconds if seconds is not None and seconds > 0 else None
        self.iterations = int(iterations) if iterations is not None and int(iterations) > 0 else None
        self._start: float | None = None

    def attach(self, engine: Engine) -> None:
        if self.seconds is not None or self.iterations is not None:
            engine.add_event_handler(Events.STARTED, self._started)
            engine.add_event_handler(Events.ITERATION_STARTED, self._already_done)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._check)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._log_left)

    def left(self, engine: Engine) -> str:
        """What is left of the budget: ``"12m 30s left"``, ``"iteration 120/500"`` or both."""
        parts = []
        if self.seconds is not None:
            elapsed = time.monotonic() - self._start if self._start is not None else 0.0
            parts.append(f"{format_duration(self.seconds - elapsed)} left")
        if self.iterations is not None:
            parts.append(f"iteration {min(engine.state.iteration, self.iterations)}/{self.iterations}")
        return ", ".join(parts)

    def _started(self, engine: Engine) -> None:
        self._start = time.monotonic()
        engine.state.budget_left = self.left(engine)

    def _log_left(self, engine: Engine) -> None:
        if is_main_process():
            logger.info("epoch %d: %s", engine.state.epoch, self.left(engine))

    def _already_done(self, engine: Engine) -> None:
        # a run resumed at (or past) the limit: ignite skips the iteration that is terminated here
        if self.iterations is not None and engine.state.iteration > self.iterations:
            logger.info("iteration limit %d already reached: stopping", self.iterations)
            engine.state.iteration -= 1
            engine.terminate()

    def _check(self, engine: Engine) -> None:
        start = self._start if self._start is not None else time.monotonic()
        stop = self.seconds is not None and time.monotonic() - start >= self.seconds
        if dist.is_available() and dist.is_initialized() and self.seconds is not None:
            on_cuda = dist.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
            flag = torch.tensor([1.0 if stop else 0.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item() > 0)
        engine.state.budget_left = self.left(engine)
        if stop:
            logger.info("time budget of %s s reached at iteration %d: stopping", self.seconds, engine.state.iteration)
            engine.terminate()
        elif self.iterations is not None and engine.state.iteration >= self.iterations:  # the same on every rank
            logger.info("iteration limit %d reached: stopping", self.iterations)
            engine.terminate()


class ReconstructionSaver:
    """Save a PNG grid of healthy-guided reconstructions of fixed validation slices, and one of healthy samples,
    every ``interval`` epochs.

    The slices are DDIM-inverted with the null label to ``noise_level`` and decoded with healthy guidance w
    (the "DDIM classifier-free" reconstruction): unhealthy slices should come back with the lesion removed. The
    samples are decoded from fixed noise at the last step with the same guidance (``samples_epoch=N.png``): a model
    that has learnt brain slices generates brain-like ones.

    Args:
        network: the network to sample with (typically the EMA model).
        dataset: dataset of slice dicts (``image``, ``class_label``); the first ``num_items`` unhealthy slices (then
            healthy ones) are used.
        output_dir: folder of the PNG files (``reconstruction_epoch=N.png``).
        interval: epochs between previews (0 disables).
        noise_level: t of the inversion.
        num_steps: DDIM steps of inversion and decoding.
        guidance_scale: w of the healthy guidance.
        num_items: number of slices shown.
        channel_names: names of the image channels for the figure.
        schedule: the training run's noise schedule (default: the papers' linear schedule).
        num_samples: number of healthy samples drawn (0: none); the same noise (seed 0) at every preview.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        dataset: Sequence[Mapping[str, Any]] | None,
        output_dir: str | os.PathLike,
        interval: int = 1,
        noise_level: int = 400,
        num_steps: int = 25,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        num_items: int = 4,
        channel_names: Sequence[str] | None = None,
        schedule: NoiseSchedule | None = None,
        num_samples: int = 4,
    ) -> None:
        self.network = network
        self.dataset = dataset
        self.output_dir = Path(output_dir)
        self.interval = int(interval)
        self.noise_level = int(noise_level)
        self.num_steps = int(num_steps)
        self.guidance_scale = float(guidance_scale)
        self.num_items = int(num_items)
        self.channel_names = list(channel_names) if channel_names is not None else None
        self.schedule = schedule or NoiseSchedule()
        self.num_samples = int(num_samples)
        self._batch: torch.Tensor | None = None

    def attach(self, engine: Engine) -> None:
        if self.interval > 0 and self.dataset is not None and len(self.dataset) > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def _select(self) -> torch.Tensor:
        if self._batch is None:
            labels = getattr(self.dataset, "slice_labels", None)
            order = list(range(len(self.dataset)))
            if labels is not None:
                order = [i for i in order if labels[i] == 1] + [i for i in order if labels[i] != 1]
            picks = order[: self.num_items]
            self._batch = torch.stack([torch.as_tensor(self.dataset[i]["image"]) for i in picks])
        return self._batch

    def __call__(self, engine: Engine) -> None:
        if not is_main_process():
            return
        net = unwrap(self.network)
        device = next(net.parameters()).device
        was_training = net.training
        net.eval()
        try:
            x0 = self._select().to(device)
            grid = reconstruction_grid(self.noise_level, self.num_steps)
            x_t = ddim_encode(net, x0, self.schedule, grid, label=NULL)
            recon = ddim_decode(net, x_t, self.schedule, grid, label=HEALTHY, guidance_scale=self.guidance_scale)
            samples = None
            if self.num_samples > 0:
                noise = torch.randn((self.num_samples, *x0.shape[1:]), generator=torch.Generator().manual_seed(0))
                grid = reconstruction_grid(self.schedule.num_train_timesteps - 1, self.num_steps)
                samples = ddim_decode(
                    net, noise.to(device), self.schedule, grid, label=HEALTHY, guidance_scale=self.guidance_scale
                )
        finally:
            net.train(was_training)
        path = self.output_dir / f"reconstruction_epoch={engine.state.epoch}.png"
        save_reconstruction_grid(path, x0.cpu(), recon.cpu(), channel_names=self.channel_names)
        logger.info("saved reconstruction preview %s", path)
        if samples is not None:
            path = self.output_dir / f"samples_epoch={engine.state.epoch}.png"
            save_sample_grid(path, samples.cpu(), channel_names=self.channel_names)
            logger.info("saved healthy samples %s", path)


class ProgressBar:
    """A tqdm progress bar of the epoch's iterations showing the running loss; ``attach(engine)`` form for MONAI
    handler lists.

    It looks like ignite's ``ProgressBar`` (``Epoch [5/100]: [30/120]  25%|##   , loss=0.0312 [00:04<00:12]``), except
    under a :class:`TimeBudget`: the epoch total is then meaningless (``num_epochs`` is set huge so that the budget
    rules), so the description shows the epoch and what is left of the budget instead
    (``Epoch 5 (12m 30s left): [30/120] ...``). A one-epoch engine (an evaluator) shows ``Iteration``.

    Args:
        loss_key: key of the loss in the engine output (a dict when the trainer runs with ``decollate=False``).
        persist: keep the bar after each epoch.
        enabled: attach nothing when False (e.g. ``--progress False`` for logs without bars).
    """

    #: ignite's bar format
    BAR_FORMAT = "{desc}[{n_fmt}/{total_fmt}] {percentage:3.0f}%|{bar}{postfix} [{elapsed}<{remaining}]"

    def __init__(self, loss_key: str = "loss", persist: bool = False, enabled: bool = True) -> None:
        self.loss_key = loss_key
        self.persist = persist
        self.enabled = bool(enabled)
        self._bar: Any = None

    def _output(self, output: Any) -> dict[str, float]:
        if isinstance(output, Sequence) and output and isinstance(output[0], Mapping):
            output = output[0]  # decollated engine output
        if isinstance(output, Mapping) and self.loss_key in output:
            return {self.loss_key: float(torch.as_tensor(output[self.loss_key]).detach())}
        return {}

    @staticmethod
    def description(engine: Engine) -> str:
        """``Epoch 5 (12m 30s left)`` under a budget, ``Epoch [5/100]`` without, ``Iteration`` for one epoch."""
        state = engine.state
        left = getattr(state, "budget_left", None)
        if left:
            return f"Epoch {state.epoch} ({left})"
        if state.max_epochs is not None and state.max_epochs > 1:
            return f"Epoch [{state.epoch}/{state.max_epochs}]"
        return "Iteration"

    def attach(self, engine: Engine) -> None:
        if self.enabled and is_main_process():
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._advance)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._close)
            engine.add_event_handler(Events.COMPLETED, self._close)  # a run terminated mid-epoch

    def _advance(self, engine: Engine) -> None:
        length = engine.state.epoch_length
        n = (engine.state.iteration - 1) % length + 1 if length else engine.state.iteration
        postfix = self._output(engine.state.output)
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=length,
                initial=n,
                leave=self.persist,
                bar_format=self.BAR_FORMAT,
                desc=f"{self.description(engine)}: ",  # as set_description writes it
                postfix=postfix or None,
            )
            return
        self._bar.set_description(self.description(engine), refresh=False)
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(n - self._bar.n)

    def _close(self, engine: Engine) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

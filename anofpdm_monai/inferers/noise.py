"""Forward noise drawn per slice, from a key of (seed, case, slice), so that a slice's results do not depend on the
batch it was run in (batch size, world size, which other slices were run with it).

Every slice of a batch gets its own ``torch.Generator`` on the inputs' device, seeded with its key; every noise draw
(the first DDIM step, each DDPM step, each ancestral step of AnoDDPM) takes ``(C, H, W)`` values from each slice's
own generator in turn, so slice i sees the same stream whatever batch it is in.

The key of a slice is the first 8 bytes (little endian, top bit cleared) of
``blake2b(f"anofpdm-noise/v1|{seed}|{case_id}|{slice_index}", digest_size=8)``: stable across processes, machines
and Python versions (not Python's salted ``hash()``). ``case_id`` is the datalist id, ``slice_index`` the RAS axial
index of the preprocessed volume (the ``slice_index`` of :class:`~anofpdm_monai.data.SliceDataset` and the axial
index the volume inferer cuts at, so evaluation, calibration and volume inference draw the same noise for the same
slice). A batch without slice identities (a user calling an inferer on a plain tensor) is taken as slices
``0 .. B-1`` of an anonymous case (``case_id ""``): its noise then depends on each slice's position in the batch.

The values are torch's generator streams, so they also depend on the device type (CPU and CUDA generators differ).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "NOISE_SCHEME",
    "slice_noise_key",
    "slice_noise_keys",
    "batch_noise_keys",
    "resolve_noise_keys",
    "slice_generators",
    "PositionalGenerators",
    "draw_noise",
]

#: the name of the key derivation above (bump when it changes: stored results then no longer match)
NOISE_SCHEME = "anofpdm-noise/v1"
_KEY_MASK = (1 << 63) - 1  # non-negative int64: fits a long tensor and torch.Generator.manual_seed


class PositionalGenerators:
    """The per-slice generators of a batch without slice identities (keys from the positions 0 .. B-1), made when
    the batch size is first known (the first draw) and continued by later draws, e.g. a forward process run one step
    at a time (benchmarks/bench_grid.py)."""

    def __init__(self, seed: int, device: torch.device | str) -> None:
        self.seed, self.device = int(seed), torch.device(device)
        self._generators: list[torch.Generator] | None = None

    def for_batch(self, batch_size: int) -> list[torch.Generator]:
        if self._generators is None:
            self._generators = slice_generators(batch_noise_keys(self.seed, batch_size), self.device)
        if len(self._generators) != int(batch_size):
            raise ValueError(f"generators made for {len(self._generators)} slices, drawn for {batch_size}")
        return self._generators


Generators = torch.Generator | Sequence[torch.Generator] | PositionalGenerators | None


def slice_noise_key(seed: int, case_id: str | None, slice_index: int) -> int:
    """The noise key of one slice (see the module docstring); ``case_id`` None is the anonymous case ``""``."""
    payload = f"{NOISE_SCHEME}|{int(seed)}|{'' if case_id is None else str(case_id)}|{int(slice_index)}"
    digest = hashlib.blake2b(payload.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _KEY_MASK


def _as_int_list(values: Any) -> list[int]:
    if isinstance(values, torch.Tensor):
        return [int(v) for v in values.reshape(-1).tolist()]
    return [int(v) for v in values]


def slice_noise_keys(
    seed: int | None, case_ids: str | Sequence[str] | None, slice_indices: Sequence[int] | torch.Tensor
) -> list[int] | None:
    """The keys of a batch of slices: ``case_ids`` one id for all (a volume) or one per slice (a collated slice
    batch); None when ``seed`` is None (the global RNG is used then)."""
    if seed is None:
        return None
    indices = _as_int_list(slice_indices)
    if case_ids is None or isinstance(case_ids, str):
        cases = [case_ids] * len(indices)
    else:
        cases = [str(c) for c in case_ids]
        if len(cases) != len(indices):
            raise ValueError(f"{len(cases)} case ids for {len(indices)} slice indices")
    return [slice_noise_key(seed, c, i) for c, i in zip(cases, indices)]


def batch_noise_keys(seed: int | None, batch_size: int) -> list[int] | None:
    """The keys of a batch without slice identities: slices ``0 .. B-1`` of the anonymous case."""
    return slice_noise_keys(seed, None, range(int(batch_size)))


def resolve_noise_keys(
    seed: int | None, batch_size: int, noise_keys: Sequence[int] | torch.Tensor | None = None
) -> list[int] | None:
    """``noise_keys`` checked against the batch size, else :func:`batch_noise_keys`."""
    if noise_keys is None:
        return batch_noise_keys(seed, batch_size)
    keys = _as_int_list(noise_keys)
    if len(keys) != int(batch_size):
        raise ValueError(f"noise_keys has {len(keys)} keys for a batch of {batch_size} slices")
    return keys


def slice_generators(keys: Sequence[int] | None, device: torch.device | str) -> list[torch.Generator] | None:
    """One generator per slice on ``device``, seeded with its key (None: None)."""
    if keys is None:
        return None
    device = torch.device(device)
    return [torch.Generator(device=device).manual_seed(int(k) & _KEY_MASK) for k in keys]


def draw_noise(
    shape: Sequence[int], generator: Generators, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Standard normal noise of ``shape`` (B, ...) on ``device``: from one generator for the whole batch (or the
    global RNG when None), or, given one generator per slice, row b from generator b (``normal_`` in place: the
    same values as ``torch.randn(shape[1:], generator=g)``)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if isinstance(generator, PositionalGenerators):
        generator = generator.for_batch(shape[0])
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {shape[0]} slices")
    noise = torch.empty(tuple(shape), device=device, dtype=dtype)
    for row, g in zip(noise, generators):
        row.normal_(generator=g)
    return noise

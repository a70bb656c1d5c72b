"""The evaluator's job on the test split: every method on every test case, each case's results stored with the
settings that made them (:class:`~anofpdm_monai.evaluation.store.ResultStore`), the cases dealt out among the ranks."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..distributed import claim
from ..inferers.baselines import DEFAULT_CLASSIFIER_SCALE
from .store import fingerprint

__all__ = ["TestCaseRuns"]


class TestCaseRuns:
    """Runs of the methods on the test cases, per case and seed; a part of
    :class:`~anofpdm_monai.evaluation.runner.Evaluator`."""

    def _case_indices(self) -> dict[str, list[int]]:
        cases: dict[str, list[int]] = {}
        for i, case in enumerate(self.test.table["case_id"].astype(str)):
            cases.setdefault(case, []).append(i)
        return cases

    def _my_cases(self) -> Iterator[tuple[str, list[int]]]:
        """This rank's test cases and their slice indices, dealt out on demand among the ranks (:func:`claim`: a
        rank whose cases are already stored takes more of the others'); all of them in one process."""
        return claim(list(self._case_indices().items()), "evaluation test cases")

    def _run_anofpdm_group(self, forward: str, members: list[str], seed: int, tuning: Mapping[str, Any]) -> None:
        cal = self.anofpdm_calibration(forward)
        base = self._from_calibration(cal, seed)
        post = {
            "anofpdm": base,
            "anofpdm_ddpm": base,
            "anofpdm_last": self._from_calibration(cal, seed, aggregation="last"),
        }
        if "anofpdm_tuned" in members:
            post["anofpdm_tuned"] = self._from_calibration(
                cal, seed, m_max=None, threshold=tuning["anofpdm_tuned"]["threshold"]
            )
        settings = {
            m: fingerprint(
                {
                    "method": m,
                    "seed": seed,
                    "calibration": cal.without_created(),
                    "median_kernel": self.median_kernel,
                    "min_component_size": self.min_component_size,
                    "threshold": tuning["anofpdm_tuned"]["threshold"] if m == "anofpdm_tuned" else None,
                }
            )
            for m in members
        }
        for case, idx in tqdm(self._my_cases(), desc=f"AnoFPDM ({forward}, seed {seed})", disable=not self.progress):
            todo = [m for m in members if not self.store.matches(m, seed, case, settings[m], len(idx))]
            if not todo:
                continue
            chunks: dict[str, list[dict[str, np.ndarray]]] = {m: [] for m in todo}
            for batch in self._batches(self.test, idx):
                keys = self._noise_keys(base, batch)
                result = base.forward_process(
                    batch["image"].to(self.device), self.network, need_maps=True, noise_keys=keys
                )
                for m in todo:
                    out = post[m].postprocess(result)
                    chunks[m].append(
                        {
                            "map": out.filtered_map.cpu().numpy().astype(np.float32),
                            "mask": out.mask.cpu().numpy(),
                            "mask_ungated": out.mask_ungated.cpu().numpy(),
                            "pred_label": out.pred_label.cpu().numpy(),
                            "cosine": out.cosine.cpu().numpy(),
                            "health": out.health.cpu().numpy(),
                            "divergence": out.divergence.cpu().numpy().astype(np.float32),
                            "mse_guided": out.mse_guided.cpu().numpy().astype(np.float32),
                            "mse_reference": out.mse_reference.cpu().numpy().astype(np.float32),
                            "end_step": out.end_step.cpu().numpy(),
                            "timesteps": out.timesteps.cpu().numpy(),
                        }
                    )
            for m in todo:
                merged = {k: np.concatenate([c[k] for c in chunks[m]]) for k in chunks[m][0] if k != "timesteps"}
                merged["timesteps"] = chunks[m][0]["timesteps"]
                self.store.save(m, seed, case, settings[m], **merged)

    def _run_baseline(self, method: str, seed: int, tuning: Mapping[str, Any]) -> None:
        params = tuning[method]
        if method == "intensity":
            inferer: Any = self._intensity(params["threshold"])
        else:
            scale = params.get("classifier_scale", DEFAULT_CLASSIFIER_SCALE)
            inferer = self._baseline(method, params["noise_level"], params["threshold"], seed, scale)
        settings = fingerprint(
            {
                "method": method,
                "seed": seed,
                "tuned": dict(params),
                "tuning_key": tuning.get("_key"),
                "median_kernel": self.median_kernel,
                "min_component_size": self.min_component_size,
            }
        )
        for case, idx in tqdm(self._my_cases(), desc=f"{method} (seed {seed})", disable=not self.progress):
            if self.store.matches(method, seed, case, settings, len(idx)):
                continue
            parts = []
            for batch in self._batches(self.test, idx):
                keys = self._noise_keys(inferer, batch)
                out = inferer(batch["image"].to(self.device), self.network, noise_keys=keys)
                parts.append((out.filtered_map.cpu().numpy(), out.mask.cpu().numpy(), out.pred_label.cpu().numpy()))
            maps, masks, pred = (np.concatenate(p) for p in zip(*parts))
            self.store.save(
                method,
                seed,
                case,
                settings,
                map=maps.astype(np.float32),
                mask=masks,
                mask_ungated=masks,
                pred_label=pred,
            )

    def _load(self, method: str, seed: int) -> dict[str, np.ndarray]:
        return self.store.load(method, seed, list(self._case_indices()))

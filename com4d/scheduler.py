"""The rectified-flow noise schedule and the Euler step of TripoSG/COM4D (reference §4.4).

Flow convention: `x_σ = (1 − σ)·x0 + σ·ε` with σ = 1 pure noise; the DiT gets `t = 1000·σ` and
predicts `v = x0 − ε`, so one Euler step towards the data is `x ← x + (σ_i − σ_{i+1})·v` (the
opposite sign of diffusers' FlowMatchEuler). The official class is a diffusers scheduler with a step
counter that finds its index from the timestep value; here the loop passes step indices explicitly.
Every table is built with the same float64/float32 operations as the official code, so the numbers
are bit-identical (fixture case `scheduler`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from com4d.errors import ParameterError, WeightsError
from com4d.weights import read_json

SCHEDULER_CONFIG = "scheduler_config.json"
OFFICIAL_CLASS = "RectifiedFlowScheduler"


@dataclass(frozen=True)
class SchedulerConfig:
    """The fields of `scheduler/scheduler_config.json` that change numbers (others are ignored)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0


class RectifiedFlowScheduler:
    """σ and timestep tables, the Euler step and classifier-free guidance.

    `sigmas(n)` has n + 1 entries (a trailing 0); step i moves from `sigmas(n)[i]` to
    `sigmas(n)[i + 1]` and the DiT is called with `timesteps(n)[i]`.
    """

    def __init__(self, config: SchedulerConfig | None = None):
        config = config or SchedulerConfig()
        if config.num_train_timesteps < 1:
            raise ParameterError(f"num_train_timesteps must be positive, got {config.num_train_timesteps}")
        if not config.shift > 0:
            raise ParameterError(f"the schedule shift must be positive, got {config.shift}")
        self.config = config

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> RectifiedFlowScheduler:
        """Read a TripoSG folder (its `scheduler/` subfolder) or the scheduler folder itself."""
        folder = Path(folder)
        if not folder.is_dir():
            raise WeightsError(f"weights folder {folder} does not exist")
        path = folder / "scheduler" / SCHEDULER_CONFIG
        if not path.is_file():
            path = folder / SCHEDULER_CONFIG
        if not path.is_file():
            raise WeightsError(f"missing file {folder / 'scheduler' / SCHEDULER_CONFIG}")
        raw = read_json(path)
        name = raw.get("_class_name", OFFICIAL_CLASS)
        if name != OFFICIAL_CLASS:
            raise WeightsError(f"{path} describes a {name}, not TripoSG's {OFFICIAL_CLASS}")
        if raw.get("use_dynamic_shifting", False):
            raise WeightsError(
                f"{path}: use_dynamic_shifting=true is not supported (no released model uses it)"
            )
        try:
            config = SchedulerConfig(
                num_train_timesteps=int(raw.get("num_train_timesteps", 1000)),
                shift=float(raw.get("shift", 1.0)),
            )
        except (TypeError, ValueError) as err:
            raise WeightsError(f"{path}: num_train_timesteps / shift are not numbers: {err}") from err
        return cls(config)

    # -- tables ---------------------------------------------------------------------------------

    def _shift64(self, s: torch.Tensor) -> torch.Tensor:
        shift = self.config.shift
        return shift * s / (1 + (shift - 1) * s)

    @property
    def train_sigmas(self) -> torch.Tensor:
        """(num_train_timesteps,) float32: 1, 1 − 1/N, …, 1/N as the official constructor builds it.

        Used by training (σ looked up by a sampled index); the inference loop uses `sigmas(n)`.
        """
        n = self.config.num_train_timesteps
        i = torch.arange(n, dtype=torch.float64)
        t = ((1.0 - i / n) * n).to(torch.float32)  # (N,) built in float64, stored in float32
        s = t / n  # float32 division, as official
        shift = self.config.shift
        return shift * s / (1 + (shift - 1) * s)  # float32

    @property
    def train_timesteps(self) -> torch.Tensor:
        """(num_train_timesteps,) float32: `train_sigmas · N` (1000, 999, … up to float32 rounding)."""
        return self.train_sigmas * self.config.num_train_timesteps

    def sigmas(self, steps: int) -> torch.Tensor:
        """(steps + 1,) float32: σ_i = shift·s/(1 + (shift − 1)·s), s = 1 − i/steps, then a trailing 0.

        Computed in float64 and rounded once to float32 (for steps = 50: 1.00, 0.98, …, 0.02, 0).
        """
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ParameterError(f"the number of denoising steps must be a positive integer, got {steps!r}")
        n_train = self.config.num_train_timesteps
        i = torch.arange(steps, dtype=torch.float64)
        s = (1.0 - i / steps) * n_train / n_train  # float64, the official operation order
        sigma = self._shift64(s).to(torch.float32)  # (steps,)
        return torch.cat([sigma, torch.zeros(1, dtype=torch.float32)])  # (steps + 1,)

    def timesteps(self, steps: int) -> torch.Tensor:
        """(steps,) float32: the DiT's time input `σ_i · N` for each step (1000, 980, … for 50 steps)."""
        return self.sigmas(steps)[:-1] * self.config.num_train_timesteps

    # -- sampling -------------------------------------------------------------------------------

    @staticmethod
    def euler_step(
        x: torch.Tensor,
        v: torch.Tensor,
        sigma: float | torch.Tensor,
        sigma_next: float | torch.Tensor,
    ) -> torch.Tensor:
        """One Euler step `x + (σ − σ_next)·v` with x upcast to float32, as the official `step`.

        Like the official code the result has the dtype of the model output `v` (the same as x in
        the pipeline) and the step size is a float32 scalar tensor multiplied into `v`.
        """
        dt = torch.as_tensor(sigma, dtype=torch.float32) - torch.as_tensor(sigma_next, dtype=torch.float32)
        prev = x.to(torch.float32) + dt * v
        return prev.to(v.dtype)

    @staticmethod
    def guidance(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance `v_u + g·(v_c − v_u)`; v_u comes from all-zero DINO tokens."""
        return v_uncond + scale * (v_cond - v_uncond)

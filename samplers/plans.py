"""Trajectory plans: which steps of a sigma schedule are stochastic (SDE), which are ODE, and which are trained.

A plan is model-agnostic: it maps ``(sigmas, iteration)`` to a :class:`Plan`, an immutable list of
:class:`PlannedStep`. Plans whose choice changes over training (window schedules) are pure functions of the
iteration number and their own seed, so resuming a run at iteration ``k`` reproduces the same plan exactly.

- :class:`FullSDEPlan` — Flow-GRPO: every step stochastic, the first ``train_fraction`` of them trained
  (Flow-GRPO's ``timestep_fraction``), optionally the untrained tail as ODE.
- :class:`WindowPlan` — Flow-GRPO-Fast / MixGRPO: SDE (and training) only inside W = [l, l + w), ODE elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Sequence

import torch

STEP_KINDS = ("ode", "sde", "cps", "dance")
WINDOW_SCHEDULES = ("fixed", "random", "progressive", "decay", "exp_decay")


@dataclasses.dataclass(frozen=True)
class PlannedStep:
    """One transition sigma -> sigma_next of the schedule.

    Attributes:
        index: position i in the schedule (0 = the noisiest step).
        sigma, sigma_next: the step's noise levels, 1 >= sigma > sigma_next >= 0.
        kind: step function name (``"ode"``, ``"sde"``, ``"cps"``, ``"dance"``).
        noise_level: the SDE's noise scale (``a`` / ``eta``); ``None`` for ODE.
        train: whether the transition is stored and trained on.
    """

    index: int
    sigma: float
    sigma_next: float
    kind: str
    noise_level: float | None
    train: bool


@dataclasses.dataclass(frozen=True)
class Plan:
    """The steps of one sampling pass, in order."""

    steps: tuple[PlannedStep, ...]

    @property
    def train_indices(self) -> list[int]:
        return [s.index for s in self.steps if s.train]

    @property
    def num_train_steps(self) -> int:
        return sum(s.train for s in self.steps)


def _check(kind: str, noise_level: float) -> None:
    if kind not in STEP_KINDS or kind == "ode":
        raise ValueError(f"SDE step kind {kind!r} not allowed; choose from {STEP_KINDS[1:]}")
    if not noise_level > 0:
        raise ValueError(f"noise_level must be > 0 for an SDE step, got {noise_level}")


def sigma_list(sigmas: torch.Tensor | Sequence[float]) -> list[float]:
    """Sigmas as python floats (``T + 1`` values, decreasing, usually ending at 0)."""
    out = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    if len(out) < 2 or any(a <= b for a, b in zip(out, out[1:])):
        raise ValueError(f"sigmas must be a decreasing list of at least 2 values, got {out}")
    return out


@dataclasses.dataclass
class FullSDEPlan:
    """Flow-GRPO (arXiv 2505.05470): SDE on every step, train on the first ``int(train_fraction * T)`` steps (at least 1).

    With ``ode_after_train=True`` the untrained tail is ODE (less noise in the final images, same log-probs).
    """

    kind: str = "sde"
    noise_level: float = 0.7
    train_fraction: float = 0.9
    ode_after_train: bool = False

    def __post_init__(self) -> None:
        _check(self.kind, self.noise_level)
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")

    def __call__(self, sigmas: torch.Tensor | Sequence[float], iteration: int = 0) -> Plan:
        s = sigma_list(sigmas)
        T = len(s) - 1
        k = max(1, int(self.train_fraction * T + 1e-9))  # Flow-GRPO: int(T * timestep_fraction)
        steps = []
        for i in range(T):
            train = i < k
            sde = train or not self.ode_after_train
            steps.append(PlannedStep(i, s[i], s[i + 1], self.kind if sde else "ode", self.noise_level if sde else None, train))
        return Plan(tuple(steps))


@dataclasses.dataclass
class WindowPlan:
    """A sliding SDE window W = [l, l + w) of the T steps, ODE elsewhere; only window steps are trained.

    Window start ``l`` per iteration (MixGRPO, arXiv 2507.21802):
      - ``fixed``: l = ``start`` (Flow-GRPO-Fast).
      - ``random``: l uniform in [0, T - w], drawn from ``(seed, iteration)``.
      - ``progressive``: l = start + shift * (iteration // tau); wraps to ``start`` past T - w if ``wrap`` else stays.
      - ``decay`` / ``exp_decay``: progressive with tau shrinking as l grows: tau(l) = tau for ``decay`` up to
        l = 13, then tau - (l - 13) (min 1) (our reading); ``exp_decay``: tau(l) = ceil(tau * exp(-k * relu(l - 13))).
    """

    kind: str = "sde"
    noise_level: float = 0.7
    width: int = 4
    start: int = 0
    schedule: str = "fixed"
    tau: int = 25
    shift: int = 1
    wrap: bool = True
    decay_k: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.kind, self.noise_level)
        if self.schedule not in WINDOW_SCHEDULES:
            raise ValueError(f"window schedule {self.schedule!r} unknown; choose from {WINDOW_SCHEDULES}")
        if self.width < 1 or self.start < 0 or self.tau < 1 or self.shift < 1:
            raise ValueError(
                f"window needs width >= 1, start >= 0, tau >= 1, shift >= 1; got width={self.width}, "
                f"start={self.start}, tau={self.tau}, shift={self.shift}"
            )

    def window_start(self, num_steps: int, iteration: int) -> int:
        """The window's first step index l at ``iteration`` (0-based)."""
        last = num_steps - self.width
        if last < 0:
            raise ValueError(f"window width {self.width} exceeds the {num_steps} sampling steps")
        if self.schedule == "fixed":
            return min(self.start, last)
        if self.schedule == "random":
            return random.Random(self.seed * 1_000_003 + iteration).randint(0, last)
        l, it = self.start, 0
        while True:  # walk the schedule: each position l is held for tau(l) iterations
            hold = self._tau(l)
            if iteration < it + hold:
                return min(l, last)
            it += hold
            l += self.shift
            if l > last:
                if not self.wrap:
                    return last
                l = self.start

    def _tau(self, l: int) -> int:
        if self.schedule == "progressive":
            return self.tau
        if self.schedule == "decay":
            return max(1, self.tau - max(0, l - 13))
        return max(1, math.ceil(self.tau * math.exp(-self.decay_k * max(0, l - 13))))

    def __call__(self, sigmas: torch.Tensor | Sequence[float], iteration: int = 0) -> Plan:
        s = sigma_list(sigmas)
        T = len(s) - 1
        l = self.window_start(T, iteration)
        steps = []
        for i in range(T):
            inside = l <= i < l + self.width
            steps.append(
                PlannedStep(i, s[i], s[i + 1], self.kind if inside else "ode", self.noise_level if inside else None, inside)
            )
        return Plan(tuple(steps))

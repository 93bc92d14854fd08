"""Trajectory plans: which steps of a sigma schedule are stochastic (SDE), which are ODE, and which are trained.

A plan is model-agnostic: it maps ``(sigmas, iteration)`` to a :class:`Plan`, an immutable list of
:class:`PlannedStep`. Plans whose choice changes over training (window schedules) are pure functions of the
iteration number and their own seed, so resuming a run at iteration ``k`` reproduces the same plan exactly:
there is no schedule state to save.

- :class:`FullSDEPlan` — Flow-GRPO / DanceGRPO: every step stochastic, the first ``train_fraction`` of them
  trained (Flow-GRPO's ``timestep_fraction``), optionally the untrained tail as ODE.
- :class:`WindowPlan` — Flow-GRPO-Fast / MixGRPO: SDE (and training) only inside W = [l, l + w), ODE elsewhere.

Step kinds. SDE kinds (``"sde"`` Flow-GRPO, ``"cps"``, ``"dance"`` DanceGRPO) are the step functions of
:mod:`samplers.steps`; ODE kinds are ``"ode"`` (one Euler step) and ``"dpm2m"`` (one DPM-Solver++ 2M step: a
multistep method, it uses the data prediction of the previous step when that step was also ``"dpm2m"``;
:func:`samplers.rollout.sample` keeps that history). Only SDE steps can be trained.

The ODE tail (MixGRPO-Flash, arXiv 2507.21802). The ODE steps *after* the last stochastic step can be solved
with another solver (``ode_solver``: ``"euler"`` or ``"dpm2m"``) on a coarser schedule (``flash_ratio`` r):
the m remaining steps become ``n = max(int(m * r), 1)`` steps from the sigma after the window down to the
schedule's last sigma (0), see :func:`flash_sigmas` for how the schedule is rebuilt. ODE steps *before* the
window are never accelerated (MixGRPO reports that compressing them collapses training).
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Sequence

import torch

SDE_KINDS = ("sde", "cps", "dance")
ODE_KINDS = ("ode", "dpm2m")
STEP_KINDS = ("ode", "sde", "cps", "dance", "dpm2m")
WINDOW_SCHEDULES = ("fixed", "random", "progressive", "decay", "exp_decay")
ODE_SOLVERS = {"euler": "ode", "dpm2m": "dpm2m"}
"""``ode_solver`` name -> the :class:`PlannedStep` kind of its steps."""


@dataclasses.dataclass(frozen=True)
class PlannedStep:
    """One transition sigma -> sigma_next.

    Attributes:
        index: position of the step (0 = the noisiest). Equal to the position i in the sigma schedule for every
            step except those of a rebuilt (Flash) ODE tail, which are numbered on from the first tail position.
            SDE noise is drawn per ``index``.
        sigma, sigma_next: the step's noise levels, 1 >= sigma > sigma_next >= 0.
        kind: ``"sde"``, ``"cps"``, ``"dance"`` (stochastic) or ``"ode"`` (Euler), ``"dpm2m"`` (DPM-Solver++ 2M).
        noise_level: the SDE's noise scale (``a`` / ``eta``); ``None`` for ODE kinds.
        train: whether the transition is stored and trained on (SDE kinds only).
    """

    index: int
    sigma: float
    sigma_next: float
    kind: str
    noise_level: float | None
    train: bool

    def __post_init__(self) -> None:
        if self.kind not in STEP_KINDS:
            raise ValueError(f"step kind {self.kind!r} unknown; choose from {STEP_KINDS}")
        if self.kind in ODE_KINDS and (self.train or self.noise_level is not None):
            raise ValueError(f"an ODE step ({self.kind!r}) has no noise level and cannot be trained")


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

    @property
    def nfe(self) -> int:
        """Velocity evaluations per trajectory: one per step, whatever its kind (before any CFG doubling)."""
        return len(self.steps)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(s.kind for s in self.steps)


def _check(kind: str, noise_level: float) -> None:
    if kind not in SDE_KINDS:
        raise ValueError(f"SDE step kind {kind!r} not allowed; choose from {SDE_KINDS}")
    if not noise_level > 0:
        raise ValueError(f"noise_level must be > 0 for an SDE step, got {noise_level}")


def _check_tail(ode_solver: str, flash_ratio: float) -> None:
    if ode_solver not in ODE_SOLVERS:
        raise ValueError(f"ode_solver {ode_solver!r} unknown; choose from {tuple(ODE_SOLVERS)}")
    if not 0 < flash_ratio <= 1:
        raise ValueError(f"flash_ratio must be in (0, 1], got {flash_ratio}")


def sigma_list(sigmas: torch.Tensor | Sequence[float]) -> list[float]:
    """Sigmas as python floats (``T + 1`` values, decreasing, usually ending at 0)."""
    out = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    if len(out) < 2 or any(a <= b for a, b in zip(out, out[1:])):
        raise ValueError(f"sigmas must be a decreasing list of at least 2 values, got {out}")
    return out


def flash_num_steps(remaining: int, ratio: float) -> int:
    """MixGRPO-Flash step count: ``n = max(int(remaining * ratio), 1)``, 0 when nothing remains.

    A ``1e-9`` guard keeps float artefacts from flooring exact products (``0.29 * 100``) one too low.
    """
    if remaining <= 0:
        return 0
    return max(int(remaining * ratio + 1e-9), 1)


def flash_sigmas(tail: Sequence[float], ratio: float) -> list[float]:
    """Rebuild an ODE tail's sigmas with fewer steps (MixGRPO-Flash).

    ``tail`` holds the ``m + 1`` sigmas of the remaining ``m`` steps (from the sigma after the window down to
    the last sigma, usually 0). The result has ``n + 1`` sigmas, ``n = flash_num_steps(m, ratio)``, read off
    the *original* schedule at ``n + 1`` evenly spaced fractional step positions ``u_k = k * m / n``, with linear
    interpolation between neighbouring sigmas. So the rebuilt schedule starts and ends at exactly the same
    sigmas as the tail, keeps the shape of the original (time-shifted) schedule, is a sub-sample of it when
    ``n`` divides ``m``, and equals it when ``n = m`` (``ratio = 1``). Positions are exact integer fractions.

    Args:
        tail: ``m + 1`` decreasing sigmas (``m >= 0``).
        ratio: the compression ``r`` in (0, 1].

    Returns:
        ``n + 1`` decreasing sigmas (``tail`` itself, as a list, when ``m = 0``).
    """
    s = [float(x) for x in tail]
    m = len(s) - 1
    n = flash_num_steps(m, ratio)
    if n == 0:
        return s
    out = []
    for k in range(n + 1):
        i, rem = divmod(k * m, n)  # u_k = i + rem / n
        out.append(s[i] if rem == 0 else s[i] + (s[i + 1] - s[i]) * (rem / n))
    return out


def ode_tail(sigmas: Sequence[float], first: int, ode_solver: str = "euler", flash_ratio: float = 1.0) -> list[PlannedStep]:
    """The ODE steps from schedule position ``first`` to the end of ``sigmas``.

    With ``ode_solver="euler"`` and ``flash_ratio=1`` these are the plain Euler steps of the schedule. Otherwise
    the tail runs on :func:`flash_sigmas` of ``sigmas[first:]`` with steps of kind ``ODE_SOLVERS[ode_solver]``,
    numbered ``first, first + 1, ...``.
    """
    _check_tail(ode_solver, flash_ratio)
    s = list(sigmas[first:]) if flash_ratio == 1 else flash_sigmas(sigmas[first:], flash_ratio)
    kind = ODE_SOLVERS[ode_solver]
    return [PlannedStep(first + k, s[k], s[k + 1], kind, None, False) for k in range(len(s) - 1)]


@dataclasses.dataclass
class FullSDEPlan:
    """Flow-GRPO (arXiv 2505.05470): SDE on every step, train on the first ``int(train_fraction * T)`` steps (at least 1).

    With ``ode_after_train=True`` the untrained tail is ODE (less noise in the final images, same log-probs),
    solved by ``ode_solver`` on a schedule compressed by ``flash_ratio`` (see :func:`ode_tail`); those two
    need ``ode_after_train``. ``kind="dance"`` with ``noise_level=0.3`` is DanceGRPO.
    """

    kind: str = "sde"
    noise_level: float = 0.7
    train_fraction: float = 0.9
    ode_after_train: bool = False
    ode_solver: str = "euler"
    flash_ratio: float = 1.0

    def __post_init__(self) -> None:
        _check(self.kind, self.noise_level)
        _check_tail(self.ode_solver, self.flash_ratio)
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        if not self.ode_after_train and (self.ode_solver != "euler" or self.flash_ratio != 1):
            raise ValueError("ode_solver / flash_ratio act on the ODE tail: they need ode_after_train=True")

    def __call__(self, sigmas: torch.Tensor | Sequence[float], iteration: int = 0) -> Plan:
        s = sigma_list(sigmas)
        T = len(s) - 1
        k = max(1, int(self.train_fraction * T + 1e-9))  # Flow-GRPO: int(T * timestep_fraction)
        n_sde = k if self.ode_after_train else T
        steps = [PlannedStep(i, s[i], s[i + 1], self.kind, self.noise_level, i < k) for i in range(n_sde)]
        steps += ode_tail(s, n_sde, self.ode_solver, self.flash_ratio)
        return Plan(tuple(steps))


@dataclasses.dataclass
class WindowPlan:
    """A sliding SDE window W = [l, l + w) of the T steps, ODE elsewhere; only window steps are trained.

    Window start ``l`` per iteration (MixGRPO, arXiv 2507.21802), always clamped to ``[0, T - w]``:
      - ``fixed``: l = ``start`` (Flow-GRPO-Fast; MixGRPO-Flash* with start 0).
      - ``random``: l uniform in [0, T - w], drawn from ``(seed, iteration)``.
      - ``progressive``: l = start + shift * (iteration // tau); past T - w it wraps to ``start`` if ``wrap``,
        else stays at T - w.
      - ``decay`` / ``exp_decay``: progressive, but position l is held for tau(l) iterations, shrinking once
        l > 13: ``decay``: tau(l) = max(1, tau - relu(l - 13)) (our reading of MixGRPO's linear decay);
        ``exp_decay``: tau(l) = ceil(tau * exp(-decay_k * relu(l - 13))) (MixGRPO, k = 0.1).

    The steps before the window are Euler steps on the original schedule; the steps after it form the ODE
    tail (``ode_solver``, ``flash_ratio``: MixGRPO-Flash, see :func:`ode_tail`).
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
    ode_solver: str = "euler"
    flash_ratio: float = 1.0

    def __post_init__(self) -> None:
        _check(self.kind, self.noise_level)
        _check_tail(self.ode_solver, self.flash_ratio)
        if self.schedule not in WINDOW_SCHEDULES:
            raise ValueError(f"window schedule {self.schedule!r} unknown; choose from {WINDOW_SCHEDULES}")
        if self.width < 1 or self.start < 0 or self.tau < 1 or self.shift < 1:
            raise ValueError(
                f"window needs width >= 1, start >= 0, tau >= 1, shift >= 1; got width={self.width}, "
                f"start={self.start}, tau={self.tau}, shift={self.shift}"
            )

    def window_start(self, num_steps: int, iteration: int) -> int:
        """The window's first step index l at ``iteration`` (0-based); a pure function of its arguments."""
        last = num_steps - self.width
        if last < 0:
            raise ValueError(f"window width {self.width} exceeds the {num_steps} sampling steps")
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        if self.schedule == "fixed":
            return min(self.start, last)
        if self.schedule == "random":
            return random.Random(self.seed * 1_000_003 + iteration).randint(0, last)
        l, it = min(self.start, last), 0
        if self.schedule == "progressive" and self.wrap:
            # constant hold, cyclic: closed form over the positions start, start + shift, ... <= last
            cycle = (last - l) // self.shift + 1
            return l + self.shift * ((iteration // self.tau) % cycle)
        while True:  # walk the schedule: each position l is held for tau(l) iterations
            hold = self._tau(l)
            if iteration < it + hold:
                return l
            it += hold
            l += self.shift
            if l > last:
                if not self.wrap:
                    return last
                l = min(self.start, last)

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
        end = l + self.width
        steps = [PlannedStep(i, s[i], s[i + 1], "ode", None, False) for i in range(l)]
        steps += [PlannedStep(i, s[i], s[i + 1], self.kind, self.noise_level, True) for i in range(l, end)]
        steps += ode_tail(s, end, self.ode_solver, self.flash_ratio)
        return Plan(tuple(steps))

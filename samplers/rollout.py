"""Run a :class:`~samplers.plans.Plan` with any velocity callable and keep what training needs.

``sample(velocity_fn, x, plan, noise_fn)`` integrates from sigma = 1 to the end of the plan. Per trained step it
stores the transition (x_t, x_next), the step's log-prob, Gaussian mean and std under the sampling policy: the
:class:`Rollout`. ``"dpm2m"`` steps (DPM-Solver++ 2M, the MixGRPO-Flash ODE tail) are multistep: each uses the
data prediction of the step before it when that step was also ``"dpm2m"`` (first order otherwise); this history
lives only inside the loop. Noise comes from ``noise_fn(step_index) -> [B, *D]``, so the caller controls seeding (flowrl makes
each sample's noise a function of (seed, iteration, sample index, step), independent of batch layout).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor

from .plans import Plan
from .solvers import dpm_solver_2m_step
from .steps import get_step_fn

VelocityFn = Callable[[Tensor, Tensor], Tensor]
NoiseFn = Callable[[int], Tensor]


@dataclasses.dataclass
class Rollout:
    """Stored transitions of B trajectories at the S trained steps of a plan (all fp32, detached).

    Attributes:
        latents: [B, S, *D] x at sigma (the step's input).
        next_latents: [B, S, *D] x at sigma_next (the sampled output).
        log_probs: [B, S] log p_old(next | x) (reduction as sampled, mean over elements by default).
        means: [B, S, *D] mean of the sampling Gaussian (GRPO-Guard, KL diagnostics).
        stds: [B, S] std of the sampling Gaussian.
        sigmas, sigmas_next: [S] the trained steps' noise levels.
        step_indices: [S] the trained steps' positions in the schedule.
        kinds, noise_levels: per trained step, the step function and its noise scale.
        final: [B, *D] the last latent of each trajectory (decode it for the image).
        nfe: velocity evaluations per trajectory (one per planned step, DPM-Solver steps included; before any
            CFG doubling). ``velocity_fn`` is called ``nfe`` times, each on the whole batch.
    """

    latents: Tensor
    next_latents: Tensor
    log_probs: Tensor
    means: Tensor
    stds: Tensor
    sigmas: Tensor
    sigmas_next: Tensor
    step_indices: Tensor
    kinds: tuple[str, ...]
    noise_levels: tuple[float | None, ...]
    final: Tensor
    nfe: int

    @property
    def batch_size(self) -> int:
        return self.final.shape[0]

    def select(self, idx: Tensor) -> "Rollout":
        """The rows ``idx`` (a [b] long tensor) of every per-sample field."""
        per = {f: getattr(self, f)[idx] for f in ("latents", "next_latents", "log_probs", "means", "stds", "final")}
        return dataclasses.replace(self, **per)

    @staticmethod
    def cat(rollouts: list["Rollout"]) -> "Rollout":
        """Concatenate rollouts of the same plan along the batch (``nfe`` is per trajectory, so it is kept)."""
        r0 = rollouts[0]
        if any(r.nfe != r0.nfe or r.kinds != r0.kinds for r in rollouts):
            raise ValueError("Rollout.cat needs rollouts of the same plan")
        per = {
            f: torch.cat([getattr(r, f) for r in rollouts])
            for f in ("latents", "next_latents", "log_probs", "means", "stds", "final")
        }
        return dataclasses.replace(r0, **per)


@torch.no_grad()
def sample(velocity_fn: VelocityFn, x: Tensor, plan: Plan, noise_fn: NoiseFn) -> Rollout:
    """Integrate ``x`` (at sigma = plan.steps[0].sigma) along ``plan``.

    Args:
        velocity_fn: ``(x [B, *D], sigma fp32 Tensor[]) -> v [B, *D]``.
        x: [B, *D] initial noise.
        plan: the steps to take.
        noise_fn: ``step_index -> [B, *D]`` standard normal noise for that step (called for SDE steps only).

    An all-``"ode"`` plan is exactly :func:`samplers.solvers.euler_ode` and an all-``"dpm2m"`` plan exactly
    :func:`samplers.solvers.dpm_solver_2m` on the plan's sigmas (same arithmetic, bit for bit).

    Returns:
        The :class:`Rollout` of the trained steps and the final latents.
    """
    x = x.float()
    store: dict[str, list[Tensor]] = {k: [] for k in ("latents", "next_latents", "log_probs", "means", "stds")}
    trained = [s for s in plan.steps if s.train]
    prev_x0: Tensor | None = None  # DPM-Solver++ 2M history: data prediction of the previous dpm2m step
    sigma_prev: float | None = None
    for step in plan.steps:
        sigma = torch.tensor(step.sigma, dtype=torch.float32, device=x.device)
        v = velocity_fn(x, sigma)
        if step.kind == "dpm2m":
            x0 = x - sigma * v.float()  # data prediction, fp32
            x = dpm_solver_2m_step(x, x0, prev_x0, sigma_prev, step.sigma, step.sigma_next)
            prev_x0, sigma_prev = x0, step.sigma
            continue
        prev_x0 = sigma_prev = None  # any other step breaks the multistep history
        fn = get_step_fn(step.kind)
        if step.kind == "ode":
            out = fn(v, x, step.sigma, step.sigma_next)
        else:
            out = fn(v, x, step.sigma, step.sigma_next, step.noise_level, noise=noise_fn(step.index).to(x.device))
        if step.train:
            store["latents"].append(x)
            store["next_latents"].append(out.prev_sample)
            store["log_probs"].append(out.log_prob)
            store["means"].append(out.mean)
            store["stds"].append(out.std)
        x = out.prev_sample
    B, D = x.shape[0], x.shape[1:]
    stacked = {
        k: (torch.stack(v, 1) if v else x.new_zeros((B, 0) + (D if k in ("latents", "next_latents", "means") else ())))
        for k, v in store.items()
    }
    return Rollout(
        **stacked,
        sigmas=torch.tensor([s.sigma for s in trained], dtype=torch.float32),
        sigmas_next=torch.tensor([s.sigma_next for s in trained], dtype=torch.float32),
        step_indices=torch.tensor([s.index for s in trained], dtype=torch.long),
        kinds=tuple(s.kind for s in trained),
        noise_levels=tuple(s.noise_level for s in trained),
        final=x,
        nfe=plan.nfe,
    )


def rescore(
    velocity: Tensor, rollout: Rollout, j: int, *, reduction: str = "mean"
) -> tuple[Tensor, Tensor, Tensor]:
    """Log-prob of the stored transition ``j`` under a new velocity: ``(log_prob [B], mean [B, *D], std [B])``.

    ``velocity`` is the model's output at (``rollout.latents[:, j]``, ``rollout.sigmas[j]``), with gradients.
    """
    fn = get_step_fn(rollout.kinds[j])
    out = fn(
        velocity,
        rollout.latents[:, j],
        float(rollout.sigmas[j]),
        float(rollout.sigmas_next[j]),
        rollout.noise_levels[j],
        prev_sample=rollout.next_latents[:, j],
        reduction=reduction,
    )
    return out.log_prob, out.mean, out.std

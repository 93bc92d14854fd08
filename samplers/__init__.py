"""Sampling steps and ODE solvers for flow-matching models.

A leaf package: it imports only ``torch`` (never ``flowrl`` or ``rewards``). A sampler receives a velocity
callable and knows nothing of the model that provides it.

* :mod:`samplers.steps` — pure one-step transitions returning :class:`StepOutput`
  (Euler ODE, Flow-GRPO SDE, CPS, DanceGRPO) and the GRPO-Guard factor :func:`dmean_dv`.
* :mod:`samplers.solvers` — ODE loops (Euler, DPM-Solver++ 2M) for the deterministic stretches of a plan.
* :mod:`samplers.plans` / :mod:`samplers.rollout` — linear plans (full SDE, windows) and their rollouts.
* :mod:`samplers.branching` — branching plans (TempFlow-GRPO, G²RPO, Dynamic-TreeRPO): one forward per branch node
  serves its K children, ODE continuations on any sub-schedule, rollouts of per-transition rows.
"""

from .solvers import VelocityFn, dpm_solver_2m, dpm_solver_2m_step, euler_ode, nfe
from .steps import (
    DEFAULT_NOISE_LEVELS,
    STEP_FUNCTIONS,
    StepOutput,
    cps_step,
    dance_grpo_step,
    dmean_dv,
    euler_step,
    flow_grpo_sde_step,
    flow_grpo_sigma_t,
    get_step_fn,
)

__all__ = [
    "StepOutput",
    "euler_step",
    "flow_grpo_sde_step",
    "cps_step",
    "dance_grpo_step",
    "flow_grpo_sigma_t",
    "dmean_dv",
    "STEP_FUNCTIONS",
    "DEFAULT_NOISE_LEVELS",
    "get_step_fn",
    "VelocityFn",
    "dpm_solver_2m_step",
    "dpm_solver_2m",
    "euler_ode",
    "nfe",
]

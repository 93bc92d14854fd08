"""Deterministic ODE solvers for flow-matching models (the ODE stretches of a sampling plan).

Flow matching as a diffusion: ``x_sigma = alpha * x0 + sigma * eps`` with ``alpha = 1 - sigma``, so the
half-log-SNR is ``lambda = log(alpha / sigma)`` and the data prediction is ``x0_hat = x - sigma * v``.

* :func:`euler_ode` — repeated :func:`samplers.steps.euler_step` (first order).
* :func:`dpm_solver_2m` — DPM-Solver++ 2M (Lu et al. 2022, arXiv 2211.01095, Algorithm 2: multistep,
  data prediction, second order), as used by MixGRPO-Flash after the SDE window.

Both take a ``velocity_fn(x, sigma) -> v`` callable (``sigma`` a float32 tensor of shape ``[]``) and use one
velocity evaluation per step: :func:`nfe` counts them. All arithmetic is float32 (inputs are upcast), and the
returned sample is float32.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .steps import _bcast, _per_sample, euler_step

__all__ = ["VelocityFn", "dpm_solver_2m_step", "dpm_solver_2m", "euler_ode", "nfe"]

VelocityFn = Callable[[Tensor, Tensor], Tensor]
"""``velocity_fn(x [B, *D], sigma [] float32) -> v [B, *D]``."""

ScalarOrTensor = Union[float, Tensor]


def _sigma_list(sigmas: Union[Tensor, Sequence[float]]) -> Tensor:
    s = torch.as_tensor(sigmas, dtype=torch.float32)
    if s.dim() != 1:
        raise ValueError(f"sigmas must be 1-D, got shape {tuple(s.shape)}")
    if s.numel() > 1 and not bool((s[1:] < s[:-1]).all()):
        raise ValueError("sigmas must be strictly decreasing")
    return s


def nfe(sigmas: Union[Tensor, Sequence[float]]) -> int:
    """Number of velocity evaluations :func:`euler_ode` and :func:`dpm_solver_2m` spend on ``sigmas``.

    One per step, i.e. ``len(sigmas) - 1`` (the final step to ``sigma = 0`` also needs one, to form
    ``x0_hat``); 0 for fewer than two sigmas.

    Args:
        sigmas (`torch.Tensor` of shape `[N]` or a sequence of floats): the schedule.
    """
    return max(len(sigmas) - 1, 0)


def dpm_solver_2m_step(
    x: Tensor,
    x0: Tensor,
    prev_x0: Optional[Tensor],
    sigma_prev: Optional[ScalarOrTensor],
    sigma: ScalarOrTensor,
    sigma_next: ScalarOrTensor,
) -> Tensor:
    """One DPM-Solver++ 2M step ``sigma -> sigma_next`` (data prediction, multistep), stateless.

    With ``alpha = 1 - sigma``, ``lambda = log(alpha / sigma)``, ``h = lambda_next - lambda``::

        first order (DPM-Solver++ 1 = DDIM):  x' = (sigma_next / sigma) x - alpha_next (e^{-h} - 1) D
        D = x0                                                  if prev_x0 is None
        D = (1 + 1/(2r)) x0 - 1/(2r) prev_x0,  r = h_prev / h,  h_prev = lambda - lambda_prev   otherwise

    ``e^{-h} = (alpha * sigma_next) / (sigma * alpha_next)`` is computed as a ratio, so a step starting at
    ``sigma = 1`` (``lambda = -inf``) is well defined, and ``sigma_prev = 1`` gives ``1/r = 0`` (the first-order
    update: an infinite ``lambda`` interval carries no derivative information). For flow matching the
    first-order update equals the Euler step ``x - (sigma - sigma_next) v`` algebraically.
    Where ``sigma_next == 0`` the step returns ``x0`` (lower-order final step; ``lambda_next = +inf``).

    Args:
        x (`torch.Tensor` of shape `[B, *D]`): current sample at ``sigma``.
        x0 (`torch.Tensor` of shape `[B, *D]`): data prediction at ``(x, sigma)``, ``x - sigma * v``.
        prev_x0 (`torch.Tensor` of shape `[B, *D]`, *optional*): data prediction of the previous step
            (at ``sigma_prev``); ``None`` gives the first-order step.
        sigma_prev (`float` or `torch.Tensor` of shape `[]` or `[B]`, *optional*): the previous step's
            sigma; required when ``prev_x0`` is given.
        sigma (`float` or `torch.Tensor` of shape `[]` or `[B]`, in (0, 1]): current sigma.
        sigma_next (`float` or `torch.Tensor` of shape `[]` or `[B]`, in [0, sigma)): next sigma.

    Returns:
        `torch.Tensor` of shape `[B, *D]`, float32: the sample at ``sigma_next``.
    """
    if x.shape != x0.shape:
        raise ValueError(f"x and x0 must have the same shape, got {tuple(x.shape)} and {tuple(x0.shape)}")
    # fp32 upcast: the multistep combination subtracts nearby data predictions.
    x32 = x.float()
    x0_32 = x0.float()
    b = x.shape[0]
    s = _per_sample(sigma, b, x.device, "sigma")
    sn = _per_sample(sigma_next, b, x.device, "sigma_next")
    alpha, alpha_n = 1.0 - s, 1.0 - sn
    final = sn <= 0.0
    one = torch.ones_like(sn)
    sn_safe = torch.where(final, one, sn)  # keeps the masked-out branch finite
    exp_neg_h = (alpha * sn) / (s * alpha_n)
    coef_x = sn / s
    coef_d = alpha_n * (1.0 - exp_neg_h)  # = -alpha_next (e^{-h} - 1)
    d = x0_32
    if prev_x0 is not None:
        if sigma_prev is None:
            raise ValueError("sigma_prev is required when prev_x0 is given")
        sp = _per_sample(sigma_prev, b, x.device, "sigma_prev")
        lam = torch.log(alpha) - torch.log(s)
        lam_prev = torch.log(1.0 - sp) - torch.log(sp)
        lam_next = torch.log(torch.where(final, one, alpha_n)) - torch.log(sn_safe)
        h = lam_next - lam
        h_prev = lam - lam_prev
        inv_2r = torch.where(final, torch.zeros_like(h), 0.5 * h / h_prev)  # 1/(2r) = h / (2 h_prev)
        d = x0_32 + _bcast(inv_2r, x32) * (x0_32 - prev_x0.float())
    x_next = _bcast(coef_x, x32) * x32 + _bcast(coef_d, x32) * d
    return torch.where(_bcast(final, x32), x0_32, x_next)


def dpm_solver_2m(velocity_fn: VelocityFn, x: Tensor, sigmas: Union[Tensor, Sequence[float]]) -> Tensor:
    """Integrate the flow ODE along ``sigmas`` with DPM-Solver++ 2M.

    The first step is first order (no history); each later step uses the previous data prediction; a step
    to ``sigma = 0`` returns the data prediction (lower-order final). ``sigmas`` need not end at 0 (an ODE
    stretch in the middle of a plan).

    Args:
        velocity_fn (`Callable[[Tensor, Tensor], Tensor]`): ``velocity_fn(x [B, *D], sigma [] float32) -> v``.
        x (`torch.Tensor` of shape `[B, *D]`): sample at ``sigmas[0]``.
        sigmas (`torch.Tensor` of shape `[N]` or sequence, strictly decreasing, in [0, 1]): the schedule.

    Returns:
        `torch.Tensor` of shape `[B, *D]`, float32: the sample at ``sigmas[-1]``; ``nfe(sigmas)`` calls.
    """
    sig = _sigma_list(sigmas).to(x.device)
    x = x.float()  # fp32 upcast
    prev_x0: Optional[Tensor] = None
    sigma_prev: Optional[Tensor] = None
    for i in range(sig.numel() - 1):
        s, sn = sig[i], sig[i + 1]
        v = velocity_fn(x, s).float()
        x0 = x - s * v
        x = dpm_solver_2m_step(x, x0, prev_x0, sigma_prev, s, sn)
        prev_x0, sigma_prev = x0, s
    return x


def euler_ode(velocity_fn: VelocityFn, x: Tensor, sigmas: Union[Tensor, Sequence[float]]) -> Tensor:
    """Integrate the flow ODE along ``sigmas`` with Euler steps (:func:`samplers.steps.euler_step`).

    Args:
        velocity_fn (`Callable[[Tensor, Tensor], Tensor]`): ``velocity_fn(x [B, *D], sigma [] float32) -> v``.
        x (`torch.Tensor` of shape `[B, *D]`): sample at ``sigmas[0]``.
        sigmas (`torch.Tensor` of shape `[N]` or sequence, strictly decreasing, in [0, 1]): the schedule.

    Returns:
        `torch.Tensor` of shape `[B, *D]`, float32: the sample at ``sigmas[-1]``; ``nfe(sigmas)`` calls.
    """
    sig = _sigma_list(sigmas).to(x.device)
    x = x.float()  # fp32 upcast
    for i in range(sig.numel() - 1):
        x = euler_step(velocity_fn(x, sig[i]), x, sig[i], sig[i + 1]).prev_sample
    return x

"""Pure, stateless step functions for flow-matching samplers.

Every function here takes one model velocity ``v`` at the current sample ``x`` and advances it by one
step of the sampling schedule, returning a :class:`StepOutput`. Unlike diffusers' ``scheduler.step()``,
nothing is stored between calls: the schedule position is passed explicitly as ``(sigma, sigma_next)``.

Notation (shared with ``ALGORITHMS.md``):

* sigmas run from 1 (pure noise) to 0 (image); one step goes ``sigma -> sigma_next`` with
  ``dt = sigma - sigma_next > 0``;
* ``x_sigma = (1 - sigma) * x0 + sigma * eps`` and the model velocity is ``v ≈ eps - x0``;
* hence the model's data prediction is ``x0_hat = x - sigma * v`` and its noise prediction is
  ``x1_hat = x + (1 - sigma) * v``.

Getting the next sample. Each stochastic step is a Gaussian transition ``N(mean, std²·I)``. The sample at
``sigma_next`` comes from exactly one source:

1. ``prev_sample`` given: the stored sample is *scored* (training-time rescoring, nothing is drawn);
2. ``noise`` given (standard normal, shape ``[B, *D]``): ``prev_sample = mean + std * noise``;
3. otherwise noise is drawn with ``torch.randn(..., generator=generator)``.

Passing more than one of ``prev_sample`` / ``noise`` / ``generator`` is an error. The log-prob is always
computed from ``prev_sample - mean`` (with ``prev_sample`` detached, the sample being a constant of the
policy), so rescoring a sample returns bit-identically the log-prob computed when it was drawn, given the
same inputs.

Precision. All arithmetic happens in float32 whatever the dtype of ``v`` / ``x`` (bf16 model outputs
included): the log-prob of a near-deterministic transition divides small differences by a small variance,
and the PPO ratio ``exp(logp_new - logp_old)`` is compared against clip ranges as small as 1e-6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

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
]

ScalarOrTensor = Union[float, Tensor]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_REDUCTIONS = ("mean", "sum")


@dataclass
class StepOutput:
    """Output of one sampling step.

    Args:
        prev_sample (`torch.Tensor` of shape `[B, *D]`, float32):
            The sample at ``sigma_next`` (the name follows diffusers: the *previous* timestep index).
        log_prob (`torch.Tensor` of shape `[B]`, float32):
            ``log p(prev_sample | x)`` under the step's transition, reduced over all non-batch elements
            (mean by default, or sum). Zeros for the deterministic ODE step.
        mean (`torch.Tensor` of shape `[B, *D]`, float32):
            Mean of the Gaussian transition (for the ODE step, the deterministic next sample).
        std (`torch.Tensor` of shape `[B]`, float32):
            Per-sample standard deviation of the transition (zeros for the ODE step).
    """

    prev_sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _per_sample(value: ScalarOrTensor, batch: int, device: torch.device, name: str) -> Tensor:
    """Turn a python float or a tensor of shape ``[]`` / ``[B]`` into a float32 tensor of shape ``[B]``."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    if t.dim() == 0:
        return t.expand(batch)
    if t.dim() == 1 and t.shape[0] in (1, batch):
        return t.expand(batch)
    raise ValueError(
        f"{name} must be a python float or a tensor of shape [] or [B] with B={batch}, got shape {tuple(t.shape)}"
    )


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    """View a ``[B]`` tensor as ``[B, 1, ..., 1]`` so it broadcasts over the trailing dims of ``like``."""
    return t.view(t.shape[0], *([1] * (like.dim() - 1)))


def _reduce(elementwise: Tensor, reduction: str) -> Tensor:
    """Reduce ``[B, *D]`` to ``[B]`` over all non-batch elements."""
    flat = elementwise.reshape(elementwise.shape[0], -1)
    if reduction == "mean":
        return flat.mean(dim=1)
    if reduction == "sum":
        return flat.sum(dim=1)
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _prepare(v: Tensor, x: Tensor, sigma: ScalarOrTensor, sigma_next: ScalarOrTensor):
    """Upcast inputs to float32 and make per-sample sigmas of shape ``[B]``."""
    if v.shape != x.shape:
        raise ValueError(f"v and x must have the same shape, got {tuple(v.shape)} and {tuple(x.shape)}")
    if x.dim() < 1:
        raise ValueError("x must have a leading batch dimension")
    # fp32 upcast: all step arithmetic (means, variances, log-probs) is done in float32, whatever the
    # model dtype, so that sampling-time and training-time log-probs agree to the last bit.
    v32 = v.float()
    x32 = x.float()
    b = x.shape[0]
    s = _per_sample(sigma, b, x.device, "sigma")
    sn = _per_sample(sigma_next, b, x.device, "sigma_next")
    return v32, x32, s, sn


def _sample(
    mean: Tensor,
    std: Tensor,
    noise: Optional[Tensor],
    prev_sample: Optional[Tensor],
    generator: Optional[torch.Generator],
) -> Tensor:
    """Return the next sample from exactly one source: ``prev_sample``, ``noise`` or ``generator``."""
    given = [n for n, a in (("prev_sample", prev_sample), ("noise", noise), ("generator", generator)) if a is not None]
    if len(given) > 1:
        raise ValueError(f"pass at most one of prev_sample, noise, generator; got {', '.join(given)}")
    if prev_sample is not None:
        if prev_sample.shape != mean.shape:
            raise ValueError(f"prev_sample must have shape {tuple(mean.shape)}, got {tuple(prev_sample.shape)}")
        return prev_sample.float()  # fp32 upcast of a (possibly low-precision) stored sample
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    elif noise.shape != mean.shape:
        raise ValueError(f"noise must have shape {tuple(mean.shape)}, got {tuple(noise.shape)}")
    return mean + _bcast(std, mean) * noise.float()  # fp32 upcast of the noise


def _gaussian_log_prob(prev_sample: Tensor, mean: Tensor, std: Tensor, reduction: str) -> Tensor:
    """Exact log N(prev_sample; mean, std²) per element, reduced to ``[B]``.

    ``prev_sample`` is detached: it is a constant of the policy whose log-prob is taken.
    """
    s = _bcast(std, mean)
    elementwise = -((prev_sample.detach() - mean) ** 2) / (2.0 * s**2) - torch.log(s) - _HALF_LOG_2PI
    return _reduce(elementwise, reduction)


# ----------------------------------------------------------------------------------------------------------
# step functions
# ----------------------------------------------------------------------------------------------------------


def euler_step(
    v: Tensor,
    x: Tensor,
    sigma: ScalarOrTensor,
    sigma_next: ScalarOrTensor,
    noise_level: Optional[ScalarOrTensor] = None,
    *,
    noise: Optional[Tensor] = None,
    prev_sample: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    reduction: str = "mean",
) -> StepOutput:
    """Deterministic Euler step of the probability-flow ODE: ``x' = x - dt * v``.

    Args:
        v (`torch.Tensor` of shape `[B, *D]`, any float dtype):
            Model velocity at ``(x, sigma)`` (``v ≈ eps - x0``).
        x (`torch.Tensor` of shape `[B, *D]`, any float dtype):
            Current sample at noise level ``sigma``.
        sigma (`float` or `torch.Tensor` of shape `[]` or `[B]`, in (0, 1]):
            Current noise level.
        sigma_next (`float` or `torch.Tensor` of shape `[]` or `[B]`, in [0, sigma)):
            Next noise level; ``dt = sigma - sigma_next``.
        noise_level, noise, generator:
            Accepted for a uniform interface with the stochastic steps and ignored.
        prev_sample (`torch.Tensor` of shape `[B, *D]`, *optional*):
            If given it is returned (upcast to float32) as ``prev_sample`` instead of the Euler update.
        reduction (`str`, defaults to `"mean"`):
            Validated for a uniform interface; the log-prob is zero either way.

    Returns:
        [`StepOutput`]: ``prev_sample = mean = x - dt * v`` (float32); ``log_prob`` and ``std`` are zeros
        of shape ``[B]`` (an ODE step has no density; zero is the convention).
    """
    del noise_level, noise, generator  # deterministic step
    _check_reduction(reduction)
    v32, x32, s, sn = _prepare(v, x, sigma, sigma_next)
    dt = _bcast(s - sn, x32)
    mean = x32 - dt * v32
    if prev_sample is None:
        out = mean
    elif prev_sample.shape != mean.shape:
        raise ValueError(f"prev_sample must have shape {tuple(mean.shape)}, got {tuple(prev_sample.shape)}")
    else:
        out = prev_sample.float()  # fp32 upcast of a stored sample
    zeros = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    return StepOutput(prev_sample=out, log_prob=zeros, mean=mean, std=zeros.clone())


def flow_grpo_sigma_t(
    sigma: ScalarOrTensor,
    sigma_next: ScalarOrTensor,
    noise_level: ScalarOrTensor = 0.7,
    *,
    sigma_max_clamp: Optional[ScalarOrTensor] = None,
    batch: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> Tensor:
    """Flow-GRPO diffusion coefficient ``sigma_t = a * sqrt(sigma / (1 - sigma))`` (arXiv 2505.05470).

    At ``sigma >= 1`` the denominator would vanish; the reference code then puts the *second* sigma of the
    schedule in the denominator: ``sigma_t = a * sqrt(sigma / (1 - sigmas[1]))``. Being stateless, this
    function uses ``sigma_max_clamp`` if given, otherwise ``sigma_next`` (which *is* ``sigmas[1]`` when the
    step starts at ``sigmas[0] = 1``, so the default reproduces the reference).

    Args:
        sigma (`float` or `torch.Tensor` of shape `[]` or `[B]`, in (0, 1]): current noise level.
        sigma_next (`float` or `torch.Tensor` of shape `[]` or `[B]`, in [0, sigma)): next noise level.
        noise_level (`float` or `torch.Tensor` of shape `[]` or `[B]`, >= 0): the factor ``a``
            (0.7 for SD3.5, 0.9 for Flux in the reference).
        sigma_max_clamp (`float` or `torch.Tensor`, *optional*): the value replacing ``sigma`` in the
            denominator where ``sigma >= 1``. Defaults to ``sigma_next``.
        batch (`int`, *optional*): batch size ``B`` (inferred from the tensor arguments if omitted).
        device (`torch.device`, *optional*): device of the result.

    Returns:
        `torch.Tensor` of shape `[B]`, float32 (shape `[]` when all inputs are scalars and ``batch`` is
        not given).
    """
    scalar = False
    if batch is None:
        sizes = [t.numel() for t in (sigma, sigma_next, noise_level) if isinstance(t, Tensor) and t.dim() > 0]
        scalar = not sizes
        batch = max(sizes) if sizes else 1
    if device is None:
        tensors = [t for t in (sigma, sigma_next, noise_level) if isinstance(t, Tensor)]
        device = tensors[0].device if tensors else torch.device("cpu")
    s = _per_sample(sigma, batch, device, "sigma")
    sn = _per_sample(sigma_next, batch, device, "sigma_next")
    a = _per_sample(noise_level, batch, device, "noise_level")
    clamp = sn if sigma_max_clamp is None else _per_sample(sigma_max_clamp, batch, device, "sigma_max_clamp")
    denom_sigma = torch.where(s >= 1.0, clamp, s)
    out = a * torch.sqrt(s / (1.0 - denom_sigma))
    return out[0] if scalar else out


def flow_grpo_sde_step(
    v: Tensor,
    x: Tensor,
    sigma: ScalarOrTensor,
    sigma_next: ScalarOrTensor,
    noise_level: ScalarOrTensor = 0.7,
    *,
    noise: Optional[Tensor] = None,
    prev_sample: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    reduction: str = "mean",
    sigma_max_clamp: Optional[ScalarOrTensor] = None,
) -> StepOutput:
    """Flow-GRPO SDE step (arXiv 2505.05470, the marginal-preserving reverse SDE, Euler–Maruyama).

    With ``sigma_t = a * sqrt(sigma / (1 - sigma))`` (see :func:`flow_grpo_sigma_t` for ``sigma = 1``)::

        mean = x + [ -v - sigma_t² / (2 sigma) * (x + (1 - sigma) v) ] * dt
        std  = sigma_t * sqrt(dt)
        x'   = mean + std * eps
        log p(x'|x) = reduce over elements of [ -(x' - mean)² / (2 std²) - log std - ½ log 2π ]

    Args:
        v (`torch.Tensor` of shape `[B, *D]`, any float dtype):
            Model velocity at ``(x, sigma)``.
        x (`torch.Tensor` of shape `[B, *D]`, any float dtype):
            Current sample at noise level ``sigma``.
        sigma (`float` or `torch.Tensor` of shape `[]` or `[B]`, in (0, 1]):
            Current noise level (must be > 0).
        sigma_next (`float` or `torch.Tensor` of shape `[]` or `[B]`, in [0, sigma)):
            Next noise level.
        noise_level (`float` or `torch.Tensor` of shape `[]` or `[B]`, > 0, defaults to 0.7):
            The factor ``a`` (0.7 SD3.5, 0.9 Flux). With 0 the log-prob is undefined (std = 0).
        noise (`torch.Tensor` of shape `[B, *D]`, *optional*):
            Standard-normal noise ``eps``; ``prev_sample = mean + std * noise``.
        prev_sample (`torch.Tensor` of shape `[B, *D]`, *optional*):
            A stored next sample to score (training-time rescoring); nothing is drawn.
        generator (`torch.Generator`, *optional*):
            Used to draw ``eps`` when neither ``noise`` nor ``prev_sample`` is given.
        reduction (`str`, `"mean"` or `"sum"`, defaults to `"mean"`):
            How the per-element log-density is reduced over the non-batch elements (the references and the
            clip ranges in ``ALGORITHMS.md`` assume the mean).
        sigma_max_clamp (`float` or `torch.Tensor`, *optional*):
            Replaces ``sigma`` in the ``sigma_t`` denominator where ``sigma >= 1``; defaults to ``sigma_next``.

    Returns:
        [`StepOutput`] with float32 ``prev_sample``/``mean`` of shape ``[B, *D]`` and ``log_prob``/``std``
        of shape ``[B]``.
    """
    _check_reduction(reduction)
    v32, x32, s, sn = _prepare(v, x, sigma, sigma_next)
    sigma_t = flow_grpo_sigma_t(s, sn, noise_level, sigma_max_clamp=sigma_max_clamp, batch=x.shape[0], device=x.device)
    dt = s - sn
    st2 = _bcast(sigma_t**2, x32)
    s_b = _bcast(s, x32)
    mean = x32 + (-v32 - st2 / (2.0 * s_b) * (x32 + (1.0 - s_b) * v32)) * _bcast(dt, x32)
    std = sigma_t * torch.sqrt(dt)
    nxt = _sample(mean, std, noise, prev_sample, generator)
    return StepOutput(prev_sample=nxt, log_prob=_gaussian_log_prob(nxt, mean, std, reduction), mean=mean, std=std)


def cps_step(
    v: Tensor,
    x: Tensor,
    sigma: ScalarOrTensor,
    sigma_next: ScalarOrTensor,
    noise_level: ScalarOrTensor = 0.8,
    *,
    noise: Optional[Tensor] = None,
    prev_sample: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    reduction: str = "mean",
    log_prob_type: str = "reference",
) -> StepOutput:
    """Coefficients-Preserving Sampling step (CPS, arXiv 2509.05952).

    With ``eta = noise_level``, ``sigma_c = sigma_next * sin(eta * π / 2)``, ``x0 = x - sigma v`` and
    ``x1 = x + (1 - sigma) v``, the paper's transition is::

        mean = (1 - sigma_next) x0 + sqrt(sigma_next² - sigma_c²) x1,   std = sigma_c,   x' = mean + std * eps

    so the coefficients of data and noise in ``x'`` stay ``(1 - sigma_next, sigma_next)``. It is computed in
    the algebraically identical form ``mean = (x - dt v) - delta * x1`` with
    ``delta = sigma_next - sqrt(sigma_next² - sigma_c²) = sigma_c² / (sigma_next + sqrt(sigma_next² - sigma_c²))``
    (0 where ``sigma_next = 0``), so that ``eta = 0`` gives *bit-exactly* the Euler step.

    Log-prob (``log_prob_type``):

    * ``"reference"`` (default): the flow_grpo CPS surrogate ``-(x' - mean)²`` reduced over elements: the
      variance and all constants are dropped (the ratio ``exp(logp_new - logp_old)`` is then not a Gaussian
      likelihood ratio; flow_grpo pairs it with clip range 1e-5). Zero at ``eta = 0``.
    * ``"gaussian"``: the exact ``log N(x'; mean, sigma_c²)`` (undefined at ``eta = 0`` or
      ``sigma_next = 0``, where ``sigma_c = 0``).

    Args:
        v (`torch.Tensor` of shape `[B, *D]`, any float dtype):
            Model velocity at ``(x, sigma)``.
        x (`torch.Tensor` of shape `[B, *D]`, any float dtype):
            Current sample at noise level ``sigma``.
        sigma (`float` or `torch.Tensor` of shape `[]` or `[B]`, in (0, 1]):
            Current noise level.
        sigma_next (`float` or `torch.Tensor` of shape `[]` or `[B]`, in [0, sigma)):
            Next noise level.
        noise_level (`float` or `torch.Tensor` of shape `[]` or `[B]`, in [0, 1], defaults to 0.8):
            ``eta``; 0 is the ODE, 1 replaces all of the noise (flow_grpo's CPS configs use 0.8).
        noise, prev_sample, generator:
            The source of the next sample, as in :func:`flow_grpo_sde_step`.
        reduction (`str`, `"mean"` or `"sum"`, defaults to `"mean"`):
            Reduction of the log-prob over non-batch elements.
        log_prob_type (`str`, `"reference"` or `"gaussian"`, defaults to `"reference"`):
            Which log-prob to return (see above).

    Returns:
        [`StepOutput`] (float32); ``std = sigma_c`` of shape ``[B]``.
    """
    _check_reduction(reduction)
    if log_prob_type not in ("reference", "gaussian"):
        raise ValueError(f"log_prob_type must be 'reference' or 'gaussian', got {log_prob_type!r}")
    v32, x32, s, sn = _prepare(v, x, sigma, sigma_next)
    eta = _per_sample(noise_level, x.shape[0], x.device, "noise_level")
    sigma_c = sn * torch.sin(eta * (math.pi / 2.0))
    root = torch.sqrt(torch.clamp(sn**2 - sigma_c**2, min=0.0))
    # delta = sigma_next - root, written without cancellation; 0 (not 0/0) where sigma_next = 0
    denom = sn + root
    safe = denom > 0
    delta = torch.where(safe, sigma_c**2 / torch.where(safe, denom, torch.ones_like(denom)), torch.zeros_like(denom))
    s_b = _bcast(s, x32)
    x1 = x32 + (1.0 - s_b) * v32  # noise prediction
    mean = (x32 - _bcast(s - sn, x32) * v32) - _bcast(delta, x32) * x1
    nxt = _sample(mean, sigma_c, noise, prev_sample, generator)
    if log_prob_type == "reference":
        log_prob = _reduce(-((nxt.detach() - mean) ** 2), reduction)
    else:
        log_prob = _gaussian_log_prob(nxt, mean, sigma_c, reduction)
    return StepOutput(prev_sample=nxt, log_prob=log_prob, mean=mean, std=sigma_c)


def dance_grpo_step(
    v: Tensor,
    x: Tensor,
    sigma: ScalarOrTensor,
    sigma_next: ScalarOrTensor,
    noise_level: ScalarOrTensor = 0.3,
    *,
    noise: Optional[Tensor] = None,
    prev_sample: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    reduction: str = "mean",
) -> StepOutput:
    """DanceGRPO step (arXiv 2505.07818, ``flux_step``): an SDE step with a constant diffusion ``eta``.

    With ``eta = noise_level``, ``x0 = x - sigma v`` and ``score = -(x - (1 - sigma) x0) / sigma²``::

        mean = x - dt * (v - ½ eta² score),   std = eta * sqrt(dt),   x' = mean + std * eps
        log p(x'|x) = reduce over elements of [ -(x' - mean)² / (2 std²) - log std - ½ log 2π ]

    Since ``score = -(x + (1 - sigma) v) / sigma``, this is the Flow-GRPO SDE mean with ``sigma_t = eta``.

    Args:
        v (`torch.Tensor` of shape `[B, *D]`, any float dtype):
            Model velocity at ``(x, sigma)``.
        x (`torch.Tensor` of shape `[B, *D]`, any float dtype):
            Current sample at noise level ``sigma``.
        sigma (`float` or `torch.Tensor` of shape `[]` or `[B]`, in (0, 1]):
            Current noise level (must be > 0).
        sigma_next (`float` or `torch.Tensor` of shape `[]` or `[B]`, in [0, sigma)):
            Next noise level.
        noise_level (`float` or `torch.Tensor` of shape `[]` or `[B]`, > 0, defaults to 0.3):
            The constant ``eta``.
        noise, prev_sample, generator:
            The source of the next sample, as in :func:`flow_grpo_sde_step`.
        reduction (`str`, `"mean"` or `"sum"`, defaults to `"mean"`):
            Reduction of the log-prob over non-batch elements.

    Returns:
        [`StepOutput`] (float32); ``std = eta * sqrt(dt)`` of shape ``[B]``.
    """
    _check_reduction(reduction)
    v32, x32, s, sn = _prepare(v, x, sigma, sigma_next)
    eta = _per_sample(noise_level, x.shape[0], x.device, "noise_level")
    dt = s - sn
    s_b = _bcast(s, x32)
    x0 = x32 - s_b * v32
    score = -(x32 - (1.0 - s_b) * x0) / s_b**2
    mean = x32 - _bcast(dt, x32) * (v32 - 0.5 * _bcast(eta**2, x32) * score)
    std = eta * torch.sqrt(dt)
    nxt = _sample(mean, std, noise, prev_sample, generator)
    return StepOutput(prev_sample=nxt, log_prob=_gaussian_log_prob(nxt, mean, std, reduction), mean=mean, std=std)


# ----------------------------------------------------------------------------------------------------------
# registry and GRPO-Guard reweighting
# ----------------------------------------------------------------------------------------------------------

STEP_FUNCTIONS: dict[str, Callable[..., StepOutput]] = {
    "ode": euler_step,
    "sde": flow_grpo_sde_step,
    "cps": cps_step,
    "dance": dance_grpo_step,
}
"""Step functions by name: ``"ode"`` (Euler), ``"sde"`` (Flow-GRPO), ``"cps"``, ``"dance"`` (DanceGRPO)."""

DEFAULT_NOISE_LEVELS: dict[str, Optional[float]] = {"ode": None, "sde": 0.7, "cps": 0.8, "dance": 0.3}
"""The default ``noise_level`` of each step function."""


def _check_kind(name: str) -> None:
    if name not in STEP_FUNCTIONS:
        raise ValueError(f"unknown step kind {name!r}; allowed: {', '.join(sorted(STEP_FUNCTIONS))}")


def get_step_fn(name: str) -> Callable[..., StepOutput]:
    """Return the step function registered under ``name`` (one of ``"cps"``, ``"dance"``, ``"ode"``, ``"sde"``).

    Raises:
        ValueError: if ``name`` is unknown; the message lists the allowed names.
    """
    _check_kind(name)
    return STEP_FUNCTIONS[name]


def dmean_dv(
    kind: str,
    sigma: ScalarOrTensor,
    sigma_next: ScalarOrTensor,
    noise_level: Optional[ScalarOrTensor] = None,
    *,
    sigma_max_clamp: Optional[ScalarOrTensor] = None,
) -> Tensor:
    """``|∂ mean / ∂ v|`` of a step: the GRPO-Guard gradient reweighting divides each step's loss by it.

    Every step mean is affine in ``v`` with a scalar (per-sample) coefficient:

    * ``"ode"``: ``mean = x - dt v`` -> ``dt``;
    * ``"sde"`` (Flow-GRPO): ``dt * (1 + sigma_t² (1 - sigma) / (2 sigma))``;
    * ``"cps"``: ``|-(1 - sigma_next) sigma + sqrt(sigma_next² - sigma_c²) (1 - sigma)|``;
    * ``"dance"``: from ``score = -(x + (1 - sigma) v) / sigma``, ``∂ score / ∂ v = -(1 - sigma) / sigma`` so
      ``∂ mean / ∂ v = -dt (1 + eta² (1 - sigma) / (2 sigma))`` -> ``dt * (1 + eta² (1 - sigma) / (2 sigma))``
      (the Flow-GRPO value with ``sigma_t = eta``).

    Args:
        kind (`str`): one of ``"cps"``, ``"dance"``, ``"ode"``, ``"sde"``.
        sigma (`float` or `torch.Tensor` of shape `[]` or `[B]`): current noise level.
        sigma_next (`float` or `torch.Tensor` of shape `[]` or `[B]`): next noise level.
        noise_level (`float` or `torch.Tensor`, *optional*): the step's noise level; defaults to
            ``DEFAULT_NOISE_LEVELS[kind]``. Ignored for ``"ode"``.
        sigma_max_clamp (`float` or `torch.Tensor`, *optional*): as in :func:`flow_grpo_sde_step` (``"sde"`` only).

    Returns:
        `torch.Tensor` of shape `[B]`, float32, positive (shape `[]` when all inputs are scalars).
    """
    _check_kind(kind)
    if noise_level is None:
        noise_level = DEFAULT_NOISE_LEVELS[kind]
    tensors = [t for t in (sigma, sigma_next, noise_level) if isinstance(t, Tensor)]
    sizes = [t.numel() for t in tensors if t.dim() > 0]
    batch = max(sizes) if sizes else 1
    device = tensors[0].device if tensors else torch.device("cpu")
    s = _per_sample(sigma, batch, device, "sigma")
    sn = _per_sample(sigma_next, batch, device, "sigma_next")
    dt = s - sn
    if kind == "ode":
        out = dt.clone()
    elif kind == "sde":
        st = flow_grpo_sigma_t(s, sn, noise_level, sigma_max_clamp=sigma_max_clamp, batch=batch, device=device)
        out = dt * (1.0 + st**2 * (1.0 - s) / (2.0 * s))
    elif kind == "dance":
        eta = _per_sample(noise_level, batch, device, "noise_level")
        out = dt * (1.0 + eta**2 * (1.0 - s) / (2.0 * s))
    else:  # cps
        eta = _per_sample(noise_level, batch, device, "noise_level")
        sigma_c = sn * torch.sin(eta * (math.pi / 2.0))
        root = torch.sqrt(torch.clamp(sn**2 - sigma_c**2, min=0.0))
        out = torch.abs(-(1.0 - sn) * s + root * (1.0 - s))
    return out if sizes else out[0]

"""Branching samplers: trajectories that split at chosen states (TempFlow-GRPO, G²RPO, Dynamic-TreeRPO).

A *branch node* is a latent x at a schedule position i. ONE velocity evaluation ``v = v(x, sigma_i)`` serves all of
its K children: the step's Gaussian ``N(mean_i, s_i²)`` depends on (x, v) only, so the children
``x_{i+1}^k = mean_i + s_i·eps_k`` are K draws from one transition (:func:`branch_step`). Each child either becomes
a branch node of the next level (a tree) or is *finished* by an ODE continuation on any sub-schedule of sigmas
(Euler or DPM-Solver++ 2M, :func:`ode_continue`); a continuation that stops above sigma = 0 is decoded as the data
prediction ``x0_hat = x - sigma·v`` at its last evaluated step.

What is stored (:class:`BranchRollout`) is per *transition row* (node -> child): the node's state, sigma, step kind,
noise level, Gaussian mean and std (per node: shared by its children), the child sample and its log-prob under the
sampling policy, and per *leaf* the finished latent and the row it descends from. Rewards are attached to leaves,
advantages to rows, i.e. to (step, node) pairs, so training rescores each row exactly as a linear rollout's step
(:func:`rescore_rows`), with one forward per node again serving all of its rows.

Plans (model-agnostic, pure functions of ``(sigmas, iteration)`` like :mod:`samplers.plans`) produce a
:class:`BranchSpec`; :func:`sample_branching` executes any spec:

- :class:`TempFlowPlan` — TempFlow-GRPO (arXiv 2508.04324): an ODE main trajectory; at each branch step i, K SDE
  children, each finished by ODE to sigma = 0 (a process reward for step i).
- :class:`G2RPOPlan` — G²RPO (arXiv 2510.01982): an ODE anchor; at each branch step k, G SDE children, each finished
  once per granularity g on ``sigmas[:k+2] + sigmas[k+2::g]`` (:func:`granularity_sigmas`).
- :class:`TreePlan` — Dynamic-TreeRPO (arXiv 2509.23352): a b-ary tree of depth d inside a (sliding) window, ODE
  before it, each leaf finished by the ODE tail (MixGRPO-Flash options).

Execution order and batching. Branch levels run first, in schedule order; every level evaluates all current nodes
(across roots and prompts, which share sigma) in chunks of ``batch_size``, and those chunks are recorded
(``node_batches``): training replays exactly the same chunks, so the first, on-policy pass reproduces the sampling
velocities bit for bit (transformer outputs depend on batch composition). All ODE continuations then run in one pool,
highest sigma first, batching together every pending state at the same sigma; continuations of one child that share a
sigma prefix (G²RPO's granularities share their first two evaluations) share those evaluations, since equal prefixes
give equal states and velocities.

NFE (velocity evaluations, before any CFG doubling) is counted exactly: one per state per evaluation
(``BranchRollout.nfe``; :func:`spec_nfe` predicts it from the spec alone).

Noise. ``noise_fn(keys)`` returns one standard-normal tensor per key ``(root_id, step_index, path, child)``: the
caller seeds each child's noise by its place in the tree, independently of batching. ``path`` numbers a node within
its level and root (0 for an anchor; ``parent_path·b + c`` in a tree).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Callable, Sequence

import torch
from torch import Tensor

from .plans import ODE_SOLVERS, SDE_KINDS, WindowPlan, flash_sigmas, sigma_list
from .solvers import dpm_solver_2m_step
from .steps import euler_step, get_step_fn

__all__ = [
    "BranchVelocityFn",
    "BranchNoiseFn",
    "BranchLevel",
    "BranchSpec",
    "BranchOutput",
    "BranchRollout",
    "TempFlowPlan",
    "G2RPOPlan",
    "TreePlan",
    "branch_step",
    "x0_hat",
    "ode_continue",
    "continuation_nfe",
    "granularity_sigmas",
    "sample_branching",
    "rescore_rows",
    "spec_nfe",
]

BranchVelocityFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``velocity_fn(x [B, *D], sigma [] float32, rows [B] long) -> v [B, *D]``; ``rows`` index the caller's conditioning."""
BranchNoiseFn = Callable[[list], Tensor]
"""``noise_fn([(root_id, step_index, path, child), ...]) -> [n, *D]`` standard normal noise, one row per key."""

NEXT_FRONTIER = ("anchor", "children", "none")


# ---------------------------------------------------------------------------------------------------------- primitives
@dataclasses.dataclass
class BranchOutput:
    """K children of each of B nodes from one velocity per node.

    Attributes:
        children: [B, K, *D] float32 samples at ``sigma_next``.
        log_probs: [B, K] log p(child | node) under the step (reduction as in :mod:`samplers.steps`, mean default).
        mean: [B, *D] the transition mean (shared by the K children).
        std: [B] the transition std.
    """

    children: Tensor
    log_probs: Tensor
    mean: Tensor
    std: Tensor


def branch_step(v: Tensor, x: Tensor, sigma, sigma_next, kind: str, noise_level, noise: Tensor) -> BranchOutput:
    """K stochastic children per node from one velocity evaluation per node.

    The step function of ``kind`` is applied once to the node batch repeated K times (elementwise arithmetic: each
    child gets bit-for-bit what a separate call with that child's noise would give).

    Args:
        v: [B, *D] velocity at (x, sigma), evaluated once per node.
        x: [B, *D] node states at ``sigma``.
        sigma, sigma_next: the step's noise levels (floats, or [B] tensors).
        kind: an SDE step kind (``"sde"``, ``"cps"``, ``"dance"``).
        noise_level: the step's noise scale (float or [B]).
        noise: [B, K, *D] standard normal noise, one per child.
    """
    if kind not in SDE_KINDS:
        raise ValueError(f"a branch step needs an SDE kind {SDE_KINDS}, got {kind!r}")
    B, K = noise.shape[:2]
    if noise.shape[0] != x.shape[0] or noise.shape[2:] != x.shape[1:]:
        raise ValueError(f"noise must have shape [B, K, *D] = [{x.shape[0]}, K, {', '.join(map(str, x.shape[1:]))}], "
                         f"got {tuple(noise.shape)}")

    def rep(t):
        return t.repeat_interleave(K, 0) if isinstance(t, Tensor) and t.dim() > 0 else t

    out = get_step_fn(kind)(rep(v), rep(x), rep(sigma), rep(sigma_next), rep(noise_level),
                            noise=noise.reshape(B * K, *noise.shape[2:]))
    D = x.shape[1:]
    return BranchOutput(
        children=out.prev_sample.view(B, K, *D),
        log_probs=out.log_prob.view(B, K),
        mean=out.mean.view(B, K, *D)[:, 0].clone(),
        std=out.std.view(B, K)[:, 0].clone(),
    )


def x0_hat(x: Tensor, v: Tensor, sigma) -> Tensor:
    """The model's data prediction ``x - sigma·v`` (float32): the image of a continuation stopped at ``sigma``.

    Equal, bit for bit, to an Euler step from ``sigma`` to 0 and to a DPM-Solver++ 2M final step.
    """
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    return x.float() - s * v.float()


class _Trie:
    __slots__ = ("src", "sigma", "x", "prev_x0", "prev_sigma", "children", "ends")

    def __init__(self, src: int, sigma: float) -> None:
        self.src, self.sigma = src, sigma
        self.x: Tensor | None = None
        self.prev_x0: Tensor | None = None
        self.prev_sigma: float | None = None
        self.children: dict[float, "_Trie"] = {}
        self.ends: list[int] = []


def _check_list(lst: Sequence[float], start: float) -> tuple[float, ...]:
    s = tuple(float(v) for v in lst)
    if not s or s[0] != start:
        raise ValueError(f"a continuation must start at its state's sigma {start}, got {list(s)}")
    if any(a <= b for a, b in zip(s, s[1:])):
        raise ValueError(f"a continuation's sigmas must decrease strictly, got {list(s)}")
    if len(s) == 1 and s[0] != 0.0:
        raise ValueError(f"a continuation needs at least two sigmas unless it is already at sigma 0, got {list(s)}")
    return s


def _build_tries(starts: Sequence[float], sigma_lists: Sequence[Sequence[Sequence[float]]]):
    """One prefix tree per state; node = an evaluated prefix. Returns roots and, per output, (root, end node|None)."""
    roots, outs = [], []
    for n, (start, lists) in enumerate(zip(starts, sigma_lists)):
        root = _Trie(n, float(start))
        roots.append(root)
        for lst in lists:
            s = _check_list(lst, float(start))
            if len(s) == 1:  # already at sigma 0: the state is the image
                outs.append((n, None))
                continue
            node = root
            for sig in s[1:-1]:  # the last sigma is never evaluated: the image is x0_hat at s[-2]
                node = node.children.setdefault(sig, _Trie(n, sig))
            node.ends.append(len(outs))
            outs.append((n, node))
    return roots, outs


def continuation_nfe(start: float, sigma_lists: Sequence[Sequence[float]]) -> int:
    """Velocity evaluations :func:`ode_continue` spends on one state with these continuations: the number of
    distinct evaluated prefixes (a list of n + 1 sigmas is evaluated at its first n; shared prefixes count once)."""
    roots, _ = _build_tries([start], [sigma_lists])

    def count(node: _Trie) -> int:
        return (1 if (node.children or node.ends) else 0) + sum(count(c) for c in node.children.values())

    return count(roots[0])


def ode_continue(
    velocity_fn: BranchVelocityFn,
    x: Tensor,
    rows: Tensor,
    sigma_lists: Sequence[Sequence[Sequence[float]]],
    *,
    solver: str = "euler",
    batch_size: int = 32,
) -> tuple[Tensor, int]:
    """Finish states by ODE, each along one or more sigma lists; return the images' latents and the NFE.

    A list ``[s_0, ..., s_n]`` (``s_0`` = the state's sigma) is integrated with ``n`` steps evaluated at
    ``s_0 .. s_{n-1}``; the result is ``x0_hat`` at the last evaluated step, ``x_{s_{n-1}} - s_{n-1}·v``: for a list
    ending at 0 this *is* the ODE solution (Euler and DPM-Solver++ 2M both end with the data prediction), for a list
    stopping early it is the "image = x0_hat at the last evaluated step" of G²RPO. A list ``[0.0]`` returns the state.
    Lists of one state sharing a prefix share its evaluations. States at the same sigma (of any source, any prompt)
    are evaluated together, in chunks of ``batch_size``.

    Args:
        velocity_fn: ``(x [b, *D], sigma [] float32, rows [b]) -> v``.
        x: [N, *D] states.
        rows: [N] long, conditioning row of each state (passed to ``velocity_fn``).
        sigma_lists: per state, a list of continuations (each a decreasing list starting at the state's sigma).
        solver: ``"euler"`` or ``"dpm2m"`` (multistep history restarts at each state).
        batch_size: most states per velocity call.

    Returns:
        ``(images [M, *D] float32, nfe)`` with M = the total number of lists, state-major, in order.
    """
    if solver not in ODE_SOLVERS:
        raise ValueError(f"solver must be one of {tuple(ODE_SOLVERS)}, got {solver!r}")
    if len(sigma_lists) != x.shape[0]:
        raise ValueError(f"{x.shape[0]} states but {len(sigma_lists)} lists of continuations")
    starts = [float(lists[0][0]) if lists else 0.0 for lists in sigma_lists]
    roots, outs = _build_tries(starts, sigma_lists)
    results: list[Tensor | None] = [None] * len(outs)
    for o, (n, node) in enumerate(outs):
        if node is None:
            results[o] = x[n].float()
    pending: dict[float, list[_Trie]] = defaultdict(list)
    for n, root in enumerate(roots):
        root.x = x[n].float()
        if root.children or root.ends:
            pending[root.sigma].append(root)
    nfe = 0
    dev = x.device
    while pending:
        s = max(pending)
        nodes = pending.pop(s)
        s_t = torch.tensor(s, dtype=torch.float32, device=dev)
        for c0 in range(0, len(nodes), batch_size):
            chunk = nodes[c0 : c0 + batch_size]
            xs = torch.stack([nd.x for nd in chunk])
            v = velocity_fn(xs, s_t, rows[[nd.src for nd in chunk]].to(dev)).float()
            nfe += len(chunk)
            x0 = xs - s_t * v
            groups: dict[tuple, list] = defaultdict(list)
            for i, nd in enumerate(chunk):
                for o in nd.ends:
                    results[o] = x0[i]
                for s_next, ch in nd.children.items():
                    groups[(s_next, nd.prev_sigma if solver == "dpm2m" else None)].append((i, nd, ch))
            for (s_next, sp), items in groups.items():
                idx = torch.tensor([i for i, _, _ in items], device=dev)
                if solver == "euler":
                    nxt = euler_step(v[idx], xs[idx], s, s_next).prev_sample
                else:
                    prev = None if sp is None else torch.stack([nd.prev_x0 for _, nd, _ in items])
                    nxt = dpm_solver_2m_step(xs[idx], x0[idx], prev, sp, s, s_next)
                for k, (i, _, ch) in enumerate(items):
                    ch.x = nxt[k]
                    if solver == "dpm2m":
                        ch.prev_x0, ch.prev_sigma = x0[i], s
                    pending[s_next].append(ch)
            for nd in chunk:  # free memory as we go
                nd.x = nd.prev_x0 = None
    if not results:
        return x.new_zeros((0,) + tuple(x.shape[1:]), dtype=torch.float32), nfe
    return torch.stack(results), nfe


def granularity_sigmas(sigmas: Sequence[float], k: int, g: int) -> tuple[float, ...]:
    """G²RPO: the continuation of a child of branch step k at granularity g.

    The full sigma list of that member is ``sigmas[:k+2] + sigmas[k+2::g]`` (the branch step k lands on
    ``sigmas[k+1]``; after the first ODE step to ``sigmas[k+2]`` every g-th sigma is kept); the continuation is its
    part from ``sigmas[k+1]`` on. It need not end at 0: the image is then ``x0_hat`` at its last evaluated step.
    """
    s = [float(v) for v in sigmas]
    if not 0 <= k < len(s) - 1:
        raise ValueError(f"branch step {k} outside [0, {len(s) - 2}]")
    if g < 1:
        raise ValueError(f"granularity must be >= 1, got {g}")
    return tuple(s[k + 1 : k + 2] + s[k + 2 :: g])


# ---------------------------------------------------------------------------------------------------------- the spec
@dataclasses.dataclass(frozen=True)
class BranchLevel:
    """One branching step of a spec.

    Attributes:
        index: schedule position i (the step goes ``sigmas[i] -> sigmas[i+1]``).
        sigma, sigma_next: the step's noise levels.
        kind, noise_level: the SDE step of every node at this level.
        factor: children per node (K).
        continuations: the ODE sigma lists (each starting at ``sigma_next``) finishing every child, one leaf per list;
            empty when the children become the next level's nodes.
        next_frontier: the nodes after this level: ``"anchor"`` (the nodes themselves, moved on by an Euler step
            with the same velocity: TempFlow's main trajectory, G²RPO's anchor), ``"children"`` (a tree), ``"none"``.
    """

    index: int
    sigma: float
    sigma_next: float
    kind: str
    noise_level: float
    factor: int
    continuations: tuple[tuple[float, ...], ...]
    next_frontier: str

    def __post_init__(self) -> None:
        if self.kind not in SDE_KINDS:
            raise ValueError(f"branch level kind must be one of {SDE_KINDS}, got {self.kind!r}")
        if self.factor < 1:
            raise ValueError(f"branch factor must be >= 1, got {self.factor}")
        if self.next_frontier not in NEXT_FRONTIER:
            raise ValueError(f"next_frontier must be one of {NEXT_FRONTIER}, got {self.next_frontier!r}")
        if (self.next_frontier == "children") == bool(self.continuations):
            raise ValueError("a level's children are either finished by continuations or become the next level's "
                             "nodes (next_frontier='children'), not both or neither")
        for c in self.continuations:
            _check_list(c, self.sigma_next)


@dataclasses.dataclass(frozen=True)
class BranchSpec:
    """A branching sampling pass: Euler steps of the current nodes between levels, the levels in schedule order."""

    sigmas: tuple[float, ...]
    levels: tuple[BranchLevel, ...]

    def __post_init__(self) -> None:
        idx = [lv.index for lv in self.levels]
        if not idx or idx != sorted(set(idx)):
            raise ValueError(f"a spec needs at least one level, at increasing schedule positions, got {idx}")
        T = len(self.sigmas) - 1
        for lv in self.levels:
            if not 0 <= lv.index < T or (lv.sigma, lv.sigma_next) != (self.sigmas[lv.index], self.sigmas[lv.index + 1]):
                raise ValueError(f"level at {lv.index} does not match the schedule")
        for a in self.levels[:-1]:
            if a.next_frontier == "none":
                raise ValueError("only the last level may end the frontier")

    @property
    def train_indices(self) -> list[int]:
        return [lv.index for lv in self.levels]

    def nodes_per_root(self) -> list[int]:
        """Branch nodes per root at each level (1 for anchors, b^t in a tree)."""
        out, n = [], 1
        for lv in self.levels:
            out.append(n)
            n = n * lv.factor if lv.next_frontier == "children" else n
        return out

    def transitions_per_root(self) -> int:
        """Stored SDE transitions (children) per root: a depth-4 binary tree has 2 + 4 + 8 + 16 = 30."""
        return sum(n * lv.factor for n, lv in zip(self.nodes_per_root(), self.levels))

    def leaves_per_root(self) -> int:
        return sum(n * lv.factor * len(lv.continuations) for n, lv in zip(self.nodes_per_root(), self.levels))


def spec_nfe(spec: BranchSpec) -> dict[str, int]:
    """Velocity evaluations per root that :func:`sample_branching` spends on ``spec`` (before CFG doubling).

    ``anchor``: Euler steps of the frontier between levels (before the first level: the first level's index);
    ``nodes``: one per branch node (shared by its children and, for anchors, by their own next Euler step);
    ``continuations``: per child, the distinct evaluated prefixes of its continuation lists; ``total``.
    """
    anchor = nodes = cont = 0
    pos, width = 0, 1
    for n, lv in zip(spec.nodes_per_root(), spec.levels):
        anchor += (lv.index - pos) * width
        nodes += n
        if lv.continuations:
            cont += n * lv.factor * continuation_nfe(lv.sigma_next, lv.continuations)
        width = n if lv.next_frontier == "anchor" else n * lv.factor if lv.next_frontier == "children" else 0
        pos = lv.index + 1
    return {"anchor": anchor, "nodes": nodes, "continuations": cont, "total": anchor + nodes + cont}


# ---------------------------------------------------------------------------------------------------------- plans
def _check_sde(kind: str, noise_level: float) -> None:
    if kind not in SDE_KINDS:
        raise ValueError(f"SDE step kind {kind!r} not allowed; choose from {SDE_KINDS}")
    if not noise_level > 0:
        raise ValueError(f"noise_level must be > 0, got {noise_level}")


def _check_steps(steps: Sequence[int], T: int, what: str) -> list[int]:
    out = sorted(set(int(i) for i in steps))
    if not out or out[0] < 0 or out[-1] > T - 1 or len(out) != len(list(steps)):
        raise ValueError(f"{what} must be distinct schedule positions in [0, {T - 1}], got {list(steps)}")
    return out


def _tail(s: list[float], first: int, ratio: float) -> tuple[float, ...]:
    return tuple(s[first:] if ratio == 1 else flash_sigmas(s[first:], ratio))


@dataclasses.dataclass
class TempFlowPlan:
    """TempFlow-GRPO: ODE main trajectory; at each branch step i, K SDE children finished by ODE to sigma = 0.

    ``branch_steps`` None = every step but the last (0 .. T-2; the last step's children would be the final images
    themselves, and like Flow-GRPO we do not train it by default); any subset of 0 .. T-1 may be given. The main
    trajectory stops after the last branch step's shared evaluation. Children's continuations are
    ``sigmas[i+1:]`` solved by ``ode_solver``, compressed by ``flash_ratio`` (:func:`samplers.plans.flash_sigmas`).

    NFE per root (main trajectory = anchor + nodes): ``(i_max + 1) + K·Σ_{i∈B} n_i``, n_i = the continuation's
    evaluations (T - 1 - i without compression). With B = 0 .. T-1 this is the paper's count per seed,
    ``T + K·Σ_{j=1}^{T-1} j``; with the default B = 0 .. T-2 one less, ``T - 1 + K·Σ_{j=1}^{T-1} j``.
    """

    kind: str = "sde"
    noise_level: float = 0.7
    branch_factor: int = 6
    branch_steps: tuple[int, ...] | None = None
    ode_solver: str = "euler"
    flash_ratio: float = 1.0
    branching = True

    def __post_init__(self) -> None:
        _check_sde(self.kind, self.noise_level)
        if self.ode_solver not in ODE_SOLVERS or not 0 < self.flash_ratio <= 1:
            raise ValueError(f"ode_solver must be one of {tuple(ODE_SOLVERS)} and flash_ratio in (0, 1]")
        if self.branch_factor < 1:
            raise ValueError(f"branch_factor must be >= 1, got {self.branch_factor}")

    def steps(self, T: int) -> list[int]:
        default = range(max(T - 1, 1))
        return _check_steps(default if self.branch_steps is None else self.branch_steps, T, "branch_steps")

    def __call__(self, sigmas: Tensor | Sequence[float], iteration: int = 0) -> BranchSpec:
        s = sigma_list(sigmas)
        steps = self.steps(len(s) - 1)
        levels = tuple(
            BranchLevel(i, s[i], s[i + 1], self.kind, self.noise_level, self.branch_factor,
                        (_tail(s, i + 1, self.flash_ratio),), "anchor" if i != steps[-1] else "none")
            for i in steps
        )
        return BranchSpec(tuple(s), levels)


@dataclasses.dataclass
class G2RPOPlan:
    """G²RPO: ODE anchor; at each branch step k in M, G SDE children, each finished once per granularity g in Λ on
    :func:`granularity_sigmas` (``ode_solver``), image = ``x0_hat`` at the last evaluated step.

    ``branch_steps`` None = the first half, 0 .. max(T // 2, 1) - 1. NFE per root: ``(k_max + 1) + G·Σ_{k∈M} c_k``,
    c_k = :func:`continuation_nfe` of the granularities' lists at k (their shared prefixes counted once).
    """

    kind: str = "sde"
    noise_level: float = 0.7
    branch_factor: int = 12
    branch_steps: tuple[int, ...] | None = None
    granularities: tuple[int, ...] = (1, 2, 3)
    ode_solver: str = "euler"
    branching = True

    def __post_init__(self) -> None:
        _check_sde(self.kind, self.noise_level)
        if self.ode_solver not in ODE_SOLVERS:
            raise ValueError(f"ode_solver must be one of {tuple(ODE_SOLVERS)}, got {self.ode_solver!r}")
        if not self.granularities or any(int(g) < 1 for g in self.granularities):
            raise ValueError(f"granularities must be a non-empty list of integers >= 1, got {self.granularities}")
        if self.branch_factor < 1:
            raise ValueError(f"branch_factor must be >= 1, got {self.branch_factor}")

    def steps(self, T: int) -> list[int]:
        default = range(max(T // 2, 1))
        return _check_steps(default if self.branch_steps is None else self.branch_steps, T, "branch_steps")

    def __call__(self, sigmas: Tensor | Sequence[float], iteration: int = 0) -> BranchSpec:
        s = sigma_list(sigmas)
        steps = self.steps(len(s) - 1)
        levels = tuple(
            BranchLevel(k, s[k], s[k + 1], self.kind, self.noise_level, self.branch_factor,
                        tuple(granularity_sigmas(s, k, int(g)) for g in self.granularities),
                        "anchor" if k != steps[-1] else "none")
            for k in steps
        )
        return BranchSpec(tuple(s), levels)


@dataclasses.dataclass
class TreePlan:
    """Dynamic-TreeRPO: a ``branch_factor``-ary tree of ``depth`` SDE levels in the window [l, l + depth), Euler
    before it, each leaf finished by the ODE tail after it (``ode_solver``, ``flash_ratio``: MixGRPO-Flash).

    The window start l follows :class:`samplers.plans.WindowPlan` (width = depth; ``start``, ``schedule``, ``tau``,
    ``shift``, ``wrap``, ``decay_k``, ``seed``: MixGRPO's sliding schedules). Tree level t = 0 .. d-1 (t = 0 the root)
    uses noise ``eta_t = noise_level·(1 + noise_growth·t/d)`` (the paper's linear growth with depth; t counted from 0
    so the root's step uses the base noise).

    Per root: ``Σ_{t=1}^{d} b^t`` stored SDE transitions (2 + 4 + 8 + 16 = 30 for b = 2, d = 4, vs 16·4 = 64 for
    independent trajectories), ``Σ_{t=0}^{d-1} b^t`` velocity evaluations in the window (one per internal node,
    shared by its b children: 15), and NFE ``l + Σ_{t<d} b^t + b^d·n_tail``.
    """

    kind: str = "sde"
    noise_level: float = 0.7
    branch_factor: int = 2
    depth: int = 4
    noise_growth: float = 1.0
    start: int = 0
    schedule: str = "fixed"
    tau: int = 25
    shift: int = 1
    wrap: bool = True
    decay_k: float = 0.1
    seed: int = 0
    ode_solver: str = "euler"
    flash_ratio: float = 1.0
    branching = True

    def __post_init__(self) -> None:
        if self.depth < 1 or self.branch_factor < 1:
            raise ValueError(f"tree needs depth >= 1 and branch_factor >= 1, got {self.depth}, {self.branch_factor}")
        if self.noise_growth < 0:
            raise ValueError(f"noise_growth must be >= 0, got {self.noise_growth}")
        self.window()  # validates the window fields

    def window(self) -> WindowPlan:
        return WindowPlan(self.kind, self.noise_level, self.depth, self.start, self.schedule, self.tau, self.shift,
                          self.wrap, self.decay_k, self.seed, self.ode_solver, self.flash_ratio)

    def level_noise(self, t: int) -> float:
        return self.noise_level * (1.0 + self.noise_growth * t / self.depth)

    def __call__(self, sigmas: Tensor | Sequence[float], iteration: int = 0) -> BranchSpec:
        s = sigma_list(sigmas)
        T = len(s) - 1
        l = self.window().window_start(T, iteration)
        d = self.depth
        levels = []
        for t in range(d):
            i = l + t
            last = t == d - 1
            levels.append(BranchLevel(i, s[i], s[i + 1], self.kind, self.level_noise(t), self.branch_factor,
                                      (_tail(s, l + d, self.flash_ratio),) if last else (),
                                      "none" if last else "children"))
        return BranchSpec(tuple(s), tuple(levels))


# ---------------------------------------------------------------------------------------------------------- rollout
@dataclasses.dataclass
class BranchRollout:
    """The stored transitions of a branching pass (all fp32, detached) and its leaves.

    Nodes (``Nn``): states that branched. Rows (``R``): transitions node -> child, node-major in creation order.
    Leaves (``L``): finished children (one per continuation list).

    Attributes:
        node_latents: [Nn, *D] node states (x_t of their rows).
        node_sigmas, node_sigmas_next: [Nn] the nodes' step.
        node_steps: [Nn] long, schedule positions.
        node_levels: [Nn] long, index into ``levels``.
        node_noise_levels: [Nn] float32, the step's noise scale.
        node_rows: [Nn] long, the root (0 .. num_roots - 1) each node descends from.
        node_paths: [Nn] long, the node's number within its level and root.
        node_parent_row: [Nn] long, the row whose child this node is (-1: reached by ODE from its root).
        node_means, node_stds: [Nn, *D], [Nn] the sampling Gaussian of the node's step (shared by its children).
        node_batches: the node chunks evaluated together at sampling (replay them in training).
        row_node: [R] long, the parent node of each row.
        row_child: [R] long, the child's number k among its siblings.
        next_latents: [R, *D] the children (x_{t+1}).
        log_probs: [R] log p_old(child | node).
        leaves: [L, *D] finished latents (decode them for the images).
        leaf_row: [L] long, the row each leaf was finished from.
        leaf_tag: [L] long, which continuation list of its level (G²RPO: the granularity's position in Λ).
        root_ids: [num_roots] long, the caller's global ids of the roots.
        levels: the spec's levels.
        nfe: velocity evaluations of the pass (all rows of all calls, before any CFG doubling);
            ``nfe_parts`` splits it into ``anchor``, ``nodes``, ``continuations``.
    """

    node_latents: Tensor
    node_sigmas: Tensor
    node_sigmas_next: Tensor
    node_steps: Tensor
    node_levels: Tensor
    node_noise_levels: Tensor
    node_roots: Tensor
    node_paths: Tensor
    node_parent_row: Tensor
    node_means: Tensor
    node_stds: Tensor
    node_batches: list[Tensor]
    row_node: Tensor
    row_child: Tensor
    next_latents: Tensor
    log_probs: Tensor
    leaves: Tensor
    leaf_row: Tensor
    leaf_tag: Tensor
    root_ids: Tensor
    levels: tuple[BranchLevel, ...]
    nfe: int
    nfe_parts: dict[str, int]

    @property
    def num_rows(self) -> int:
        return self.row_node.shape[0]

    @property
    def num_nodes(self) -> int:
        return self.node_steps.shape[0]

    @property
    def num_leaves(self) -> int:
        return self.leaf_row.shape[0]

    # per-row views
    @property
    def latents(self) -> Tensor:
        return self.node_latents[self.row_node]

    @property
    def sigmas(self) -> Tensor:
        return self.node_sigmas[self.row_node]

    @property
    def sigmas_next(self) -> Tensor:
        return self.node_sigmas_next[self.row_node]

    @property
    def step_indices(self) -> Tensor:
        return self.node_steps[self.row_node]

    @property
    def means(self) -> Tensor:
        return self.node_means[self.row_node]

    @property
    def stds(self) -> Tensor:
        return self.node_stds[self.row_node]

    @property
    def row_roots(self) -> Tensor:
        return self.node_roots[self.row_node]

    @property
    def row_levels(self) -> Tensor:
        return self.node_levels[self.row_node]

    @property
    def leaf_roots(self) -> Tensor:
        return self.node_roots[self.row_node[self.leaf_row]]

    @property
    def leaf_levels(self) -> Tensor:
        return self.node_levels[self.row_node[self.leaf_row]]

    def node_kind(self, n: int) -> str:
        return self.levels[int(self.node_levels[n])].kind


@torch.no_grad()
def sample_branching(
    velocity_fn: BranchVelocityFn,
    x: Tensor,
    root_rows: Tensor,
    root_ids: Tensor,
    spec: BranchSpec,
    noise_fn: BranchNoiseFn,
    *,
    batch_size: int = 32,
    ode_solver: str = "euler",
) -> BranchRollout:
    """Run ``spec`` from the roots ``x`` (at ``spec.sigmas[0]``); see the module docstring.

    Args:
        velocity_fn: ``(x [b, *D], sigma [] float32, rows [b] long) -> v [b, *D]``.
        x: [N, *D] initial noise, one per root.
        root_rows: [N] long, conditioning row of each root (inherited by all its states).
        root_ids: [N] long, global ids of the roots (the first element of every noise key).
        spec: the levels.
        noise_fn: ``keys -> [len(keys), *D]`` standard normal noise (keys ``(root_id, step, path, child)``).
        batch_size: most states per velocity call.
        ode_solver: ``"euler"`` or ``"dpm2m"`` for the continuations (the frontier between levels is always Euler).
    """
    dev = x.device
    D = tuple(x.shape[1:])
    s = spec.sigmas
    root_rows = root_rows.to(dev)
    # the frontier: current nodes
    f_x = x.float()
    f_root = torch.arange(x.shape[0], device=dev)
    f_path = torch.zeros(x.shape[0], dtype=torch.long, device=dev)
    f_parent = torch.full((x.shape[0],), -1, dtype=torch.long, device=dev)
    nodes: dict[str, list] = defaultdict(list)
    rows: dict[str, list] = defaultdict(list)
    node_batches: list[Tensor] = []
    pending = []  # (children [m, *D], root index [m], row ids [m], continuation lists)
    n_nodes = n_rows = 0
    parts = {"anchor": 0, "nodes": 0, "continuations": 0}
    pos = 0

    def evaluate(xs: Tensor, sigma: float, roots: Tensor, record: bool) -> Tensor:
        sig = torch.tensor(sigma, dtype=torch.float32, device=dev)
        out = []
        for c0 in range(0, xs.shape[0], batch_size):
            out.append(velocity_fn(xs[c0 : c0 + batch_size], sig, root_rows[roots[c0 : c0 + batch_size]]).float())
            if record:
                node_batches.append(torch.arange(n_nodes + c0, n_nodes + min(c0 + batch_size, xs.shape[0])))
        return torch.cat(out) if out else xs.new_zeros(xs.shape)

    for lv in spec.levels:
        if f_x.shape[0] == 0:
            raise ValueError("the frontier is empty before a level")
        while pos < lv.index:  # Euler steps of the frontier up to the level
            v = evaluate(f_x, s[pos], f_root, record=False)
            parts["anchor"] += f_x.shape[0]
            f_x = euler_step(v, f_x, s[pos], s[pos + 1]).prev_sample
            pos += 1
        F, K = f_x.shape[0], lv.factor
        v = evaluate(f_x, lv.sigma, f_root, record=True)
        parts["nodes"] += F
        ids, fr, fp = root_ids.tolist(), f_root.tolist(), f_path.tolist()
        keys = [(int(ids[fr[n]]), lv.index, int(fp[n]), c) for n in range(F) for c in range(K)]
        noise = noise_fn(keys).to(dev).float().view(F, K, *D)
        # the step per forward chunk: the same tensor shapes as training's replay of that chunk (reductions included)
        outs = [branch_step(v[c0 : c0 + batch_size], f_x[c0 : c0 + batch_size], lv.sigma, lv.sigma_next, lv.kind,
                            lv.noise_level, noise[c0 : c0 + batch_size]) for c0 in range(0, F, batch_size)]
        out = BranchOutput(*(torch.cat([getattr(o, f.name) for o in outs]) for f in dataclasses.fields(BranchOutput)))
        node_ids = torch.arange(n_nodes, n_nodes + F)
        row_ids = torch.arange(n_rows, n_rows + F * K)
        nodes["latents"].append(f_x)
        nodes["sigmas"].append(torch.full((F,), lv.sigma, dtype=torch.float32))
        nodes["sigmas_next"].append(torch.full((F,), lv.sigma_next, dtype=torch.float32))
        nodes["steps"].append(torch.full((F,), lv.index, dtype=torch.long))
        nodes["levels"].append(torch.full((F,), len(nodes["levels"]), dtype=torch.long))
        nodes["noise_levels"].append(torch.full((F,), lv.noise_level, dtype=torch.float32))
        nodes["roots"].append(f_root.cpu())
        nodes["paths"].append(f_path.cpu())
        nodes["parent_row"].append(f_parent.cpu())
        nodes["means"].append(out.mean)
        nodes["stds"].append(out.std)
        rows["node"].append(node_ids.repeat_interleave(K))
        rows["child"].append(torch.arange(K).repeat(F))
        rows["next"].append(out.children.reshape(F * K, *D))
        rows["log_probs"].append(out.log_probs.reshape(F * K))
        children = out.children.reshape(F * K, *D)
        child_root = f_root.repeat_interleave(K)
        if lv.continuations:
            pending.append((children, child_root, row_ids, lv.continuations))
        if lv.next_frontier == "anchor":
            f_x = euler_step(v, f_x, lv.sigma, lv.sigma_next).prev_sample
            f_parent = torch.full((F,), -1, dtype=torch.long, device=dev)
        elif lv.next_frontier == "children":
            f_x, f_root = children, child_root
            f_path = (f_path[:, None] * K + torch.arange(K, device=dev)[None, :]).reshape(-1)
            f_parent = row_ids.to(dev)
        else:
            f_x = f_x[:0]
        n_nodes += F
        n_rows += F * K
        pos = lv.index + 1

    # all continuations in one pool
    if pending:
        xs = torch.cat([p[0] for p in pending])
        roots = torch.cat([p[1] for p in pending])
        lists = [p[3] for p in pending for _ in range(p[0].shape[0])]
        leaves, cont_nfe = ode_continue(velocity_fn, xs, root_rows[roots], lists, solver=ode_solver,
                                        batch_size=batch_size)
        parts["continuations"] = cont_nfe
        leaf_row = torch.cat([p[2].repeat_interleave(len(p[3])) for p in pending])
        leaf_tag = torch.cat([torch.arange(len(p[3])).repeat(p[0].shape[0]) for p in pending])
    else:
        leaves = x.new_zeros((0, *D), dtype=torch.float32)
        leaf_row = leaf_tag = torch.zeros(0, dtype=torch.long)

    cat = lambda key, src=nodes: torch.cat(src[key])  # noqa: E731
    return BranchRollout(
        node_latents=cat("latents"), node_sigmas=cat("sigmas"), node_sigmas_next=cat("sigmas_next"),
        node_steps=cat("steps"), node_levels=cat("levels"), node_noise_levels=cat("noise_levels"),
        node_roots=cat("roots"), node_paths=cat("paths"), node_parent_row=cat("parent_row"),
        node_means=cat("means"), node_stds=cat("stds"), node_batches=node_batches,
        row_node=cat("node", rows), row_child=cat("child", rows), next_latents=cat("next", rows),
        log_probs=cat("log_probs", rows), leaves=leaves, leaf_row=leaf_row, leaf_tag=leaf_tag,
        root_ids=root_ids.cpu().long(), levels=spec.levels, nfe=sum(parts.values()), nfe_parts=parts,
    )


def rescore_rows(
    v_nodes: Tensor, rollout: BranchRollout, nodes: Tensor, rows: Tensor, *, reduction: str = "mean"
) -> tuple[Tensor, Tensor, Tensor]:
    """Log-probs of stored transitions under new velocities: ``(log_prob [r], mean [r, *D], std [r])``.

    ``v_nodes`` [n, *D] is the model's output at ``rollout.node_latents[nodes]`` (with gradients); ``rows`` [r] are
    transitions whose parent node is in ``nodes``. Each node's velocity serves all of its rows; the arithmetic is the
    step function's, exactly as at sampling (per-row sigmas and noise levels as float32 tensors).
    """
    dev = v_nodes.device
    pos_of = {int(n): i for i, n in enumerate(nodes.tolist())}
    row_nodes = rollout.row_node[rows]
    pos = torch.tensor([pos_of[int(n)] for n in row_nodes.tolist()], device=dev)
    kinds = [rollout.node_kind(int(n)) for n in row_nodes.tolist()]
    x = rollout.node_latents[row_nodes].to(dev)
    nxt = rollout.next_latents[rows].to(dev)
    sig = rollout.node_sigmas[row_nodes].to(dev)
    sig_n = rollout.node_sigmas_next[row_nodes].to(dev)
    nl = rollout.node_noise_levels[row_nodes].to(dev)
    outs = []
    for kind in sorted(set(kinds)):
        sel = torch.tensor([i for i, k in enumerate(kinds) if k == kind], device=dev)
        o = get_step_fn(kind)(v_nodes[pos[sel]], x[sel], sig[sel], sig_n[sel], nl[sel], prev_sample=nxt[sel],
                              reduction=reduction)
        outs.append((sel, o))
    if len(outs) == 1:  # the usual case: one step kind, rows in order
        o = outs[0][1]
        return o.log_prob, o.mean, o.std
    r = rows.shape[0]
    log_prob, std = torch.zeros(r, device=dev), torch.zeros(r, device=dev)
    mean = torch.zeros((r,) + tuple(x.shape[1:]), device=dev)
    for sel, o in outs:
        log_prob = log_prob.index_put((sel,), o.log_prob)
        mean = mean.index_put((sel,), o.mean)
        std = std.index_put((sel,), o.std)
    return log_prob, mean, std

"""Algorithm presets: a method name is a set of config overrides (parts), never a separate code path.

``flowrl train --algorithm NAME`` applies the preset first; the YAML and flags can still change any part. Presets
only choose the sampling side (plan, step kind, noise, tail solver, shared noise) plus, where the method defines it,
its reward aggregation or clip range, so every preset composes with any objective option (KL, clip-higher, ...).

Parts used below:

* plan ``full``: SDE on every step, train the first ``train_fraction`` (Flow-GRPO 0.9 = the first 9 of 10 steps).
* plan ``window``: SDE and training only in W = [l, l + w), ODE outside; ``window_schedule`` moves l over iterations.
* ``ode_solver`` / ``flash_ratio``: the ODE tail after the window solved by DPM-Solver++ 2M on
  max(int(m * r), 1) steps (MixGRPO-Flash); steps before the window are never accelerated.
* ``step_kind``: ``sde`` (Flow-GRPO), ``cps``, ``dance`` (DanceGRPO's constant-eta SDE).

MixGRPO's window clock. The paper (T = 25 steps, w = 4) moves the window by 1 every tau = 25 iterations over a few
hundred iterations. Our CPU runs are ~100 iterations at T = 10, where the window has T - w + 1 = 7 positions; the
presets use ``window_tau = 10`` so that one run sweeps every start position once (0..6 in 70 iterations, then wraps
to 0). Set ``--window_tau 25`` for the paper's clock on long runs.
"""

from __future__ import annotations

_MIXGRPO_PLAN = {
    "plan": "window",
    "step_kind": "sde",
    "noise_level": 0.7,
    "window_size": 4,
    "window_start": 0,
    "window_schedule": "progressive",
    "window_tau": 10,
    "window_shift": 1,
    "window_wrap": True,
}
_MIXGRPO_COMMON = {
    "sampling": {"same_noise_per_group": True},  # shared initial noise per group (MixGRPO)
    "grpo": {"reward_aggregation": "normalize_then_sum"},  # MixGRPO: normalise each reward, then sum
}

PRESETS: dict[str, dict] = {
    "flow_grpo": {
        "_doc": "Flow-GRPO (arXiv 2505.05470): Flow-GRPO SDE on every step, train on the first 90% of the steps.",
        "plan": {"plan": "full", "step_kind": "sde", "noise_level": 0.7, "train_fraction": 0.9},
    },
    "flow_grpo_fast": {
        "_doc": "Flow-GRPO-Fast: SDE and training only in a fixed window at the start, ODE elsewhere.",
        "plan": {"plan": "window", "step_kind": "sde", "window_schedule": "fixed", "window_start": 0},
    },
    "flow_grpo_cps": {
        "_doc": "Flow-GRPO with Coefficients-Preserving Sampling (arXiv 2509.05952); clip 1e-5 per the reference.",
        "plan": {"plan": "full", "step_kind": "cps", "noise_level": 0.8, "train_fraction": 0.9},
        "grpo": {"clip_range": 1e-5},
    },
    "mixgrpo": {
        "_doc": "MixGRPO (arXiv 2507.21802): SDE window w=4 moving by 1 every tau=10 iterations, ODE elsewhere, "
        "shared group noise.",
        "plan": dict(_MIXGRPO_PLAN),
        **_MIXGRPO_COMMON,
    },
    "mixgrpo_flash": {
        "_doc": "MixGRPO-Flash: MixGRPO with the ODE tail after the window by DPM-Solver++ 2M on 40% of its steps.",
        "plan": {**_MIXGRPO_PLAN, "ode_solver": "dpm2m", "flash_ratio": 0.4},
        **_MIXGRPO_COMMON,
    },
    "mixgrpo_flash_star": {
        "_doc": "MixGRPO-Flash*: window frozen at [0, 4), ODE tail by DPM-Solver++ 2M on 20% of its steps.",
        "plan": {**_MIXGRPO_PLAN, "window_schedule": "fixed", "window_start": 0, "ode_solver": "dpm2m",
                 "flash_ratio": 0.2},
        **_MIXGRPO_COMMON,
    },
    "dance_grpo": {
        "_doc": "DanceGRPO (arXiv 2505.07818): constant-eta SDE (eta 0.3) on every step, train on the first 60%.",
        # The reference trains a random timestep_fraction = 0.6 of the steps; FullSDEPlan trains the first 60%.
        "plan": {"plan": "full", "step_kind": "dance", "noise_level": 0.3, "train_fraction": 0.6},
    },
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> dict:
    """The overrides of preset ``name`` (without its ``_doc``), a fresh copy safe to modify."""
    if name not in PRESETS:
        raise ValueError(f"unknown algorithm {name!r}; available: {', '.join(preset_names())}")
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[name].items() if not k.startswith("_")}


def describe_presets() -> str:
    return "\n".join(f"  {n:<22} {PRESETS[n]['_doc']}" for n in preset_names())

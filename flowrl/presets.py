"""Algorithm presets: a method name is a set of config overrides (parts), never a separate code path.

``flowrl train --algorithm NAME`` applies the preset first; the YAML and flags can still change any part.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "flow_grpo": {
        "_doc": "Flow-GRPO (arXiv 2505.05470): Flow-GRPO SDE on every step, train on the first steps.",
        "plan": {"plan": "full", "step_kind": "sde"},
    },
    "flow_grpo_fast": {
        "_doc": "Flow-GRPO-Fast: SDE and training only in a fixed window at the start, ODE elsewhere.",
        "plan": {"plan": "window", "step_kind": "sde", "window_schedule": "fixed", "window_start": 0},
    },
    "flow_grpo_cps": {
        "_doc": "Flow-GRPO with Coefficients-Preserving Sampling (arXiv 2509.05952); clip 1e-5 per the reference.",
        "plan": {"plan": "full", "step_kind": "cps", "noise_level": 0.8},
        "grpo": {"clip_range": 1e-5},
    },
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> dict:
    """The overrides of preset ``name`` (without its ``_doc``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown algorithm {name!r}; available: {', '.join(preset_names())}")
    return {k: v for k, v in PRESETS[name].items() if not k.startswith("_")}


def describe_presets() -> str:
    return "\n".join(f"  {n:<22} {PRESETS[n]['_doc']}" for n in preset_names())

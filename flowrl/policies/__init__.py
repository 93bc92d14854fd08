"""Model adapters: a Policy turns prompts into conditioning, (x, sigma, cond) into velocity, latents into images."""

from .base import Cond, Policy, load_policy

__all__ = ["Cond", "Policy", "load_policy"]

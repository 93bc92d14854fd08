"""Finding rewards by name: built-ins, ``module:attr`` plug-ins and installed entry points.

A reward spec (the string a config or ``--reward`` flag holds) is one of:

- a registered name: ``"scenes"``, ``"jpeg_compressibility"`` (see :func:`available_rewards`);
- ``"package.module:attr"``: ``attr`` is imported from the module (which must be importable, e.g. on
  ``PYTHONPATH``); dotted attributes (``"mod:Class.factory"``) are followed;
- the name of an entry point in group ``flowrl.rewards`` of an installed distribution, e.g. in its
  ``pyproject.toml``::

      [project.entry-points."flowrl.rewards"]
      my_reward = "my_package.rewards:MyReward"

What the spec points at becomes a reward by one rule:

- a class is instantiated with the keyword arguments given to :func:`get_reward`;
- a function whose first two parameters are required positional ones (``images, prompts``) *is* a reward and is
  used as is (keyword arguments, if any, are bound with ``functools.partial``);
- any other function is a factory, called with the keyword arguments; it must return a reward;
- any other callable object (an already built reward) is used as is (keyword arguments are then an error).

Names registered with :func:`register_reward` take precedence over entry points of the same name.
With weights, as in a multi-reward config: :func:`parse_reward_spec` splits ``"name:0.5"`` into ``("name", 0.5)``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import math
from typing import Any, Callable, TypeVar

from .base import Reward

__all__ = [
    "ENTRY_POINT_GROUP",
    "available_rewards",
    "get_reward",
    "parse_reward_spec",
    "register_reward",
]

ENTRY_POINT_GROUP = "flowrl.rewards"
"""Entry-point group that installed packages use to add rewards."""

_REGISTRY: dict[str, Callable[..., Any]] = {}
T = TypeVar("T", bound=Callable[..., Any])


def register_reward(name: str) -> Callable[[T], T]:
    """Class/factory decorator: make ``get_reward(name, **kwargs)`` build a reward by calling ``obj(**kwargs)``.

    A decorated class without a ``name`` attribute of its own gets ``name``. Registering a different object under a
    taken name raises ``ValueError`` (re-registering the same qualified name, as a module reload does, replaces it).

    Example::

        @register_reward("brightness")
        class Brightness(Reward):
            def score(self, images, prompts, **metadata):
                return images.mean(dim=(1, 2, 3))
    """
    if not isinstance(name, str) or not name or ":" in name or name != name.strip():
        raise ValueError(f"reward name {name!r} not allowed: use a non-empty string without ':' or outer spaces")

    def decorator(obj: T) -> T:
        if not callable(obj):
            raise TypeError(f"register_reward({name!r}) needs a class or a factory function, got {obj!r}")
        old = _REGISTRY.get(name)
        if old is not None and old is not obj and _qualname(old) != _qualname(obj):
            raise ValueError(f"reward name {name!r} is already registered to {_qualname(old)}")
        if isinstance(obj, type) and "name" not in vars(obj):
            obj.name = name  # type: ignore[attr-defined]
        _REGISTRY[name] = obj
        return obj

    return decorator


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """Installed entry points of group ``flowrl.rewards``, by name (the first one found wins on duplicates)."""
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def available_rewards() -> list[str]:
    """Sorted names that :func:`get_reward` accepts without ``module:attr``: built-ins plus entry points."""
    return sorted(set(_REGISTRY) | set(_entry_points()))


def _is_reward_function(obj: Any) -> bool:
    """True for a function called as ``f(images, prompts, ...)``: its first two parameters are required positional."""
    if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.ismethod(obj)):
        return False
    try:
        params = list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    head = params[:2]
    return len(head) == 2 and all(p.kind in positional and p.default is inspect.Parameter.empty for p in head)


def _build(obj: Any, kwargs: dict[str, Any], label: str, default_name: str) -> Callable[..., Any]:
    """Turn what a spec points at into a reward callable (the rule in this module's docstring)."""
    if isinstance(obj, type):
        reward = obj(**kwargs)
    elif _is_reward_function(obj):
        reward = functools.partial(obj, **kwargs) if kwargs else obj
    elif inspect.isfunction(obj) or inspect.ismethod(obj):
        reward = obj(**kwargs)
    elif callable(obj):
        if kwargs:
            raise ValueError(f"reward {label} is an already built reward object; it takes no arguments ({kwargs})")
        reward = obj
    else:
        raise ValueError(f"reward {label} points at {type(obj).__name__} {obj!r}, which is not callable")
    if not callable(reward):
        raise ValueError(f"reward factory {label} returned {type(reward).__name__}, which is not callable")
    if isinstance(reward, Reward) and reward.name == Reward.name:
        reward.name = default_name
    return reward


def _import_attr(spec: str) -> tuple[Any, str]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ValueError(f"reward spec {spec!r} is not 'module:attr'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ValueError(
                f"reward spec {spec!r}: no module named {exc.name!r} (is it installed or on PYTHONPATH?)"
            ) from exc
        raise
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward spec {spec!r}: {obj.__name__ if hasattr(obj, '__name__') else obj!r} "
                             f"has no attribute {part!r}")
        obj = getattr(obj, part)
    return obj, attr.rsplit(".", 1)[-1]


def get_reward(spec: str, **kwargs: Any) -> Callable[..., Any]:
    """Build the reward that ``spec`` names (a registered name, ``module:attr`` or an entry-point name).

    Args:
        spec: see this module's docstring. A weight suffix (``"scenes:0.5"``) is not accepted here: split it off
            with :func:`parse_reward_spec` first.
        **kwargs: passed to the class or factory.

    Returns:
        A reward callable (see :mod:`rewards.base`).

    Raises:
        ValueError: ``spec`` is unknown (the message lists the available names) or cannot be imported.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec in _REGISTRY:
        return _build(_REGISTRY[spec], kwargs, repr(spec), spec)
    if ":" in spec:
        name, weight = parse_reward_spec(spec)
        if name != spec:
            raise ValueError(
                f"reward spec {spec!r} carries a weight ({weight}); split it with parse_reward_spec() "
                f"and pass the name {name!r} to get_reward"
            )
        obj, default_name = _import_attr(spec)
        return _build(obj, kwargs, repr(spec), default_name)
    eps = _entry_points()
    if spec in eps:
        ep = eps[spec]
        try:
            obj = ep.load()
        except Exception as exc:
            raise ImportError(f"reward entry point {spec!r} ({ep.value}) failed to load: {exc}") from exc
        return _build(obj, kwargs, f"{spec!r} (entry point {ep.value})", spec)
    raise ValueError(
        f"unknown reward {spec!r}; available: {', '.join(available_rewards()) or '(none)'}, "
        f"or give 'module:attr' of a reward class, factory or function"
    )


def parse_reward_spec(spec: str) -> tuple[str, float]:
    """Split an optional weight off a reward spec: ``(name_or_module_attr, weight)``; the weight defaults to 1.0.

    The last ``:``-separated part is a weight iff it parses as a finite float (a Python attribute cannot, since
    identifiers never start with a digit, sign or dot)::

        "scenes"               -> ("scenes", 1.0)
        "scenes:0.5"           -> ("scenes", 0.5)
        "pkg.mod:Reward"       -> ("pkg.mod:Reward", 1.0)
        "pkg.mod:Reward:-2e-1" -> ("pkg.mod:Reward", -0.2)

    Raises:
        ValueError: empty spec, an empty part (``"a::b"``, ``"scenes:"``) or more than ``module:attr:weight``.
    """
    if not isinstance(spec, str):
        raise ValueError(f"reward spec must be a string, got {type(spec).__name__}")
    parts = [p.strip() for p in spec.strip().split(":")]
    if not parts[0] or any(not p for p in parts):
        raise ValueError(f"reward spec {spec!r} is malformed: expected 'name', 'name:weight', 'module:attr' "
                         f"or 'module:attr:weight'")
    weight = 1.0
    if len(parts) > 1:
        try:
            value = float(parts[-1])
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            weight = value
            parts = parts[:-1]
    if len(parts) > 2:
        raise ValueError(f"reward spec {spec!r} has too many ':' parts: expected at most 'module:attr:weight'")
    return ":".join(parts), weight

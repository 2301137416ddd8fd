"""Backend registry. Frameworks are imported only when a backend is used, so
`import normbench` (and this module) never loads torch, jax or tensorflow."""

from __future__ import annotations

if __name__ != "normbench.backends":  # the repository root is on sys.path; do not shadow another `backends`
    raise ModuleNotFoundError(f"No module named {__name__!r} ({__file__} is normbench.backends, never a top-level package)",
                              name=__name__)

import importlib
import importlib.util

from normbench.backends.base import BackendUnavailable, Engine

# name -> (framework import name, engine module)
_REGISTRY = {
    "torch": ("torch", "normbench.backends.torch.engine"),
    "jax": ("jax", "normbench.backends.jax.engine"),
    "tensorflow": ("tensorflow", "normbench.backends.tensorflow.engine"),
}
ALIASES = {"pytorch": "torch", "tf": "tensorflow"}


class UnknownBackend(ValueError):
    pass


def names() -> list[str]:
    return list(_REGISTRY)


def canonical_name(name: str) -> str:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in _REGISTRY:
        raise UnknownBackend(f"unknown backend {name!r}; choose from {', '.join(names())} (aliases: {', '.join(ALIASES)})")
    return key


def is_implemented(name: str) -> bool:
    return importlib.util.find_spec(_REGISTRY[canonical_name(name)][1]) is not None


def is_available(name: str) -> bool:
    """True when both normbench's adapter and the framework are installed."""
    key = canonical_name(name)
    return is_implemented(key) and importlib.util.find_spec(_REGISTRY[key][0]) is not None


def available() -> list[str]:
    return [n for n in names() if is_available(n)]


def get_engine(name: str, device: str | None = None, dtype: str = "float32", compile: bool = False) -> Engine:  # noqa: A002
    """The engine of backend `name`; `compile`: see `Engine.__init__`."""
    key = canonical_name(name)
    framework, module = _REGISTRY[key]
    if not is_implemented(key):
        raise BackendUnavailable(f"backend {key!r} is not implemented in this version of normbench")
    if importlib.util.find_spec(framework) is None:
        extra = {"torch": "torch", "jax": "jax", "tensorflow": "tf"}[key]
        raise BackendUnavailable(f"backend {key!r} needs {framework}, which is not installed; install it with: pip install 'normbench[{extra}]'")
    return importlib.import_module(module).Engine(device=device, dtype=dtype, compile=compile)

"""Data augmentations, one file each; this folder is their registry.

An augmentation is a pure NumPy function of a batch and a generator,

    augmented = augmentations.apply("random_crop", batch, rng, padding=4)

that never modifies `batch`, never imports a framework, and draws everything it needs
from `rng` (a `numpy.random.Generator`), so the same generator state gives the same
result in every backend.  Batches are canonical: images (N, H, W, C), point clouds
(N, P, 1, 3) as the point-cloud data sets store them, or (N, P, 3).

A plugin file declares, at module level: ``NAME``, ``INPUT`` (the kind of data set it
augments, "images" or "point_clouds", `datasets.DatasetInfo.kind`), a one-line ``DESCRIPTION``,
``OPTIONS`` (a tuple of `normbench.options.Option`, each with its default, as the
normalization methods declare theirs) and ``apply(batch, rng, **options)``.  Nothing
else lists augmentations: dropping a file into this folder adds it to `names()`.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any, Callable

import numpy as np

from normbench.options import REQUIRED, Option, check
from normbench.plugins import FolderRegistry

__all__ = ["Augmentation", "REGISTRY", "apply", "get", "names"]


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """One registered augmentation: what its file declares, and `apply` with its options checked."""

    name: str
    description: str
    options: tuple[Option, ...]
    function: Callable[..., np.ndarray] = dataclasses.field(repr=False)
    module: str = ""
    input: str = "images"

    def defaults(self) -> dict[str, Any]:
        """Every option's default value."""
        return {option.name: option.default for option in self.options if option.default is not REQUIRED}

    def resolve(self, **options: Any) -> dict[str, Any]:
        """The defaults updated with `options`; ValueError naming the augmentation and option when one is unknown or invalid."""
        known = {option.name: option for option in self.options}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"augmentation {self.name!r}: unknown option {unknown[0]!r}; "
                             f"options: {', '.join(known) or 'none'}")
        resolved = {**self.defaults(), **options}
        for name, option in known.items():
            if name not in resolved:
                raise ValueError(f"augmentation {self.name!r}: option {name!r} is required")
            problem = check(option, resolved[name])
            if problem:
                raise ValueError(f"augmentation {self.name!r}: option {name!r}: {problem}")
        return resolved

    def apply(self, batch: np.ndarray, rng: np.random.Generator, **options: Any) -> np.ndarray:
        """A new, augmented batch; `batch` is left as it was."""
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"augmentation {self.name!r}: rng must be a numpy.random.Generator, got {type(rng).__name__}")
        return self.function(np.asarray(batch), rng, **self.resolve(**options))


def _collect(module: ModuleType):
    name = getattr(module, "NAME", None)
    function = getattr(module, "apply", None)
    if not isinstance(name, str) or not callable(function):
        return []
    return [(name, Augmentation(name=name, description=getattr(module, "DESCRIPTION", ""),
                                options=tuple(getattr(module, "OPTIONS", ())), function=function,
                                module=module.__name__, input=getattr(module, "INPUT", "images")))]


REGISTRY = FolderRegistry(__name__, "augmentation", _collect)


def names() -> list[str]:
    """The registered augmentations, sorted."""
    return sorted(REGISTRY.names())


def get(name: str) -> Augmentation:
    """The augmentation `name`; KeyError (normbench.plugins.UnknownName) listing what exists."""
    return REGISTRY.get(name)


def apply(name: str, batch: np.ndarray, rng: np.random.Generator, **options: Any) -> np.ndarray:
    """Augmentation `name` applied to `batch` with `options` (defaults for the others), drawing from `rng`."""
    return get(name).apply(batch, rng, **options)

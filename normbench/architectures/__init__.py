"""Architectures, one file per family; this folder is their registry.

A family file (say `mnist_cnn.py`) writes its network once against the layer vocabulary
of `layers.py` and binds its configurations to `ARCHITECTURES`, a list of
`Architecture`s (the published configuration and small ones that train on a laptop).
Nothing else lists architecture names.
"""

from __future__ import annotations

from normbench.architectures.layers import Architecture, Layer, conv_padding, declare
from normbench.plugins import FolderRegistry


def _collect(module):
    return [(arch.name, arch) for arch in getattr(module, "ARCHITECTURES", ())]


REGISTRY = FolderRegistry(__name__, "architecture", _collect)


def names() -> list[str]:
    return REGISTRY.names()


def get(name: str) -> Architecture:
    return REGISTRY.get(name)


__all__ = ["Architecture", "Layer", "REGISTRY", "conv_padding", "declare", "get", "names"]

"""Registries that are folders: a plugin is a module in its folder, found by scanning it.

Each plugin folder (`normbench/normalizations/`, `normbench/auxiliary_losses/`,
`normbench/architectures/`, `normbench/experiments/`) builds one `FolderRegistry` in its
`__init__.py`. Every public module of the folder (a name not starting with "_") is a
plugin file and declares what it contributes through one module-level attribute
(`METHOD`, `LOSS`, `ARCHITECTURES`, `EXPERIMENT`, ...). Nothing else lists the names:
dropping a file into the folder adds it to spec validation, the CLI listings, the asv
grid, reports and figures.

Modules are imported lazily, on the first lookup, so `import normbench` stays cheap and
never loads a framework (plugins themselves must not import one either).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Any, Callable, Iterable


class UnknownName(KeyError):
    """A name no plugin of the folder declares. `str()` is one line saying what exists."""

    def __str__(self) -> str:
        return str(self.args[0])


class FolderRegistry:
    """Name -> entry, collected from the plugin modules of one package.

    `collect(module)` returns the (name, entry) pairs a module contributes (usually one);
    names must be unique across the folder, which is checked when the folder is scanned.
    """

    def __init__(self, package: str, what: str, collect: Callable[[Any], Iterable[tuple[str, Any]]]):
        self.package, self.what, self._collect = package, what, collect
        self._entries: dict[str, Any] | None = None
        self._origins: dict[str, str] = {}

    def _scan(self) -> dict[str, Any]:
        if self._entries is None:
            entries: dict[str, Any] = {}
            package = importlib.import_module(self.package)
            for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
                if info.name.startswith("_"):
                    continue
                module = importlib.import_module(f"{self.package}.{info.name}")
                for name, entry in self._collect(module):
                    if name in entries:
                        raise RuntimeError(f"{self.what} {name!r} is declared twice: in {self._origins[name]} and in "
                                           f"{module.__name__}; rename one of them")
                    entries[name] = entry
                    self._origins[name] = module.__name__
            self._entries = entries
        return self._entries

    def names(self) -> list[str]:
        return list(self._scan())

    def items(self):
        return self._scan().items()

    def __contains__(self, name: object) -> bool:
        return name in self._scan()

    def get(self, name: str):
        entries = self._scan()
        if name not in entries:
            close = difflib.get_close_matches(str(name), list(entries), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnknownName(f"unknown {self.what} {name!r}{hint}; available: {', '.join(entries)}")
        return entries[name]

    def origin(self, name: str) -> str:
        """The module that declares `name` (for messages and the extension guide)."""
        self._scan()
        return self._origins[name]

    def reset(self) -> None:
        """Forget the scan (tests that drop a plugin file into the folder call this)."""
        self._entries, self._origins = None, {}


def single(attribute: str) -> Callable[[Any], list[tuple[str, Any]]]:
    """`collect` for folders whose plugin modules declare one entry in `attribute`, named by its `.name`."""

    def collect(module):
        entry = getattr(module, attribute, None)
        return [] if entry is None else [(entry.name, entry)]

    return collect

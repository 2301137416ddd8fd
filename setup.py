"""The package list, computed from the folders so that no sub-package is ever left out of
an install: every folder under normbench/, backends/ and datasets/ (the last two mapped to
normbench.backends / normbench.datasets by package-dir in pyproject.toml, where all other
settings are). pyproject.toml cannot express this: `packages.find` names packages after
their folders, so it cannot find backends/torch as normbench.backends.torch."""

from setuptools import find_namespace_packages, setup


def packages(folder: str, name: str) -> list[str]:
    found = find_namespace_packages(folder, exclude=["__pycache__", "*.__pycache__"])
    return [name, *(f"{name}.{package}" for package in found)]


setup(packages=packages("normbench", "normbench") + packages("backends", "normbench.backends")
      + packages("datasets", "normbench.datasets"))

"""normbench: the standardization loss vs batch norm, benchmarked identically across frameworks."""
__version__ = "0.1.0"


def _find_checkout_subpackages() -> None:
    """Make `normbench.backends` / `normbench.datasets` importable from a source checkout.

    In the repository they are the top-level folders `backends/` and `datasets/`, which
    pyproject.toml maps into the package; every install (regular or editable) puts them
    in place. But when Python imports `normbench` straight from the checkout (the
    repository root on sys.path, as in `python -m normbench.cli` run there), this folder
    has no such sub-packages. A finder then resolves those two names, and only them, to
    the same checkout's folders, so the source being run is used throughout. They never
    become importable as bare top-level `backends` / `datasets`.
    """
    import os
    import sys
    from importlib.util import spec_from_file_location

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    mapped = ("backends", "datasets")
    if any(os.path.exists(os.path.join(here, name)) for name in mapped):
        return  # an installed copy: the sub-packages are in place
    if not os.path.isfile(os.path.join(root, "pyproject.toml")) or not all(
            os.path.isfile(os.path.join(root, name, "__init__.py")) for name in mapped):
        return  # not the repository layout either: leave imports alone

    class CheckoutFinder:
        checkout = root

        @staticmethod
        def find_spec(fullname, path=None, target=None):
            parent, _, name = fullname.rpartition(".")
            if parent != __name__ or name not in mapped:
                return None
            folder = os.path.join(root, name)
            return spec_from_file_location(fullname, os.path.join(folder, "__init__.py"),
                                           submodule_search_locations=[folder])

    # After the path finders (and an editable install's finder, which maps the same folders).
    if not any(getattr(finder, "checkout", None) == root for finder in sys.meta_path):
        sys.meta_path.append(CheckoutFinder)


_find_checkout_subpackages()
del _find_checkout_subpackages

"""The namespace of the modules :func:`seqdsl.compile` imports: ``seqdsl.generated.m<key>``,
one package per compile-cache entry (``<key>``: the first 16 hex digits of its cache key).

Being real, importable names, a model pickled whole (``torch.save(model)``) loads in a fresh
process: unpickling imports ``seqdsl.generated.m<key>.model``, and the finder below maps that
name back to the cache folder, as long as the entry is still in the cache (otherwise the error
says to compile the spec again, which recreates it).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import re
import sys
from pathlib import Path

#: makes this module a package: its submodules are found by :class:`_CacheFinder` alone
__path__: list[str] = []

_NAME = re.compile(r"seqdsl\.generated\.m([0-9a-f]{16})$")


def module_name(key: str) -> str:
    """The package name of the compile-cache entry with this key."""
    return f"{__name__}.m{key[:16]}"


def _folder(prefix: str) -> Path | None:
    from seqdsl.compiler import _cache_root

    found = sorted((_cache_root() / prefix[:2]).glob(f"{prefix}*/__init__.py"))
    return found[0].parent if len(found) == 1 else None


class _CacheFinder(importlib.abc.MetaPathFinder):
    """Finds ``seqdsl.generated.m<key>`` in the compile cache (its ``.model`` and, for the
    Triton backend, ``.kernels`` are then found inside the package's folder as usual)."""

    def find_spec(self, fullname, path=None, target=None):
        match = _NAME.match(fullname)
        if match is None:
            return None
        folder = _folder(match.group(1))
        if folder is None:
            from seqdsl.compiler import _cache_root
            raise ModuleNotFoundError(
                f"{fullname} is not in seqdsl's compile cache ({_cache_root()}): compile its "
                "spec again (seqdsl.compile) before loading what was saved with it",
                name=fullname)
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)])


if not any(isinstance(f, _CacheFinder) for f in sys.meta_path):
    sys.meta_path.append(_CacheFinder())

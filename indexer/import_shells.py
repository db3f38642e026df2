"""Import a few leaf modules of a package without running the package's ``__init__`` (start-up time).

open_clip imports ``torchvision.transforms`` and ``torchvision.ops.misc`` when it is imported. Any torchvision
module runs ``torchvision/__init__.py`` first, which imports all of torchvision: its models, datasets, video
I/O and ops, and through ``torchvision.ops.roi_align`` all of ``torch._dynamo``. On 2 cores that is about 1.4 of
open_clip's 2 s of import, spent on code a CLIP forward pass never calls.

:func:`package_shells` stands empty "shell" packages in for ``torchvision`` and ``torchvision.ops`` while
open_clip imports, so only the leaf modules it names are loaded, from torchvision's own files. Afterwards the
shells are removed: a later ``import torchvision`` runs the real ``__init__`` as usual, and a one-shot import
hook (:class:`_ReattachLeaves`) puts the already-loaded leaves back on the real packages before their
``__init__`` runs, so each leaf stays one module (``torchvision.transforms.Resize is
open_clip.transform.Resize``).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import types
from contextlib import contextmanager
from pathlib import Path

__all__ = ["package_shells"]

_LOCK = threading.RLock()  # re-entrant: a package imported under one root's shells may stand shells of its own


class _ReattachLeaves(importlib.abc.MetaPathFinder):
    """Import hook: when a package whose leaves were loaded under a shell is imported for real, its loaded leaves
    are set as attributes of the new package module before the package's own ``__init__`` runs."""

    def __init__(self, leaves: dict[str, list[str]]):
        self.leaves = leaves  # package name -> the full names of its loaded child modules

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.leaves:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        children = self.leaves.pop(fullname)
        if not self.leaves and self in sys.meta_path:
            sys.meta_path.remove(self)
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module):
            for child in children:
                leaf = sys.modules.get(child)
                if leaf is not None:
                    setattr(module, child.rpartition(".")[2], leaf)
            original(module)

        loader.exec_module = exec_module  # this loader object serves this one import only
        return spec


@contextmanager
def package_shells(root: str, packages: tuple[str, ...]):
    """While the block runs, ``packages`` (``root`` and sub-packages of it) are empty shells in ``sys.modules``.

    Importing ``root.sub.leaf`` inside the block loads only that leaf (and what it imports), not the packages'
    ``__init__`` files. Nothing is done when ``packages`` is empty or ``root`` is already imported or not installed.

    Args:
        root: the top-level package, e.g. ``"torchvision"``.
        packages: the shells to stand in, ``root`` first, e.g. ``("torchvision", "torchvision.ops")``.

    Example:
        >>> with package_shells("torchvision", ("torchvision", "torchvision.ops")):  # doctest: +SKIP
        ...     import open_clip
    """
    found = None if not packages or root in sys.modules else importlib.util.find_spec(root)
    if found is None or not found.submodule_search_locations:
        yield
        return
    base = Path(list(found.submodule_search_locations)[0])
    with _LOCK:
        shells: dict[str, types.ModuleType] = {}
        for name in packages:
            rel = name.split(".")[1:]
            location = str(base.joinpath(*rel))
            shell = types.ModuleType(name)
            shell.__path__ = [location]
            shell.__package__ = name
            shell.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            shell.__spec__.submodule_search_locations = [location]
            sys.modules[name] = shell
            shells[name] = shell
            parent, _, short = name.rpartition(".")
            if parent in shells:
                setattr(shells[parent], short, shell)
        before = set(sys.modules)
        try:
            yield
        finally:
            for name, shell in shells.items():
                if sys.modules.get(name) is shell:
                    del sys.modules[name]
            leaves: dict[str, list[str]] = {}
            for name in sorted(set(sys.modules) - before):
                parent = name.rpartition(".")[0]
                if parent in shells:
                    leaves.setdefault(parent, []).append(name)
            if leaves:
                sys.meta_path.insert(0, _ReattachLeaves(leaves))

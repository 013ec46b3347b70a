"""Modules of the user's that take the name of one of the runtime's packages.

A ``state.py`` (or ``actors.py``, ``connectors.py``, ``runtime.py``, or a package of that name)
in the job's folder or in the working directory of ``python -m runtime`` comes first on
``sys.path``, so ``import state`` finds it instead of the runtime's package, and the runtime
fails deep inside its own imports. Both places are checked before that can happen:
:func:`shadowing_modules` for the job's folder (``load_job_file``), and importing this module
(the first thing ``runtime/__init__.py`` does) for ``sys.path``: under ``python -m runtime`` every
package, as one ``error:`` line and exit 2; for a program that imports the runtime, the packages
it imports itself, as an ``ImportError``. Standard library only, since it
runs before the runtime's packages can be imported.
"""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path

RUNTIME_PACKAGES = ("runtime", "actors", "connectors", "state")
"""The top-level packages of the runtime (the names users must not give their own modules)."""

_INSTALLED_AT = Path(__file__).resolve().parents[2]


def _is_ours(path: Path, name: str) -> bool:
    return path.resolve() == (_INSTALLED_AT / name).resolve()


def describe_shadowing(module: Path, name: str) -> str:
    """The one line that says which file to rename."""
    rename = f"my_{name}.py" if module.suffix == ".py" else f"my_{name}"
    return (
        f"{module} has the name of the runtime's package {name!r}, so 'import {name}' finds it "
        f"instead of the runtime's: rename it (e.g. to {rename}) and its imports"
    )


def shadowing_modules(folder: Path) -> list[tuple[Path, str]]:
    """The modules and packages in ``folder`` named like one of the runtime's packages (the
    runtime's own packages excepted), with the package name each takes."""
    found = []
    for name in RUNTIME_PACKAGES:
        module, package = folder / f"{name}.py", folder / name
        if module.is_file():
            found.append((module, name))
        elif (package / "__init__.py").is_file() and not _is_ours(package, name):
            found.append((package, name))
    return found


_IMPORTED_BY_RUNTIME = ("actors", "state")
"""The packages ``import runtime`` imports itself: shadowed, it cannot be imported at all."""


def _shadowed_on_import_path(names: tuple[str, ...]) -> list[tuple[Path, str]]:
    found = []
    for name in names:
        loaded = sys.modules.get(name)
        if loaded is not None:
            origin = getattr(loaded, "__file__", None)
        else:
            spec = importlib.machinery.PathFinder.find_spec(name)
            origin = spec.origin if spec is not None else None
        if origin is None:
            continue
        where = Path(origin)
        where = where.parent if where.name == "__init__.py" else where
        if not _is_ours(where, name):
            found.append((where, name))
    return found


def _refuse_shadowed_packages() -> None:
    # ``python -m runtime`` is importing its package: a job it runs may import any of the
    # runtime's packages. A program importing the runtime may have a module named like one it
    # never imports (``connectors``).
    command_line = sys.argv[:1] == ["-m"]
    shadowed = _shadowed_on_import_path(RUNTIME_PACKAGES if command_line else _IMPORTED_BY_RUNTIME)
    if not shadowed:
        return
    message = "; ".join(describe_shadowing(path, name) for path, name in shadowed)
    if command_line:
        sys.stderr.write(f"error: {message}\n")  # the CLI's one line, exit 2
        raise SystemExit(2)
    raise ImportError(message)


_refuse_shadowed_packages()

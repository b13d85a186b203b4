"""Names that moved when the campaign pipeline became one module: their old imports keep
working, with a ``DeprecationWarning`` that says where each now lives. The aliases go in the
next minor release (see CHANGELOG.md).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping

REMOVED_IN = "0.3"


def moved_names(module: str, moved: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` that serves the names in ``moved`` from their new home.

    Args:
        module: The old module's name (``__name__``).
        moved: Each old name and where it now lives, as ``"package.module:name"``.

    Returns:
        The ``__getattr__`` to assign in the old module.
    """

    def __getattr__(name: str) -> object:
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        where, _, new_name = moved[name].partition(":")
        warnings.warn(
            f"{module}.{name} moved to {where}.{new_name}; import it from there "
            f"(the old name is removed in {REMOVED_IN})",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(where), new_name)

    return __getattr__

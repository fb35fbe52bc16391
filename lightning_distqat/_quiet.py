"""Importing transformers imports torchao when it is installed, and torchao registers enums with torch's pytree, which
logs a deprecation warning per enum in every process (trainer and experts alike). Those lines say nothing to a user
of this library, so the import runs with that one logger raised to ERROR (the user's logging is left as it was).
Standard library only: experts import it too."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

__all__ = ["quiet_transformers"]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    pytree = logging.getLogger("torch.utils._pytree")
    level = pytree.level
    pytree.setLevel(logging.ERROR)
    try:
        yield
    finally:
        pytree.setLevel(level)

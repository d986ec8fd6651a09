"""Errors and warnings of the data layer.

Every :class:`DataError` is one line that names the file (or the scene
description) and the problem, so a job fails before any rank starts heavy work
with a message a user can act on, never with a traceback from inside GDAL or
HDF5.
"""
from __future__ import annotations

import os

from ..cli_args import one_line


class DataError(ValueError):
    """Bad scene input: a missing or corrupt file, a band count that does not match
    the model, a label grid that does not match the image, NaN/inf in the image,
    an empty scene, an unreadable HDF5 dataset path, a malformed description.

    ``path`` is the offending file (or None), ``problem`` the reason; ``str(e)`` is
    ``"<path>: <problem>"`` on one line."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = one_line(problem)
        super().__init__(self.problem if self.path is None else f"{self.path}: {self.problem}")


class DataWarning(UserWarning):
    """Something accepted but worth knowing (e.g. label and image CRSs that differ
    only in datum realisation, a constant band whose std is replaced by 1)."""

"""The exceptions of :mod:`bnext.data`: every one names the file or source it is about."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

class DataError(Exception):
    """Base class of the errors raised by :mod:`bnext.data`."""


class CorruptFileError(DataError):
    """A data file is missing, truncated, or not in the expected format. ``path`` names the file."""

    def __init__(self, path: Union[str, os.PathLike], problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UnsafePickleError(CorruptFileError):
    """A pickle asked for a global outside the allowlist (it could run code); nothing was called."""


class DownloadError(DataError):
    """The archive could not be fetched (offline, DNS, HTTP error, connection cut). The signal for
    ``load_dataset("auto")`` to fall back to the synthetic task."""


class ChecksumError(DataError):
    """A downloaded or local archive does not have the expected MD5 checksum."""


class UnsafeArchiveError(DataError):
    """A tar member would be written outside the target directory, or is a link or device."""

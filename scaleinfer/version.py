"""The package's version: pyproject.toml's, as the installed metadata records it (the one source of truth)."""

from __future__ import annotations

import importlib.metadata

try:
    __version__ = importlib.metadata.version("scaleinfer")
except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"

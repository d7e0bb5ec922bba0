"""The ``graphslim`` command line (the top layer)."""

from __future__ import annotations

from graphslim.cli.main import main

__all__ = ["main"]

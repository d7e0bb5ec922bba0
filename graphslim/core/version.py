"""graphslim's version (read by pyproject.toml, reports and cache keys)."""

__version__ = "0.1.0"

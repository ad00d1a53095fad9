"""The version, single-sourced: pyproject.toml reads it, and no package imports the root for it."""

__version__ = "0.1.0"

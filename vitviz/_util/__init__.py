"""Helpers shared by the whole package: atomic file writes (``files``) and optional extras (``extras``)."""

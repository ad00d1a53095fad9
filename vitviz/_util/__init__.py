"""Helpers shared by the whole package: atomic file writes (``files``), optional extras (``extras``) and
progress bars drawn only where someone watches them (``progress``)."""

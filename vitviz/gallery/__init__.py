"""Batch gallery: a folder of images in, every map for every image and a page to browse them out.

``build_gallery(src, model, out_dir, methods=...)`` decodes images in background worker
processes, runs the model in batches under :func:`vitviz.capture`, turns each batch into
maps with the registered map methods (the one registry of :mod:`vitviz.explain`, re-exported
here: :func:`list_methods`; add your own with :func:`register_method`), and renders overlays
and raw maps in threads while the next batch runs. Everything is written whole; a re-run
resumes; ``shard="K/N"`` splits the work over N processes or machines and
:func:`merge_gallery` (or the last shard) writes the combined page.

Named ``build_gallery``/``merge_gallery`` (not ``gallery``) so that the function never
shadows this subpackage as an attribute of :mod:`vitviz`.
"""

from ._page import GalleryResult, merge_gallery
from ._pipeline import build_gallery
from ._plan import weights_fingerprint
from ._sources import IMAGE_EXTENSIONS, Source, SourceError, list_sources, output_names, parse_shard, shard_of

# the map-method registry lives in vitviz.explain; re-exported lazily, so that importing the
# gallery (`vitviz gallery --merge`) does not import torch
_FROM_EXPLAIN = ("register_method", "unregister_method", "list_methods", "get_method", "Method", "MethodInput",
                 "MethodResult")


def __getattr__(name: str):
    """The registry's names, loaded from :mod:`vitviz.explain` on first use.

    Raises:
        AttributeError: not a name of this package.
    """
    if name in _FROM_EXPLAIN:
        from .. import explain

        return getattr(explain, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["build_gallery", "merge_gallery", "GalleryResult", "register_method", "unregister_method",
           "list_methods", "get_method", "Method", "MethodInput", "MethodResult", "list_sources", "Source",
           "SourceError", "output_names", "parse_shard", "shard_of", "IMAGE_EXTENSIONS",
           "weights_fingerprint"]

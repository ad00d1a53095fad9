"""The `vitviz` command line: ``main`` parses and dispatches to one module per subcommand in
``vitviz.cli.commands``."""

from ._main import EXAMPLES, build_parser, main

__all__ = ["main", "build_parser", "EXAMPLES"]

# `python -m trio_socketserver.compat.http`: the stdlib's `python -m http.server`, unmodified,
# with compat installed first, so the same command line and the same handler serve a directory
# on the trio engine. Nothing happens on import; main() does the work. Only the words of its
# --help are ours: they say which program this is, since the stdlib's would say `server.py`.
"""Serve a directory over HTTP, as ``python -m http.server`` does, on the trio engine.

Usage: ``python -m trio_socketserver.compat.http [--bind ADDR] [--directory DIR] [port]``
(every option of ``python -m http.server`` on this interpreter works: ``--help`` lists them).
Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import contextlib
import runpy
import sys
from collections.abc import Iterator
from typing import Any

from ._install import install

PROG = "python -m trio_socketserver.compat.http"
DESCRIPTION = (
    "Serve a directory over HTTP: the standard library's http.server command line "
    "(the same options), running on trio-socketserver's trio engine."
)


def main(argv: list[str] | None = None) -> None:
    """Run the stdlib's ``http.server`` command line with compat installed.

    ``argv`` replaces ``sys.argv[1:]`` when given. The stdlib's own code parses the options,
    prints where it serves and serves with its ``ThreadingHTTPServer``: on compat, since
    :func:`install` runs before it is executed.

    Errors: as :func:`install` (``RuntimeError`` if ``socketserver`` was already imported
    and is held elsewhere), and whatever the stdlib's command line exits with.
    """
    install()
    if argv is not None:
        sys.argv[1:] = argv
    with _named_parser():
        runpy.run_module("http.server", run_name="__main__", alter_sys=True)


@contextlib.contextmanager
def _named_parser() -> Iterator[None]:
    """The next argument parser built (the stdlib's, in its main block) names this program
    and says what it is.

    The stdlib builds it with neither, so argparse would name it after the file it runs
    (``usage: server.py``). Only that one parser is affected: the first construction puts
    argparse back as it was.
    """
    parser_class = argparse.ArgumentParser
    stdlib_init = parser_class.__init__

    def init(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        parser_class.__init__ = stdlib_init  # type: ignore[method-assign]
        kwargs.setdefault("prog", PROG)
        kwargs.setdefault("description", DESCRIPTION)
        stdlib_init(self, *args, **kwargs)

    parser_class.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        parser_class.__init__ = stdlib_init  # type: ignore[method-assign]


if __name__ == "__main__":
    main()

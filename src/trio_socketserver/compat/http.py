# `python -m trio_socketserver.compat.http`: the stdlib's `python -m http.server`, unmodified,
# with compat installed first, so the same command line and the same handler serve a directory
# on the trio engine. Nothing happens on import; main() does the work.
"""Serve a directory over HTTP, as ``python -m http.server`` does, on the trio engine.

Usage: ``python -m trio_socketserver.compat.http [--bind ADDR] [--directory DIR] [port]``
(every option of ``python -m http.server`` on this interpreter works: ``--help`` lists them).
Ctrl-C stops it.
"""

from __future__ import annotations

import runpy
import sys

from ._install import install


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
    runpy.run_module("http.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

# install(), uninstall(), installed(): make `import socketserver` resolve to
# trio_socketserver.compat, so the stdlib modules built on socketserver run on the trio engine.
# Only these functions touch sys.modules, and only when called: importing compat changes nothing.
from __future__ import annotations

import importlib
import sys
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager

# The stdlib modules whose classes derive from socketserver's. When socketserver is swapped,
# those already imported are re-executed in place (importlib.reload), so `http.server.HTTPServer`
# and friends derive from the module now in place. Later entries import from earlier ones.
DEPENDENTS = ("http.server", "xmlrpc.server", "wsgiref.simple_server", "logging.config")

_lock = threading.Lock()
# What sys.modules["socketserver"] held before install(): the stdlib module, or None if it
# was not imported yet. Meaningful only while installed.
_replaced: types.ModuleType | None = None


def _compat() -> types.ModuleType:
    return sys.modules[__name__.rpartition(".")[0]]


def install() -> None:
    """Make ``import socketserver`` return :mod:`trio_socketserver.compat`.

    Call it first thing (before importing ``http.server`` and the like); it is idempotent.
    Stdlib modules built on socketserver that are already imported (``http.server``,
    ``xmlrpc.server``, ``wsgiref.simple_server``, ``logging.config``) are reloaded so their
    classes run on the trio engine.

    Errors: ``RuntimeError``, changing nothing, when other modules already hold the stdlib's
    ``socketserver`` or classes built on it (``from http.server import HTTPServer`` run before
    install(), a handler class defined on the stdlib's bases): they would keep running on the
    stdlib's engine. The message names them; call install() before they are imported.

    Thread safety: callable from any thread; do not run servers while it runs.
    """
    global _replaced
    with _lock:
        compat = _compat()
        current = sys.modules.get("socketserver")
        if current is compat:
            return
        holders = [] if current is None else _holders_of(current)
        if holders:
            raise RuntimeError(
                "socketserver was imported before trio_socketserver.compat.install(), and "
                f"these modules hold its classes: {', '.join(sorted(holders))}. They would keep "
                "running on the stdlib's engine. Call install() before importing them (first "
                "thing in your program, or in conftest.py), or import trio_socketserver.compat "
                "in place of socketserver there."
            )
        _replaced = current
        sys.modules["socketserver"] = compat
        _reload_dependents()


def uninstall() -> None:
    """Undo :func:`install`: ``import socketserver`` returns the stdlib module again.

    The stdlib modules built on socketserver that are imported are reloaded onto it. Modules
    imported while compat was installed keep the compat classes they took. Idempotent.
    """
    global _replaced
    with _lock:
        if sys.modules.get("socketserver") is not _compat():
            return
        if _replaced is None:
            del sys.modules["socketserver"]
        else:
            sys.modules["socketserver"] = _replaced
        _replaced = None
        _reload_dependents()


def is_installed() -> bool:
    """Whether ``import socketserver`` currently returns compat."""
    return sys.modules.get("socketserver") is _compat()


@contextmanager
def installed() -> Iterator[types.ModuleType]:
    """``with installed():`` compat is ``socketserver`` inside the block (for tests).

    Yields the compat module. Leaves compat installed on exit if it already was on entry.
    """
    was_installed = is_installed()
    install()
    try:
        yield _compat()
    finally:
        if not was_installed:
            uninstall()


def _reload_dependents() -> None:
    for name in DEPENDENTS:
        module = sys.modules.get(name)
        if module is not None:
            importlib.reload(module)


def _holders_of(stdlib: types.ModuleType) -> list[str]:
    """Modules (other than DEPENDENTS, which are reloaded) whose globals hold ``stdlib`` or a
    class derived from one of its classes."""
    own = {
        id(value)
        for value in vars(stdlib).values()
        if isinstance(value, type) and value.__module__ == stdlib.__name__
    }
    holders = []
    for name, module in list(sys.modules.items()):
        if module is None or module is stdlib or name in DEPENDENTS:
            continue
        try:
            values = list(vars(module).values())
        except TypeError:
            continue  # not a module: some libraries put other objects in sys.modules
        for value in values:
            if value is stdlib or (
                isinstance(value, type) and any(id(base) in own for base in value.__mro__)
            ):
                holders.append(name)
                break
    return holders

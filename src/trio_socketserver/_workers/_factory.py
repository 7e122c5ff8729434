# The server factory of serve_workers(), across the process boundary: the supervisor names
# it (module and qualified name, or the program's own file when it lives in __main__, as
# multiprocessing's spawn does), and each worker imports it afresh, builds a server around
# every socket it inherited and serves them until a signal stops them, exactly as the
# command line does. Loading afresh is the point: after a SIGHUP the new workers run the code
# as it is on disk now.
"""Naming a server factory in the supervisor, and serving it in a worker."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import trio

from .. import __main__
from .._activation import inherited_sockets
from .._cli import EXIT_FAILURE, EXIT_USAGE
from .._server import LOGGER, BaseServer
from .._signals import serve_until_signal

# The name a worker gives the program's main module when the factory lives there: not
# "__main__", so its `if __name__ == "__main__":` block (which starts the supervisor) does
# not run again in every worker.
MAIN_ALIAS = "__trio_socketserver_main__"

Factory = Callable[[Any], BaseServer]


def name_factory(factory: Factory) -> tuple[str, str]:
    """Where a worker finds ``factory``: (module name or file path, qualified name).

    Errors: ``TypeError`` for a factory a fresh interpreter cannot import by name: a
    lambda, a function defined inside another, a bound method, or an object that is not
    what its module holds under its name.
    """
    module_name = getattr(factory, "__module__", None)
    qualname = getattr(factory, "__qualname__", None)
    if not isinstance(module_name, str) or not isinstance(qualname, str) or "<" in qualname:
        raise TypeError(
            f"serve_workers() needs a factory that workers can import by name: a function "
            f"or class defined at the top level of a module, not {factory!r}"
        )
    module = sys.modules.get(module_name)
    if _resolve(module, qualname) is not factory:
        raise TypeError(
            f"serve_workers(): {module_name}.{qualname} is not {factory!r}; pass the "
            "function or class as its module defines it"
        )
    if module_name != "__main__":
        return module_name, qualname
    spec = getattr(module, "__spec__", None)
    if spec is not None and spec.name:
        return spec.name, qualname  # run as `python -m package.module`
    path = getattr(module, "__file__", None)
    if path is None:
        raise TypeError(
            "serve_workers(): the factory is defined in an interactive session; define it "
            "in a module (a file) that workers can import"
        )
    return os.path.abspath(path), qualname


def load_factory(where: str, qualname: str) -> Factory:
    """Import the factory :func:`name_factory` named (a fresh import: this is a new process)."""
    if os.sep in where:
        spec = importlib.util.spec_from_file_location(MAIN_ALIAS, where)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[MAIN_ALIAS] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    factory: Factory = _resolve(module, qualname)
    return factory


def _resolve(module: object, qualname: str) -> Any:
    target = module
    for part in qualname.split("."):
        target = getattr(target, part, None)
    return target


def serve_factory(where: str, qualname: str, log_level: str) -> int:
    """A worker's life: import the factory, serve a server per socket, return the status.

    It logs to stderr at ``log_level`` (the supervisor's), unless the factory's module set
    up logging as it was imported. An exception from importing or calling the factory is
    logged and the worker exits with status 2, as the command line does for a handler that
    does not import: the supervisor takes it for a worker that could not start. One while
    serving: status 1.
    """
    # As `--workers` ones do (the command line's format, with the pid).
    logging.basicConfig(level=log_level, format=__main__.LOG_FORMAT_WITH_PID, stream=sys.stderr)
    inherited = inherited_sockets()
    servers: list[BaseServer] = []
    try:
        try:
            factory = load_factory(where, qualname)
            servers += [factory(entry.socket) for entry in inherited]
        # Whatever the program's code raised: the worker cannot start, and says why.
        except Exception:
            LOGGER.critical("the worker could not start its servers", exc_info=True)
            return EXIT_USAGE
        try:
            return trio.run(serve_until_signal, *servers)
        # As the command line's last resort: logged with its traceback.
        except Exception:
            LOGGER.critical("the worker failed", exc_info=True)
            return EXIT_FAILURE
    finally:
        for server in servers:
            server.server_close()
        for entry in inherited:
            entry.socket.close()

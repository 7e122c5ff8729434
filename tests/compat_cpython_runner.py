# Runs CPython's own test modules for socketserver and its dependents, once per process, with
# the stdlib's socketserver or with trio_socketserver.compat substituted before the test module
# is imported; prints one JSON line with every test's outcome. Driven by test_compat_cpython.py
# (a subprocess per suite and mode, so each starts from a clean interpreter).
#
#   python compat_cpython_runner.py {stdlib|compat} test.test_logging [PATTERN|!PATTERN ...]
# prints a line: MARKER {"socketserver": ..., "servers": ..., "outcomes": {test id: outcome}}
from __future__ import annotations

import importlib
import io
import json
import sys
import unittest
from collections.abc import Iterator

# Starts the line with the report: a suite may print to stdout too.
MARKER = "@@compat-cpython-report@@"
# The stdlib modules whose server classes derive from socketserver's.
SERVER_MODULES = ("http.server", "xmlrpc.server", "wsgiref.simple_server", "logging.config")


def _server_bases(module_names: list[str]) -> dict[str, str]:
    """For every server class in these modules' globals: the module its BaseServer is from.

    "socketserver" means the stdlib's engine; "trio_socketserver.compat" means compat's.
    """
    bases = {}
    for name in module_names:
        module = sys.modules.get(name)
        if module is None:
            continue
        for attr, value in vars(module).items():
            if isinstance(value, type):
                roots = [c for c in value.__mro__ if c.__name__ == "BaseServer"]
                if roots:
                    bases[f"{name}.{attr}"] = roots[0].__module__
    return bases


class _Outcomes(unittest.TextTestResult):
    """Records the outcome of every test id: ok, fail, error, skip, xfail, xpass."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.outcomes: dict[str, str] = {}

    def addSuccess(self, test: unittest.TestCase) -> None:
        super().addSuccess(test)
        self.outcomes.setdefault(test.id(), "ok")

    def addFailure(self, test: unittest.TestCase, err: object) -> None:
        super().addFailure(test, err)  # type: ignore[arg-type]
        self.outcomes[test.id()] = "fail"

    def addError(self, test: unittest.TestCase, err: object) -> None:
        super().addError(test, err)  # type: ignore[arg-type]
        self.outcomes[test.id()] = "error"

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:
        super().addSkip(test, reason)
        self.outcomes[test.id()] = "skip"

    def addExpectedFailure(self, test: unittest.TestCase, err: object) -> None:
        super().addExpectedFailure(test, err)  # type: ignore[arg-type]
        self.outcomes[test.id()] = "xfail"

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:
        super().addUnexpectedSuccess(test)
        self.outcomes[test.id()] = "xpass"

    def addSubTest(self, test: unittest.TestCase, subtest: unittest.TestCase, err: object) -> None:
        super().addSubTest(test, subtest, err)  # type: ignore[arg-type]
        if err is not None:
            self.outcomes[test.id()] = "fail"


def _tests(suite: unittest.TestSuite | unittest.TestCase) -> Iterator[unittest.TestCase]:
    if isinstance(suite, unittest.TestSuite):
        for test in suite:
            yield from _tests(test)
    else:
        yield suite


def _selected(test_id: str, patterns: list[str]) -> bool:
    """PATTERN keeps ids containing it (all ids if none is given); !PATTERN drops them."""
    keep = [p for p in patterns if not p.startswith("!")]
    drop = [p[1:] for p in patterns if p.startswith("!")]
    if keep and not any(p in test_id for p in keep):
        return False
    return not any(p in test_id for p in drop)


def main(mode: str, module_name: str, patterns: list[str]) -> None:
    if mode == "compat":
        from trio_socketserver import compat

        compat.install()
    elif mode != "stdlib":
        raise SystemExit(f"mode must be 'stdlib' or 'compat', not {mode!r}")
    support = importlib.import_module("test.support")
    support.verbose = False  # as regrtest without -v: the suites print progress otherwise
    try:
        module = importlib.import_module(module_name)
    except unittest.SkipTest as exc:
        print(MARKER, json.dumps({"skipped_module": str(exc)}))
        return
    socketserver = sys.modules["socketserver"]
    suite = unittest.TestSuite(
        test
        for test in _tests(unittest.TestLoader().loadTestsFromModule(module))
        if _selected(test.id(), patterns)
    )
    log = io.StringIO()
    runner = unittest.TextTestRunner(stream=log, verbosity=2, resultclass=_Outcomes)
    result = runner.run(suite)
    assert isinstance(result, _Outcomes)
    report = {
        "socketserver": socketserver.__name__,
        "servers": _server_bases([module_name, *SERVER_MODULES]),
        "outcomes": result.outcomes,
        "log": log.getvalue()[-200_000:],
    }
    print(MARKER, json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])

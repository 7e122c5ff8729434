# CPython's own tests of socketserver and of the stdlib modules built on it (http.server,
# xmlrpc.server, wsgiref, logging.config.listen and logging's socket handlers), run on the
# interpreter running these tests twice: once as shipped (the baseline), once with
# trio_socketserver.compat substituted for socketserver before the test module is imported.
# Every test the stdlib passes must pass on compat, except those listed in docs/compat.md;
# the set of failures must equal that list, so a regression fails here and so does a fix
# that leaves the list stale. Each run is a subprocess (compat_cpython_runner.py); the runs of
# all selected suites go in parallel, since they mostly wait on sockets and timers.
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().parent / "compat_cpython_runner.py"
EXCEPTIONS_DOC = ROOT / "docs" / "compat.md"
# A row of the exceptions table in docs/compat.md: | `test.test_x.Class.test_y` | reason |
EXCEPTION_ROW = re.compile(r"^\|\s*`(test\.test_\w+\.[\w.]+)`\s*\|", re.MULTILINE)
# Runs at once: the suites sleep and wait on sockets far more than they compute, so four
# fit two cores; more would make their own timing-sensitive tests flaky on a loaded machine.
PARALLEL_RUNS = 4
# One suite in one mode takes 1 to 30 s (test_xmlrpc's full run); far more means it hung.
RUN_TIMEOUT = 300.0
REPORT_MARKER = "@@compat-cpython-report@@"  # as in compat_cpython_runner.py
COMPAT = "trio_socketserver.compat"


@attrs.frozen
class Suite:
    module: str
    patterns: tuple[str, ...] = ()
    """Test ids to run: containing a PATTERN, without any !PATTERN (runner's syntax)."""


LOGGING_SERVERS = (
    ".SocketHandlerTest.",
    ".UnixSocketHandlerTest.",
    ".DatagramHandlerTest.",
    ".UnixDatagramHandlerTest.",
    "SysLogHandlerTest.",  # and the Unix and IPv6 variants
    ".HTTPHandlerTest.",
    ".test_listen_",  # ConfigDictTest's logging.config.listen() tests
)

# The default run leaves out what only waits: MultiPathServerTestCase's nine tests each wait
# 3 s for a request that never comes (27 s), test_noserver sleeps 2.5 s twice. The slow run has
# every test of these suites.
FAST = {
    "socketserver": Suite("test.test_socketserver"),
    "httpservers": Suite("test.test_httpservers"),
    "xmlrpc": Suite("test.test_xmlrpc", ("!.MultiPathServerTestCase.",)),
    "wsgiref": Suite("test.test_wsgiref"),
    "logging": Suite("test.test_logging", (*LOGGING_SERVERS, "!.test_noserver")),
}
FULL = {
    "xmlrpc": Suite("test.test_xmlrpc"),
    "logging": Suite("test.test_logging", LOGGING_SERVERS),
}
CASES = [pytest.param(suite, id=name) for name, suite in FAST.items()] + [
    pytest.param(suite, id=f"{name}-full", marks=pytest.mark.slow) for name, suite in FULL.items()
]


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False  # no `test` package at all (some distributions ship Python without it)


def _run(suite: Suite, mode: str, cwd: Path) -> dict[str, Any]:
    """One suite in one mode, in a fresh interpreter; the runner's report."""
    path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, str(RUNNER), mode, suite.module, *suite.patterns],
        cwd=cwd,  # the suites write scratch files (TESTFN) into the working directory
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    for line in reversed(result.stdout.splitlines()):
        if line.startswith(REPORT_MARKER):
            report: dict[str, Any] = json.loads(line.removeprefix(REPORT_MARKER))
            return report
    raise AssertionError(
        f"{suite.module} ({mode}) exited {result.returncode} without a report:\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )


@pytest.fixture(scope="module")
def runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[Suite, dict[str, Future[dict[str, Any]]]]]:
    """Both runs of every suite selected in this session, started together."""
    selected = {
        item.callspec.params["suite"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec")
    }
    with ThreadPoolExecutor(PARALLEL_RUNS) as pool:
        futures = {
            suite: {
                mode: pool.submit(_run, suite, mode, tmp_path_factory.mktemp(mode))
                for mode in ("stdlib", "compat")
            }
            for suite in selected
            if _available(suite.module)
        }
        yield futures
        for modes in futures.values():
            for future in modes.values():
                future.cancel()


def documented_exceptions() -> set[str]:
    """The test ids docs/compat.md lists as failing on compat, each with its reason."""
    return set(EXCEPTION_ROW.findall(EXCEPTIONS_DOC.read_text()))


def test_the_exceptions_table_parses() -> None:
    exceptions = documented_exceptions()
    assert "test.test_socketserver.MiscTestCase.test_all" in exceptions


@pytest.mark.parametrize("suite", CASES)
def test_cpython_suite_passes_on_compat(
    suite: Suite, runs: dict[Suite, dict[str, Future[dict[str, Any]]]]
) -> None:
    if suite not in runs:
        pytest.skip(f"{suite.module} is not installed with this interpreter (no `test` package)")
    stdlib = runs[suite]["stdlib"].result()
    compat = runs[suite]["compat"].result()
    if "skipped_module" in stdlib:
        pytest.skip(f"{suite.module} skips itself here: {stdlib['skipped_module']}")

    # The substitution really happened, before the test module was imported: the test
    # module, and the stdlib modules it uses, derive their servers from compat's BaseServer.
    assert stdlib["socketserver"] == "socketserver"
    assert set(stdlib["servers"].values()) == {"socketserver"}
    assert compat["socketserver"] == COMPAT
    assert compat["servers"], "no server class found: the suite did not load socketserver"
    assert set(compat["servers"].values()) == {COMPAT}, compat["servers"]

    passed = {test for test, outcome in stdlib["outcomes"].items() if outcome == "ok"}
    assert passed, f"the stdlib passed nothing:\n{stdlib['log'][-3000:]}"
    regressions = {test for test in passed if compat["outcomes"].get(test) != "ok"}
    expected = {test for test in documented_exceptions() if test in passed}
    assert regressions == expected, (
        f"failing on compat but not listed in docs/compat.md: {sorted(regressions - expected)}\n"
        f"listed but passing now (update the list): {sorted(expected - regressions)}\n"
        f"compat run:\n{compat['log'][-6000:]}"
    )

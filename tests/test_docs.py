# The documentation site builds, offline and warning-free (`sphinx-build -W`), its API
# reference lists every public name, and the code on its tutorial and how-to pages runs:
# the docs cannot drift from the code without a test failing.
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

import trio_socketserver
from trio_socketserver import compat, testing

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# The pages written to be run top to bottom; the reference pages (native.md, compat.md,
# forking.md) show fragments of larger programs.
RUNNABLE_PAGES = ["tutorial.md", *sorted(p.name for p in (DOCS / "howto").glob("*.md"))]
PUBLIC_MODULES = [trio_socketserver, compat, testing]
# A full build takes about 15 s on a loaded 2-core machine; this bounds a hung one.
BUILD_TIMEOUT = 120


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("html")
    started = time.monotonic()
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html", DOCS, out],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    assert build.stderr == "", build.stderr  # -W: any warning fails the build anyway
    print(f"docs built in {time.monotonic() - started:.1f} s")
    return out


def test_the_site_builds_without_a_warning(built: Path) -> None:
    pages = {p.relative_to(built).as_posix() for p in built.rglob("*.html")}
    for page in ["index.html", "tutorial.html", "reference.html", "native.html", "compat.html"]:
        assert page in pages


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_the_reference_lists_every_public_name(built: Path, module: ModuleType) -> None:
    reference = (built / "reference.html").read_text()
    documented = set(re.findall(r'id="([\w.]+)"', reference))
    missing = [n for n in module.__all__ if f"{module.__name__}.{n}" not in documented]
    assert not missing, f"not in the API reference: {missing}"


def test_lifecycle_methods_state_cancellation_and_thread_safety(built: Path) -> None:
    reference = (built / "reference.html").read_text()
    start = reference.index('id="trio_socketserver.BaseServer.serve_forever"')
    serve_forever = reference[start : reference.index("</dd>", start)]
    assert "Cancellation" in serve_forever
    start = reference.index('id="trio_socketserver.BaseServer.shutdown"')
    assert "Thread safety" in reference[start : reference.index("</dd>", start)]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", page.read_text(), flags=re.M | re.S)


@pytest.mark.usefixtures("no_leaks")
@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_the_code_on_the_page_runs(page: str) -> None:
    path = DOCS / page if (DOCS / page).exists() else DOCS / "howto" / page
    blocks = python_blocks(path)
    assert blocks, f"{page} has no python code block"
    namespace: dict[str, object] = {"__name__": f"docs.{path.stem}"}
    for block in blocks:  # one namespace per page: later blocks build on earlier ones
        exec(compile(block, str(path), "exec"), namespace)

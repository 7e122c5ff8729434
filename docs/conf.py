# Sphinx configuration of the documentation site. Built offline and warning-free in the
# test run (tests/test_docs.py): no intersphinx, nothing fetched.
from __future__ import annotations

import importlib.metadata

project = "trio-socketserver"
release = importlib.metadata.version("trio-socketserver")
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # the docstrings' "Args:" / "Errors:" sections
    "sphinxcontrib_trio",  # marks async functions, context managers, nursery.start-ables
    "myst_parser",  # the Markdown pages
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
# Signatures come from the code itself; annotations are shown as written.
autodoc_typehints = "signature"
napoleon_custom_sections = [
    ("Cancellation", "notes_style"),
    ("Thread safety", "notes_style"),
    ("Resource handling", "notes_style"),
    ("Errors", "params_style"),  # "ExcType: when" entries, as trio's docs
]

html_theme = "furo"
html_title = "trio-socketserver"

# compat resolves its Forking* names on first use (so threading servers never load the
# worker pool); resolve them all now so that autodoc sees every name in compat.__all__.
from trio_socketserver import compat  # noqa: E402

for _name in compat.__all__:
    getattr(compat, _name)

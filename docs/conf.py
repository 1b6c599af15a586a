"""Sphinx configuration of the clairstat documentation (``make docs``).

The site follows the scientific-Python convention: numpydoc docstrings, an API reference
generated from them (autosummary), and a gallery of examples (sphinx-gallery) that are
executed on every build, so an example that stops working breaks the build.
"""

import os
import re
import sys
from pathlib import Path

# The theory-verifier guide and its example use the checkout's simulations/ and
# validation/ folders, which are not installed with the package (see the guide).
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Every example runs on one thread: small problems, and a build that others share.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import clairstat  # noqa: E402

project = "clairstat"
author = "the clairstat developers"
copyright = "2026, the clairstat developers"
release = clairstat.__version__
version = ".".join(release.split(".")[:2])
# The version to cite is the last release, as CITATION.cff says (not a development one).
_cff = ROOT / "CITATION.cff"
_cited = re.search(r"^version:\s*(\S+)", _cff.read_text(), re.M) if _cff.exists() else None
rst_epilog = f".. |cited_version| replace:: {_cited.group(1) if _cited else release}\n"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
templates_path = ["_templates"]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "auto_examples/*.ipynb",
                    "auto_examples/*.py", "auto_examples/*.zip"]
root_doc = "index"

# --- API reference -------------------------------------------------------------------
autosummary_generate = True
autodoc_typehints = "none"  # numpydoc's Parameters sections say the types
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True

# --- Markdown (docs/method_notes.md, CHANGELOG.md) -----------------------------------
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

# --- Gallery ------------------------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"\.py$",  # execute every example, not only plot_*.py
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "show_memory": False,
    "min_reported_time": 1,
    "reset_modules": ("matplotlib",),
}

# --- HTML ---------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"clairstat {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_static_path = []
html_show_sourcelink = False


def _skip_metadata_requests(app, what, name, obj, skip, options):
    """Leave out scikit-learn's generated ``set_*_request`` methods (metadata routing):
    their docstrings belong to scikit-learn and refer to its own glossary."""
    if name.startswith("set_") and name.endswith("_request"):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_metadata_requests)

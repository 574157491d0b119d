"""Sphinx configuration of the histoseq documentation.

Offline (``HISTOSEQ_DOCS_OFFLINE=1``, or when docs.python.org cannot be reached) the links to other projects'
documentation (intersphinx) are switched off, so that ``sphinx -W`` builds without a network.
"""

import os
import socket
from importlib.metadata import version as _version
from pathlib import Path

project = "histoseq"
author = "histoseq developers"
copyright = "2026, histoseq developers"
release = _version("histoseq")

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx_autodoc_typehints",
]
autosummary_generate = True
autodoc_member_order = "groupwise"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
# our Returns sections are prose (as scanpy's): rendered as written under a "Returns" heading, not parsed as types
napoleon_custom_sections = ["Returns"]
typehints_defaults = "braces"
myst_enable_extensions = ["colon_fence", "dollarmath"]
# the tutorials are committed without outputs; ``HISTOSEQ_DOCS_EXECUTE=1`` (CI) runs them while building, in a
# temporary folder (the files they write do not land in the repository)
nb_execution_mode = "force" if os.environ.get("HISTOSEQ_DOCS_EXECUTE", "").lower() in ("1", "true", "yes") else "off"
if nb_execution_mode != "off":
    # a non-interactive backend in the environment (CI sets MPLBACKEND=Agg) would keep the figures out of the pages
    os.environ.pop("MPLBACKEND", None)
nb_execution_in_temp = True
nb_execution_timeout = 900
nb_execution_raise_on_error = True
# tutorials on real data run only where their data are ($HISTOSEQ_DATA_DIR, or ../shared/data beside the clone, as
# in CI); elsewhere their pages are built from the notebooks as committed, without outputs
_REAL_DATA = {"tutorials/bulb.ipynb": "stutility_mob"}
_data_dir = Path(os.environ.get("HISTOSEQ_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data")).resolve()
nb_execution_excludepatterns = [nb for nb, folder in _REAL_DATA.items() if not (_data_dir / folder).is_dir()]
if nb_execution_mode != "off" and len(nb_execution_excludepatterns) < len(_REAL_DATA):
    os.environ["HISTOSEQ_DATA_DIR"] = str(_data_dir)  # absolute: the notebooks run in a temporary folder
# ".rst" first: autosummary writes the API pages (RST) with the first suffix, and myst would misread them as .md
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
html_theme = "sphinx_book_theme"
html_title = "histoseq"
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "squidpy": ("https://squidpy.readthedocs.io/en/stable/", None),
    "spatialdata": ("https://spatialdata.scverse.org/en/stable/", None),
    "torch": ("https://pytorch.org/docs/stable/", None),
}


def _online() -> bool:
    if os.environ.get("HISTOSEQ_DOCS_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("docs.python.org", 443), timeout=3).close()
    except OSError:
        return False
    return True


if not _online():
    intersphinx_mapping = {}

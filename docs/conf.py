"""Sphinx configuration of egd's documentation (``tox -e docs``: built with warnings as errors).

The diagrams are Graphviz sources in the pages (``.. graphviz::``), rendered by Debian's ``dot`` at build time
(``tests/services/install-graphviz.sh``). The configuration reference is generated from egd's config schema by
``_ext/configref.py``.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ext"))

from egd import __version__

project = "egd"
author = "the egd developers"
copyright = "the egd developers"
version = release = __version__

extensions = ["sphinx.ext.graphviz", "configref"]
graphviz_output_format = "svg"
graphviz_dot_args = ["-Gfontname=sans-serif", "-Nfontname=sans-serif", "-Efontname=sans-serif", "-Gfontsize=11",
                     "-Nfontsize=11", "-Efontsize=10"]

root_doc = "index"
exclude_patterns = ["_build", "_ext", "**/__pycache__"]
templates_path: list[str] = []
nitpicky = False
html_theme = "alabaster"
html_theme_options = {"page_width": "1100px", "sidebar_width": "240px", "fixed_sidebar": True}
html_title = f"egd {release}"
html_show_sourcelink = False

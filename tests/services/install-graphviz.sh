#!/bin/sh
# Install what the docs build (tox -e docs) needs besides Python packages: Graphviz's `dot`, which renders the
# network diagrams (sphinx.ext.graphviz) at build time.  Idempotent: when `dot` is there it exits at once
# without touching apt.  Must run as root otherwise.
set -eu
. "$(dirname "$0")/apt.sh"

missing=""
command -v dot >/dev/null 2>&1 || missing="graphviz"
# shellcheck disable=SC2086  # an empty list means nothing to install
install_missing install-graphviz "dot (graphviz) is" $missing

command -v dot >/dev/null 2>&1 || { echo "install-graphviz: dot still missing after apt-get" >&2; exit 1; }
echo "install-graphviz: done"

#!/bin/sh
# Install what the Toree tests (tests/test_toree.py) need, once: a Scala kernel, Apache Toree, and a Spark it
# supports, in a virtualenv of their own:
#   $CACHE/venv   pyspark 3.5.9 (Spark 3.5.9, Scala 2.12.18, Hadoop client 3.3.4) and toree 0.5.0 from PyPI
# CACHE is $EGD_TOREE_CACHE, by default ~/.cache/egd-toree/spark-3.5.9-toree-0.5.0.
#
# Why a separate Spark: Toree's newest release (0.5.0, its jar toree-assembly-0.5.0-incubating.jar) is built for
# Scala 2.12 / Spark 3.x, while the test environment's pyspark 4 is Scala 2.13, whose classes Toree cannot load.
# Never install this into the tox environment: its pyspark 4 is what the Spark kernels there run on.
#
# Idempotent: when the marker file holds the pins below it exits at once. The marker is written last, so an
# interrupted run is started over, never used half done.
#
# Needs python3 (3.8+, with venv) and network access to PyPI; Java 17 comes with tests/services/install-yarn.sh.
set -eu

PINS="pyspark==3.5.9 toree==0.5.0"
CACHE=${EGD_TOREE_CACHE:-$HOME/.cache/egd-toree/spark-3.5.9-toree-0.5.0}
MARKER="$CACHE/.complete"
PYTHON=${PYTHON:-python3}

if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$PINS" ] && [ -x "$CACHE/venv/bin/python" ]; then
    echo "install-toree: $CACHE is complete"
    exit 0
fi

mkdir -p "$CACHE"
rm -f "$MARKER"
rm -rf "$CACHE/venv"
echo "install-toree: installing $PINS into $CACHE/venv"
"$PYTHON" -m venv "$CACHE/venv"
# shellcheck disable=SC2086 # PINS is a list of requirements
"$CACHE/venv/bin/python" -m pip install --quiet --disable-pip-version-check $PINS
# What the tests use: Spark's own launcher script and Toree's jar (not the venv's Python).
site=$(echo "$CACHE"/venv/lib/python*/site-packages)
test -x "$site/pyspark/bin/spark-submit"
test -f "$site/toree/lib/toree-assembly-0.5.0-incubating.jar"
printf '%s' "$PINS" > "$MARKER"
echo "install-toree: done ($(du -sh "$CACHE" | cut -f1) in $CACHE)"

#!/bin/sh
# Install what the browser test (tests/test_browser.py) needs from Debian: the chromium browser, driven
# headless by Playwright (a Python package from the `test` extras) through executable_path, so that no
# browser is downloaded from Playwright's CDN.  Idempotent: when chromium is already there it exits at once
# without touching apt.  Must run as root to install.
set -eu
. "$(dirname "$0")/apt.sh"

CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ]; then
    echo "install-browser: $CHROMIUM is already installed"
    exit 0
fi

# Fonts are a dependency of chromium (fonts-liberation); without recommends the install stays ~100 MB smaller.
apt_install install-browser chromium

[ -x "$CHROMIUM" ] || { echo "install-browser: $CHROMIUM still missing after apt-get" >&2; exit 1; }
"$CHROMIUM" --version
echo "install-browser: done"

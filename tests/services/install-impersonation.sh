#!/bin/sh
# Install what the impersonation tests (tests/test_impersonation.py) need: a Python with ipykernel that users
# other than root can run.  The tests' own interpreter usually cannot be used for that (pyenv's lives under
# /root, mode 700), so the kernels of the test users run Debian's /usr/bin/python3 with python3-ipykernel;
# useradd/userdel (passwd) create and remove the test users.  Idempotent: when everything is already there it
# exits at once without touching apt.  Must run as root.
set -eu
. "$(dirname "$0")/apt.sh"

PYTHON=/usr/bin/python3

missing=""
command -v useradd >/dev/null 2>&1 || missing="$missing passwd"
if [ ! -x "$PYTHON" ] || ! "$PYTHON" -c 'import ipykernel_launcher' >/dev/null 2>&1; then
    missing="$missing python3-ipykernel"
fi
if [ -z "$missing" ]; then
    echo "install-impersonation: $PYTHON with ipykernel and useradd are already installed"
    exit 0
fi

# shellcheck disable=SC2086  # word splitting of the package list is intended
apt_install install-impersonation $missing

"$PYTHON" -c 'import ipykernel_launcher' || {
    echo "install-impersonation: $PYTHON still cannot import ipykernel after apt-get" >&2
    exit 1
}
echo "install-impersonation: done"

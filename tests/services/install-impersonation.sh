#!/bin/sh
# Install what the impersonation tests (tests/test_impersonation.py) need: a Python with ipykernel that users
# other than root can run.  The tests' own interpreter usually cannot be used for that (pyenv's lives under
# /root, mode 700), so the kernels of the test users run Debian's /usr/bin/python3 with python3-ipykernel;
# useradd/userdel (passwd) create and remove the test users.  Idempotent: when everything is already there it
# exits at once without touching apt.  Must run as root.
set -eu

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

if [ "$(id -u)" -ne 0 ]; then
    echo "install-impersonation: must run as root to install:$missing" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-impersonation: installing$missing"
apt-get update -qq
# shellcheck disable=SC2086  # word splitting of the package list is intended
apt-get install -y -qq --no-install-recommends $missing

"$PYTHON" -c 'import ipykernel_launcher' || {
    echo "install-impersonation: $PYTHON still cannot import ipykernel after apt-get" >&2
    exit 1
}
echo "install-impersonation: done"

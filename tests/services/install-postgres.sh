#!/bin/sh
# Install what the PostgreSQL tests (tests/pgserver.py) need: Debian's postgresql server binaries (initdb,
# postgres) and the postgres user. Idempotent: exits at once when they are there. The cluster itself is made
# and started by the fixture in a temporary directory, never as a system service.
#
# Debian's postinst would create and *start* a cluster on port 5432 through invoke-rc.d: a policy-rc.d that
# answers 101 prevents the start (removed again afterwards if this script created it).
set -eu
. "$(dirname "$0")/apt.sh"

if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && id postgres >/dev/null 2>&1; then
    echo "install-postgres: postgresql is already installed"
    exit 0
fi
need_root install-postgres postgresql
no_service_start install-postgres
apt_install install-postgres postgresql
echo "install-postgres: done"

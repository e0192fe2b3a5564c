# Shared by the install-*.sh scripts (sourced, not run): installing Debian packages as root with apt-get.

# need_root NAME PKG...: stop with a clear message unless this runs as root.
need_root() {
    name=$1
    shift
    if [ "$(id -u)" -ne 0 ]; then
        echo "$name: must run as root to install: $*" >&2
        exit 1
    fi
}

# apt_install NAME PKG...: install the packages (each once), without recommends and without questions.
apt_install() {
    name=$1
    shift
    need_root "$name" "$@"
    # shellcheck disable=SC2046  # word splitting of the sorted package list is intended
    set -- $(printf '%s\n' "$@" | sort -u)
    echo "$name: installing $*"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$@"
}

# no_service_start NAME: until this script exits, package scripts may not start services (the machine has no
# systemd, and postinsts would start daemons through invoke-rc.d: a policy-rc.d answering 101 forbids it).
# A policy-rc.d that already exists is left alone; one made here is removed at exit.
no_service_start() {
    [ -e /usr/sbin/policy-rc.d ] && return 0
    printf '#!/bin/sh\n# created by egd tests/services (%s): do not start services from apt\nexit 101\n' "$1" \
        > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
}

# install_missing NAME WHAT PKG...: the common middle of an install-*.sh that collected the packages it misses.
# With no PKG it says that WHAT is already there and exits the script (0), without touching apt; otherwise, as
# root and with services kept from starting (no_service_start), it installs the packages and returns, so that the
# script can check the result.
install_missing() {
    name=$1
    what=$2
    shift 2
    if [ $# -eq 0 ]; then
        echo "$name: $what already installed"
        exit 0
    fi
    need_root "$name" "$@"
    no_service_start "$name"
    apt_install "$name" "$@"
}

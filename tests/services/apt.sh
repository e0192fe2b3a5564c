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

#!/bin/sh
# Install the non-Python kernels of the any-kernel tests (tests/test_any_kernel.py) and register their
# kernelspecs where jupyter (and so egd) finds them, as a user would:
#   ir    IRkernel, Debian's r-cran-irkernel (R; its package registers /usr/share/jupyter/kernels/ir)
#   deno  Deno's built-in Jupyter kernel (Rust, not built on ipykernel), the npm package deno (the binary ships
#         inside the package) under $EGD_KERNELS_PREFIX, its kernelspec in /usr/local/share/jupyter/kernels/deno
# Idempotent: what is already there is left alone, and without anything to do it exits at once without touching
# apt or npm.  Must run as root to install.
set -eu
. "$(dirname "$0")/apt.sh"

DENO_VERSION=2.9.6
PREFIX=${EGD_KERNELS_PREFIX:-/usr/local/lib/egd-test-kernels}
SPECS=/usr/local/share/jupyter/kernels

# IRkernel: R, the IRkernel package and its kernelspec, all from Debian.
if [ -f /usr/share/jupyter/kernels/ir/kernel.json ] && command -v R >/dev/null 2>&1 \
        && R --slave -e 'library(IRkernel)' >/dev/null 2>&1; then
    echo "install-kernels: IRkernel is already installed"
else
    apt_install install-kernels r-cran-irkernel
    [ -f /usr/share/jupyter/kernels/ir/kernel.json ] || {
        echo "install-kernels: r-cran-irkernel did not register /usr/share/jupyter/kernels/ir" >&2
        exit 1
    }
fi

# Deno: its npm package, pinned; the binary is the one npm put in the platform package.
deno_binary() {
    for candidate in "$PREFIX/deno/node_modules/deno/deno" "$PREFIX"/deno/node_modules/@deno/*/deno; do
        if [ -x "$candidate" ] && "$candidate" --version 2>/dev/null | grep -q "^deno $DENO_VERSION "; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}
if DENO=$(deno_binary); then
    echo "install-kernels: deno $DENO_VERSION is already installed ($DENO)"
else
    need_root install-kernels "deno@$DENO_VERSION"
    command -v npm >/dev/null 2>&1 || apt_install install-kernels npm
    mkdir -p "$PREFIX/deno"
    echo "install-kernels: installing deno@$DENO_VERSION from npm into $PREFIX/deno"
    npm install --no-audit --no-fund --no-save --prefix "$PREFIX/deno" "deno@$DENO_VERSION"
    DENO=$(deno_binary) || { echo "install-kernels: no working deno binary under $PREFIX/deno" >&2; exit 1; }
fi
# The kernelspec `deno jupyter --install` would write, with the binary's absolute path; rewritten only when it
# differs, so a run that has nothing to do changes no file.
spec=$(printf '{"argv": ["%s", "jupyter", "--kernel", "--conn", "{connection_file}"], "display_name": "Deno", "language": "typescript", "interrupt_mode": "message", "metadata": {"egd_test_kernel": "install-kernels.sh"}}\n' "$DENO")
if [ "$(cat "$SPECS/deno/kernel.json" 2>/dev/null || true)" != "$spec" ]; then
    need_root install-kernels "the deno kernelspec"
    mkdir -p "$SPECS/deno"
    printf '%s\n' "$spec" > "$SPECS/deno/kernel.json"
    echo "install-kernels: registered $SPECS/deno"
fi
echo "install-kernels: done"

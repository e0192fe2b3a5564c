#!/bin/bash
# Build the two container images the docker and kubernetes driver tests run (recipe
# /work/shared/k8s-container-recipe.md §2.3 and §3.6) and cache them as docker-archive tars:
#
#   $CACHE/images/<key>/kernel-img.tar   image localhost/egd-kernel:test: debootstrap --variant=minbase of this
#                                        machine's Debian suite + python3-ipykernel tini, CMD ["python3"]
#   $CACHE/images/<key>/pause-img.tar    image localhost/pause:egd: a static pause binary (the pod sandbox)
#
# CACHE is ${EGD_K8S_CACHE:-~/.cache/egd-k8s}; <key> is the suite, the package list and IMAGES_VERSION below,
# so a change to any of them builds anew. Prints the two tar paths, one per line, kernel first (all other
# output goes to stderr). Idempotent: a complete cache entry is printed without building anything.
#
# Builds with podman whose storage, run and network dirs live in a temporary directory (never
# /var/lib/containers, /run/containers...). Installs debootstrap podman runc gcc libc6-dev if missing (with a
# policy-rc.d so that no service starts). Must run as root. About 1.5 min on 2 cores; the tars are ~300 MB.
set -euo pipefail

# Bump when the way the images are built changes (keys the cache together with the suite and the packages).
IMAGES_VERSION=1
# python3-pycryptodome and python-is-python3: what Enterprise Gateway's launcher (in EG's kernel images) needs.
KERNEL_PACKAGES="python3-ipykernel tini python3-pycryptodome python-is-python3"
KERNEL_IMAGE=localhost/egd-kernel:test
PAUSE_IMAGE=localhost/pause:egd

HERE=$(cd "$(dirname "$0")" && pwd)
log() { echo "build-images: $*" >&2; }
die() { log "$*"; exit 1; }

SUITE=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ -n "$SUITE" ] || die "no VERSION_CODENAME in /etc/os-release: cannot tell which Debian suite to bootstrap"
PKG_HASH=$(printf '%s\n' $KERNEL_PACKAGES | sort -u | sha256sum | cut -c1-12)
KEY="$SUITE-v$IMAGES_VERSION-$PKG_HASH"
CACHE=${EGD_K8S_CACHE:-$HOME/.cache/egd-k8s}
OUT=$CACHE/images/$KEY
KERNEL_TAR=$OUT/kernel-img.tar
PAUSE_TAR=$OUT/pause-img.tar

done_already() { [ -s "$KERNEL_TAR" ] && [ -s "$PAUSE_TAR" ] && [ -e "$OUT/complete" ]; }

if done_already; then
    log "cached: $OUT"
    printf '%s\n%s\n' "$KERNEL_TAR" "$PAUSE_TAR"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, chroot, podman)"
mkdir -p "$CACHE/images"
# One build at a time per cache (a second caller waits, then finds the cache filled).
exec 9> "$CACHE/images/.lock"
flock 9
if done_already; then
    log "cached (built by a concurrent run): $OUT"
    printf '%s\n%s\n' "$KERNEL_TAR" "$PAUSE_TAR"
    exit 0
fi

# --- tools ------------------------------------------------------------------------------------------------------
missing=""
command -v debootstrap >/dev/null 2>&1 || missing="$missing debootstrap"
command -v podman >/dev/null 2>&1 || missing="$missing podman"
command -v runc >/dev/null 2>&1 || missing="$missing runc"
command -v gcc >/dev/null 2>&1 || missing="$missing gcc"
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || [ -n "$(find /usr/lib -name libc.a -print -quit 2>/dev/null)" ] \
    || missing="$missing libc6-dev"
if [ -n "$missing" ]; then
    # apt.sh is POSIX sh, sourced here for need_root/apt_install/no_service_start
    # shellcheck source=tests/services/apt.sh
    . "$HERE/apt.sh"
    RCD_NEW=0; [ -e /usr/sbin/policy-rc.d ] || RCD_NEW=1
    no_service_start build-images
    # shellcheck disable=SC2086  # word splitting of the package list is intended
    apt_install build-images $missing >&2
    # no_service_start's EXIT trap would be replaced by ours below: remove its policy-rc.d now
    if [ $RCD_NEW = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
    trap - EXIT
fi

# --- scratch: podman storage, rootfs, build logs ----------------------------------------------------------------
# short paths: podman refuses a runroot longer than 50 characters
WORK=$(mktemp -d /tmp/egdimg.XXXXXX)
P=$WORK/p
IMG=$WORK/image
# podman load/save/import write their blob-info cache to /var/lib/containers/cache whatever the configuration:
# removed again at exit unless it existed (and /var/lib/containers with it, when that is new and then empty)
HAD_VLC=0; [ -e /var/lib/containers ] && HAD_VLC=1
HAD_CACHE=0; [ -e /var/lib/containers/cache ] && HAD_CACHE=1

cleanup() {
    local rc=$? m p
    set +e  # best effort: every step runs (an empty grep must not end the trap)
    # debootstrap mounts proc/sys in the target; overlay layers may still be mounted: deepest first
    findmnt -rn -o TARGET | grep "^$WORK/" | sort -r | while read -r m; do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
    rm -rf "$WORK" "$OUT.tmp"
    [ $HAD_CACHE = 1 ] || rm -rf /var/lib/containers/cache
    [ $HAD_VLC = 1 ] || rmdir /var/lib/containers 2>/dev/null
    [ $rc -eq 0 ] || log "FAILED (exit $rc)"
    exit $rc
}
trap cleanup EXIT

mkdir -p "$P/storage" "$P/run" "$P/networks" "$IMG/pause/rootfs" "$OUT.tmp"
NOFILE=$(ulimit -Hn); NPROC=$(ulimit -Hu)
[ "$NOFILE" = unlimited ] && NOFILE=1048576
{ [ "$NPROC" = unlimited ] || [ "$NPROC" -gt 32768 ]; } && NPROC=32768
export CONTAINERS_CONF=$P/containers.conf CONTAINERS_STORAGE_CONF=$P/storage.conf
cat > "$CONTAINERS_CONF" <<CONF
[containers]
default_ulimits = ["nofile=$NOFILE:$NOFILE", "nproc=$NPROC:$NPROC"]
[engine]
runtime = "runc"
tmp_dir = "$P/run/libpod"
static_dir = "$P/storage/libpod"
volume_path = "$P/storage/volumes"
[network]
network_config_dir = "$P/networks"
CONF
cat > "$CONTAINERS_STORAGE_CONF" <<CONF
[storage]
driver = "overlay"
runroot = "$P/run/st"
graphroot = "$P/storage"
CONF
podman_() { podman --root "$P/storage" --runroot "$P/run/st" "$@"; }

# --- kernel image (§2.3) ----------------------------------------------------------------------------------------
# The mirror comes from apt's own configuration (one-line or deb822 sources), never a fixed URL.
MIRROR=$(apt-get indextargets --format '$(RELEASE) $(REPO_URI)' | awk -v s="$SUITE" '$1==s {print $2; exit}')
[ -n "$MIRROR" ] || die "no mirror for suite $SUITE in apt's sources (apt-get indextargets)"
t0=$(date +%s)
log "debootstrap --variant=minbase $SUITE from $MIRROR (log $IMG/debootstrap.log)"
if ! debootstrap --variant=minbase "$SUITE" "$IMG/rootfs" "$MIRROR" > "$IMG/debootstrap.log" 2>&1; then
    tail -n 40 "$IMG/debootstrap.log" >&2
    die "debootstrap failed"
fi
t1=$(date +%s)
log "chroot apt-get install $KERNEL_PACKAGES"
# debootstrap's package lists suffice; "E: Can not write log (Is /dev/pts mounted?)" is harmless
# shellcheck disable=SC2086
if ! DEBIAN_FRONTEND=noninteractive chroot "$IMG/rootfs" apt-get install -y --no-install-recommends \
        $KERNEL_PACKAGES > "$IMG/chroot-install.log" 2>&1; then
    tail -n 40 "$IMG/chroot-install.log" >&2
    die "apt-get install in the chroot failed"
fi
chroot "$IMG/rootfs" apt-get clean
chroot "$IMG/rootfs" python3 -c 'import ipykernel' || die "ipykernel does not import in the image"
rm -rf "$IMG/rootfs/var/lib/apt/lists/"* "$IMG/rootfs/etc/resolv.conf"
t2=$(date +%s)
tar -C "$IMG/rootfs" -cf "$IMG/kernel-rootfs.tar" .
rm -rf "$IMG/rootfs"
podman_ import --change 'CMD ["python3"]' "$IMG/kernel-rootfs.tar" "$KERNEL_IMAGE" >&2
rm -f "$IMG/kernel-rootfs.tar"
podman_ save --format docker-archive -o "$OUT.tmp/kernel-img.tar" "$KERNEL_IMAGE" >&2
t3=$(date +%s)

# --- pause image (§3.6) -----------------------------------------------------------------------------------------
cat > "$IMG/pause/pause.c" <<'EOF'
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
static void sigdown(int s){ (void)s; exit(0); }
static void sigreap(int s){ (void)s; while (waitpid(-1, NULL, WNOHANG) > 0); }
int main(void){
  struct sigaction a = {0}; a.sa_handler = sigdown; sigaction(SIGINT,&a,NULL); sigaction(SIGTERM,&a,NULL);
  struct sigaction r = {0}; r.sa_handler = sigreap; r.sa_flags = SA_NOCLDSTOP; sigaction(SIGCHLD,&r,NULL);
  for(;;) pause();
}
EOF
gcc -O2 -static -s -o "$IMG/pause/rootfs/pause" "$IMG/pause/pause.c"
tar -C "$IMG/pause/rootfs" -cf "$IMG/pause/pause.tar" .
podman_ import --change 'ENTRYPOINT ["/pause"]' "$IMG/pause/pause.tar" "$PAUSE_IMAGE" >&2
podman_ save --format docker-archive -o "$OUT.tmp/pause-img.tar" "$PAUSE_IMAGE" >&2
t4=$(date +%s)

# podman unmounts its layers on exit; drop the storage before the trap removes the directory
podman_ rmi -a -f >/dev/null 2>&1 || true
printf 'suite=%s mirror=%s packages=%s version=%s built=%s\n' "$SUITE" "$MIRROR" "$KERNEL_PACKAGES" \
    "$IMAGES_VERSION" "$(date -u +%FT%TZ)" > "$OUT.tmp/complete"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
log "built $OUT: debootstrap $((t1 - t0)) s, chroot install $((t2 - t1)) s, import+save $((t3 - t2)) s," \
    "pause $((t4 - t3)) s; $(du -sh "$OUT" | cut -f1)"
printf '%s\n%s\n' "$KERNEL_TAR" "$PAUSE_TAR"

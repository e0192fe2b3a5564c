#!/bin/sh
# Install the container engines the docker-driver tests (tests/containerhosts.py) start themselves:
# docker.io (dockerd, docker-init), podman (+ netavark, aardvark-dns, catatonit, conmon, iptables), runc, tini,
# and nftables (`nft`, which tests/hoststate.py uses to drop firewall tables the engines created). Idempotent: when
# everything is already there it exits at once without touching apt. Must run as root.
# Recipe: /work/shared/k8s-container-recipe.md §2.1.
#
# No service is started: the machine has no systemd, and docker.io's postinst would start dockerd through
# invoke-rc.d; a policy-rc.d answering 101 ("action forbidden") prevents that (created here only if absent,
# removed again at exit). podman ships only systemd units. runc is not pulled in by podman, and podman's default
# runtime crun does not work with hybrid cgroups (recipe pitfall 3), so the fixtures configure runc.
set -eu
. "$(dirname "$0")/apt.sh"

need() { command -v "$1" >/dev/null 2>&1 || [ -x "$1" ]; }

missing=""
need /usr/sbin/dockerd || missing="$missing docker.io"
need docker || missing="$missing docker.io"
need podman || missing="$missing podman"
need /usr/sbin/runc || need runc || missing="$missing runc"
need tini || need /usr/bin/tini || missing="$missing tini"
need /usr/sbin/nft || missing="$missing nftables"
need /usr/sbin/iptables-save || missing="$missing iptables"
need /usr/lib/podman/netavark || missing="$missing netavark aardvark-dns"
need /usr/libexec/podman/catatonit || missing="$missing catatonit"
if [ -z "$missing" ]; then
    echo "install-containers: dockerd, podman, runc, tini and nft are already installed"
    exit 0
fi

# shellcheck disable=SC2086  # word splitting of the package list is intended
need_root install-containers $missing

no_service_start install-containers

# podman's network stack: netavark + aardvark-dns (its Recommends, which the recipe ran with; without them podman
# 4.3 falls back to the CNI plugins), catatonit for `--init`. Everything without further recommends.
case " $missing " in
    *" podman "*) missing="$missing netavark aardvark-dns catatonit" ;;
esac
# shellcheck disable=SC2086
apt_install install-containers $missing

for b in /usr/sbin/dockerd podman runc tini /usr/sbin/nft /usr/lib/podman/netavark /usr/libexec/podman/catatonit; do
    need "$b" || { echo "install-containers: $b still missing after apt-get" >&2; exit 1; }
done
echo "install-containers: done"

#!/bin/sh
# Install what the Kubernetes test cluster (tests/kubecluster.py) needs, once, as root:
#   Debian packages  containerd runc, iptables nftables (the kubelet's firewall rules, and their removal), the CNI
#                    plugins (containernetworking-plugins: bridge, host-local, portmap under /usr/lib/cni), openssl
#                    (certificates), gcc libc6-dev (the static pause binary of the sandbox image), and golang-go
#                    only when no `go` is on PATH (build-kubernetes.sh fetches the newer toolchain it needs).
#   Kubernetes       etcd, kube-apiserver, -controller-manager, -scheduler, kubelet and kwok built from the Go
#                    module proxy by build-kubernetes.sh into a cache keyed by their versions (~7 min once).
# Idempotent: exits at once when everything is there.  Prints the bin directory on its last line.
set -eu
. "$(dirname "$0")/apt.sh"
HERE=$(cd "$(dirname "$0")" && pwd)

# /usr/local/go/bin is where a Go from go.dev lives; use it before installing Debian's.
case ":$PATH:" in *:/usr/local/go/bin:*) ;; *) [ -x /usr/local/go/bin/go ] && PATH=$PATH:/usr/local/go/bin ;; esac
export PATH

missing=""
command -v containerd >/dev/null || missing="$missing containerd"
command -v ctr >/dev/null || missing="$missing containerd"
command -v runc >/dev/null || missing="$missing runc"
command -v iptables >/dev/null || missing="$missing iptables"
# nft: the fixture deletes the firewall tables the kubelet created (iptables alone cannot drop a table)
command -v nft >/dev/null || missing="$missing nftables"
command -v openssl >/dev/null || missing="$missing openssl"
[ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] && [ -x /usr/lib/cni/portmap ] \
    || missing="$missing containernetworking-plugins"
command -v gcc >/dev/null || missing="$missing gcc libc6-dev"
[ -e /usr/include/stdio.h ] || missing="$missing libc6-dev"
command -v go >/dev/null || missing="$missing golang-go"
if [ -n "$missing" ]; then
    # containerd ships a systemd unit only, but keep every postinst from starting a daemon on this machine
    no_service_start install-kubernetes
    # shellcheck disable=SC2086  # one word per package
    apt_install install-kubernetes $missing
fi

# not exec: the EXIT trap of no_service_start must still remove its policy-rc.d
bash "$HERE/build-kubernetes.sh"

#!/bin/sh
# Install what the ssh test hosts (tests/sshhosts.py) need: openssh-server (sshd), the ssh client and
# ssh-keygen, iproute2 (`ip netns`) and util-linux (unshare).  Idempotent: when everything is already
# there it exits at once without touching apt.  Must run as root.
#
# The machine has no systemd, and Debian's postinst would otherwise *start* sshd on 0.0.0.0:22 through
# invoke-rc.d: a policy-rc.d that answers 101 ("action forbidden") prevents that.  If this script had to
# create it, it removes it again afterwards; an existing one is left alone.
set -eu
. "$(dirname "$0")/apt.sh"

need() { command -v "$1" >/dev/null 2>&1 || [ -x "$1" ]; }

missing=""
need /usr/sbin/sshd || missing="$missing openssh-server"
need ssh || missing="$missing openssh-client"
need ssh-keygen || missing="$missing openssh-client"
need ip || missing="$missing iproute2"
need unshare || missing="$missing util-linux"
# shellcheck disable=SC2086  # word splitting of the package list is intended
install_missing install-ssh "sshd, ssh, ssh-keygen, ip and unshare are" $missing

need /usr/sbin/sshd || { echo "install-ssh: /usr/sbin/sshd still missing after apt-get" >&2; exit 1; }
# /run/sshd is sshd's privilege-separation directory; systemd would create it.
mkdir -p /run/sshd
chmod 755 /run/sshd
echo "install-ssh: done"

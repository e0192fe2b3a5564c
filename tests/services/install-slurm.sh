#!/bin/sh
# Install what the Slurm test cluster (tests/slurmcluster.py) needs, from Debian bookworm's packages:
# slurm-wlm (slurmctld, slurmd, sbatch/squeue/scancel/scontrol), slurmrestd, munge, slurm-wlm-jwt-plugin
# (auth_jwt.so is not in slurm-wlm-basic-plugins), python3-ipykernel (jobs run /usr/bin/python3 -m
# ipykernel_launcher as test users, who cannot read a virtualenv under /root), passwd (useradd/userdel),
# iproute2 (`ip netns`) and util-linux (nsenter, unshare, setpriv).  Idempotent: when everything is already
# there it exits at once without touching apt.  Must run as root.
#
# The machine has no systemd, and Debian's postinsts would otherwise *start* munged, slurmctld and slurmd through
# invoke-rc.d: a policy-rc.d that answers 101 ("action forbidden") prevents that.  If this script had to create
# it, it removes it again afterwards; an existing one is left alone.
set -eu
. "$(dirname "$0")/apt.sh"

need() { command -v "$1" >/dev/null 2>&1 || [ -e "$1" ]; }

missing=""
need /usr/sbin/slurmctld || missing="$missing slurm-wlm"
need /usr/sbin/slurmd || missing="$missing slurm-wlm"
need /usr/bin/sbatch || missing="$missing slurm-wlm"
need /usr/sbin/slurmrestd || missing="$missing slurmrestd"
need /usr/sbin/munged || missing="$missing munge"
need /usr/sbin/mungekey || missing="$missing munge"
# shellcheck disable=SC2144  # one multiarch directory at most
ls /usr/lib/*/slurm-wlm/auth_jwt.so >/dev/null 2>&1 || missing="$missing slurm-wlm-jwt-plugin"
/usr/bin/python3 -c 'import ipykernel' >/dev/null 2>&1 || missing="$missing python3-ipykernel"
need useradd || missing="$missing passwd"
need ip || missing="$missing iproute2"
need nsenter || missing="$missing util-linux"
need setpriv || missing="$missing util-linux"
# shellcheck disable=SC2086  # word splitting of the package list is intended
install_missing install-slurm "slurm-wlm, slurmrestd, munge, the jwt plugin and python3-ipykernel are" $missing

for f in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/sbin/slurmrestd /usr/sbin/munged; do
    need "$f" || { echo "install-slurm: $f still missing after apt-get" >&2; exit 1; }
done
echo "install-slurm: done"

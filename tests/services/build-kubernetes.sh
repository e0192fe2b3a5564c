#!/bin/bash
# Build the Kubernetes parts of the kubernetes-driver tests from the Go module proxy, once, into a cache directory
# keyed by every pinned version: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kwok
# (simulated nodes), plus kwok's fast stage file.  About 7 minutes on 2 cores from a clean Go cache; nothing to do
# when the cache is complete.  Prints the bin directory on its last line.
#   EGD_K8S_CACHE  the cache root (default ~/.cache/egd-k8s)
# Needs a Go toolchain on PATH (go >= 1.22; GOTOOLCHAIN=auto fetches the newer one etcd and kwok ask for).
set -euo pipefail

K8S=v1.30.14 STG=v0.30.14 ETCD=v3.5.36 KWOK=v0.8.0
CACHE=${EGD_K8S_CACHE:-$HOME/.cache/egd-k8s}
OUT=$CACHE/k8s-$K8S-etcd-$ETCD-kwok-$KWOK/bin
PARTS="etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kwok kwok-stages.yaml"

complete() {
    for part in $PARTS; do [ -s "$OUT/$part" ] || return 1; done
    "$OUT/kube-apiserver" --version 2>/dev/null | grep -qx "Kubernetes $K8S"
}
if complete; then
    echo "$OUT"
    exit 0
fi
command -v go >/dev/null || { echo "build-kubernetes: no Go toolchain on PATH (apt-get install golang-go)" >&2; exit 1; }

W=$CACHE/build
export GOMODCACHE=$CACHE/go/mod GOCACHE=$CACHE/go/build GOPATH=$CACHE/go/path
export GOFLAGS="-mod=mod -buildvcs=false" GOTOOLCHAIN=auto
mkdir -p "$OUT.partial"
ts() { echo "build-kubernetes [$(date +%T)] $*" >&2; }
ts "start ($(go version))"

if [ ! -s "$OUT.partial/etcd" ]; then
    mkdir -p "$W/etcdmod" && cd "$W/etcdmod"
    printf 'module ci/etcd\n\ngo 1.22\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD" > go.mod
    printf '//go:build tools\npackage tools\nimport _ "go.etcd.io/etcd/server/v3"\n' > tools.go
    go mod tidy >&2
    go build -p 2 -trimpath -ldflags='-s -w' -o "$OUT.partial/etcd" go.etcd.io/etcd/server/v3 >&2
    ts "etcd done"
fi

mkdir -p "$W/k8smod" && cd "$W/k8smod"
go mod download -json "k8s.io/kubernetes@$K8S" > /dev/null
MOD=$GOMODCACHE/cache/download/k8s.io/kubernetes/@v/$K8S.mod
# k8s.io/kubernetes replaces its staging modules with ./staging paths: point them at the published tags.
{
    printf 'module ci/k8s\n\ngo 1.22.0\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$K8S"
    grep '=> ./staging' "$MOD" | awk -v v="$STG" '{print "\t"$1" => "$1" "v}'
    echo ')'
} > go.mod
printf '//go:build tools\npackage tools\nimport (\n _ "k8s.io/kubernetes/cmd/kube-apiserver"\n _ "k8s.io/kubernetes/cmd/kube-controller-manager"\n _ "k8s.io/kubernetes/cmd/kube-scheduler"\n _ "k8s.io/kubernetes/cmd/kubelet"\n)\n' > tools.go
go mod tidy >&2
LD="-s -w -X k8s.io/component-base/version.gitVersion=$K8S -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=30"
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubelet; do
    [ -s "$OUT.partial/$cmd" ] && continue
    go build -p 2 -trimpath -ldflags="$LD" -o "$OUT.partial/$cmd" "k8s.io/kubernetes/cmd/$cmd" >&2
    ts "$cmd done"
done

if [ ! -s "$OUT.partial/kwok" ]; then
    GOBIN=$OUT.partial go install -trimpath -ldflags='-s -w' "sigs.k8s.io/kwok/cmd/kwok@$KWOK" >&2
    ts "kwok done"
fi
STAGES=$GOMODCACHE/sigs.k8s.io/kwok@$KWOK/kustomize/stage
for stage in node/fast/node-initialize node/heartbeat/node-heartbeat pod/fast/pod-complete pod/fast/pod-delete \
        pod/fast/pod-ready; do
    echo '---'
    cat "$STAGES/$stage.yaml"
done > "$OUT.partial/kwok-stages.yaml"

rm -rf "$OUT"
mv "$OUT.partial" "$OUT"
# The Go caches are only needed to build again; the binaries are what the tests use.
chmod -R u+w "$CACHE/go" "$W" 2>/dev/null || true
rm -rf "$CACHE/go" "$W"
complete || { echo "build-kubernetes: $OUT is incomplete after the build" >&2; exit 1; }
ts "done"
echo "$OUT"

#!/bin/sh
# Fetch what the YARN test cluster (tests/yarncluster.py) needs from Maven Central, once:
#   $CACHE/lib     the classpath of tests/yarn/MiniYarn.java: an unshaded Hadoop 3.4.1 MiniYARNCluster
#                  (tests/yarn/pom.xml)
#   $CACHE/lib-ds  the classpath of the DistributedShell ApplicationMaster (tests/yarn/pom-ds.xml)
# CACHE is $EGD_YARN_CACHE, by default ~/.cache/egd-yarn/3.4.1.  Idempotent: when the cache was completed from the
# same two poms (the marker file holds their checksum) it exits at once without running Maven.  Each directory is
# filled beside its final place and moved in only when complete, so an interrupted run leaves no half cache.
#
# Also makes sure this host's name resolves to a loopback address: the NodeManager binds and registers under
# `hostname` (hard-coded in MiniYARNCluster), and everything here must stay on loopback.  As root it appends
# "127.0.0.1 <hostname>" to /etc/hosts when needed; otherwise it fails.
#
# Needs java (17) and mvn (3.8+); as root it installs them with apt-get when they are missing.
set -eu
. "$(dirname "$0")/apt.sh"

HERE=$(cd "$(dirname "$0")/../yarn" && pwd)
CACHE=${EGD_YARN_CACHE:-$HOME/.cache/egd-yarn/3.4.1}
MDP=org.apache.maven.plugins:maven-dependency-plugin:3.8.1
MARKER="$CACHE/.complete"

# --- loopback name resolution -------------------------------------------------------------------------------
host=$(hostname)
for name in "$host" localhost; do
    addr=$(getent ahostsv4 "$name" 2>/dev/null | awk 'NR == 1 { print $1 }')
    case "$addr" in
        127.*) ;;
        *)
            if [ "$(id -u)" -ne 0 ]; then
                echo "install-yarn: '$name' resolves to '${addr:-nothing}', not to 127.x; add '127.0.0.1 $name' to /etc/hosts" >&2
                exit 1
            fi
            echo "install-yarn: '$name' resolved to '${addr:-nothing}': adding '127.0.0.1 $name' to /etc/hosts"
            printf '127.0.0.1 %s\n' "$name" >> /etc/hosts
            ;;
    esac
done

# --- Java (the cluster runs on it) and Maven (fetches its jars) ---------------------------------------------------
if ! command -v java >/dev/null 2>&1 && [ -z "${JAVA_HOME:-}" ]; then
    apt_install install-yarn openjdk-17-jdk-headless
fi

# --- the jars ------------------------------------------------------------------------------------------------
sum=$(cat "$HERE/pom.xml" "$HERE/pom-ds.xml" | sha256sum | cut -d' ' -f1)
if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$sum" ] && [ -d "$CACHE/lib" ] && [ -d "$CACHE/lib-ds" ]; then
    echo "install-yarn: $CACHE is complete"
    exit 0
fi

command -v mvn >/dev/null 2>&1 || apt_install install-yarn maven
mkdir -p "$CACHE"
rm -f "$MARKER"
fetch() {  # fetch POM DIR: copy the runtime closure of POM into $CACHE/DIR
    tmp="$CACHE/$2.partial"
    rm -rf "$tmp"
    echo "install-yarn: fetching the closure of $1 into $CACHE/$2"
    mvn -B -q -f "$HERE/$1" "$MDP:copy-dependencies" -DincludeScope=runtime -DoutputDirectory="$tmp"
    rm -rf "$CACHE/$2"
    mv "$tmp" "$CACHE/$2"
}
fetch pom.xml lib
fetch pom-ds.xml lib-ds
[ -f "$CACHE/lib/hadoop-yarn-server-tests-3.4.1-tests.jar" ] || {
    echo "install-yarn: $CACHE/lib has no hadoop-yarn-server-tests-3.4.1-tests.jar (MiniYARNCluster)" >&2; exit 1; }
ls "$CACHE"/lib-ds/hadoop-yarn-applications-distributedshell-*.jar >/dev/null 2>&1 || {
    echo "install-yarn: $CACHE/lib-ds has no DistributedShell jar" >&2; exit 1; }
printf '%s\n' "$sum" > "$MARKER"
echo "install-yarn: done ($(du -sh "$CACHE" | cut -f1) in $CACHE)"

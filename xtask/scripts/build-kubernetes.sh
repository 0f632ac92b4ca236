#!/usr/bin/env bash
# Builds the kube-apiserver the Kubernetes integration tests run against, from
# Debian's `kubernetes` source package (v1.20.2) with Debian's Go 1.19, and
# installs etcd from Debian. The binary is cached in $1 (the build takes ~8
# minutes on 2 cores), so it is built once per machine, not once per CI run.
set -euo pipefail
dest="$1"
if [[ -x "$dest/kube-apiserver" ]] && command -v etcd >/dev/null; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! grep -rqs "deb-src" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  cat > /etc/apt/sources.list.d/llm-egress-deb-src.sources <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
apt-get update -qq
apt-get install -y -qq golang-1.19 rsync etcd-server dpkg-dev golang-github-modern-go-reflect2-dev >/dev/null
# Debian starts etcd as a service on install; the tests run their own.
(systemctl disable --now etcd 2>/dev/null || service etcd stop 2>/dev/null || pkill -x etcd) || true
if [[ -x "$dest/kube-apiserver" ]]; then
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get source -qq kubernetes >/dev/null
cd kubernetes-*/
# Kubernetes 1.20 vendors reflect2 1.0.1, whose map iteration crashes the
# API server (SIGSEGV in mapiterinit) when built with Go >= 1.18; Debian's
# reflect2 1.0.2 is the upstream fix.
rm -rf vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
sed -i 's|github.com/modern-go/reflect2 v1.0.1|github.com/modern-go/reflect2 v1.0.2|g' go.mod vendor/modules.txt
export PATH="/usr/lib/go-1.19/bin:$PATH" GOFLAGS=-mod=vendor GOCACHE="$work/gocache" GOPATH="$work/gopath"
make WHAT=cmd/kube-apiserver >/dev/null
mkdir -p "$dest"
install -m 0755 _output/bin/kube-apiserver "$dest/kube-apiserver.tmp"
mv "$dest/kube-apiserver.tmp" "$dest/kube-apiserver"
echo "built $dest/kube-apiserver"

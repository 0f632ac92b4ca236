#!/usr/bin/env bash
# Builds Kubernetes v1.20.2 components from Debian's `kubernetes` source
# package with Debian's Go 1.19, and installs etcd from Debian. Usage:
#   build-kubernetes.sh DEST COMPONENT...   (e.g. kube-apiserver kubelet)
# Each binary is cached in DEST, so the source is fetched and built once per
# machine, only for the components still missing (kube-apiserver ~8 min on 2
# cores; kubelet, kube-proxy, kube-controller-manager and kube-scheduler
# together ~9 min more).
set -euo pipefail
dest="$1"; shift
missing=()
for component in "$@"; do
  [[ -x "$dest/$component" ]] || missing+=("$component")
done
if [[ ${#missing[@]} -eq 0 ]] && command -v etcd >/dev/null; then
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
if [[ ${#missing[@]} -eq 0 ]]; then
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
mkdir -p "$dest"
what=()
for component in "${missing[@]}"; do
  if [[ "$component" == pause ]]; then
    # The sandbox image's one binary, from the same source.
    gcc -Os -static -o "$dest/pause.tmp" build/pause/linux/pause.c
    mv "$dest/pause.tmp" "$dest/pause"
    echo "built $dest/pause"
  else
    what+=("cmd/$component")
  fi
done
if [[ ${#what[@]} -eq 0 ]]; then
  exit 0
fi
echo "building ${what[*]} (Kubernetes v1.20.2) into $dest"
make WHAT="${what[*]}" >/dev/null
for component in "${missing[@]}"; do
  [[ "$component" == pause ]] && continue
  install -m 0755 "_output/bin/$component" "$dest/$component.tmp"
  mv "$dest/$component.tmp" "$dest/$component"
  echo "built $dest/$component"
done

#!/usr/bin/env bash
# Builds the images the node fixture runs, without a registry or a Docker
# engine: a rootfs per image, made an OCI image with umoci, written as a
# docker-archive with skopeo (node.sh imports them into containerd).
#   node-images.sh OUT STATIC_BIN_DIR PAUSE_BINARY
# The agent, gateway and test-provider images hold what the final stages of
# deploy/docker/*.Dockerfile hold: one static binary (and the CA roots).
# Binaries are stripped (debug builds carry ~200 MB of debug info).
# The test client is busybox with curl, like the curl image the kind test uses.
set -euo pipefail
out="$1" bin="$2" pause="$3"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# NAME:TAG ENTRYPOINT USER, then a function that fills $rootfs.
image() {
  local ref="$1" entrypoint="$2" user="$3" fill="$4"
  local name="${ref%%:*}" oci="$work/oci-${ref//[\/:]/-}" bundle="$work/bundle-${ref//[\/:]/-}"
  umoci init --layout "$oci"
  umoci new --image "$oci:img"
  umoci unpack --image "$oci:img" "$bundle" >/dev/null
  rootfs="$bundle/rootfs"
  "$fill"
  umoci repack --image "$oci:img" "$bundle"
  local args=(--image "$oci:img" --config.user "$user")
  [[ -n "$entrypoint" ]] && args+=(--config.entrypoint "$entrypoint")
  umoci config "${args[@]}"
  rm -f "$out/${name##*/}.tar"
  skopeo copy -q "oci:$oci:img" "docker-archive:$out/${name##*/}.tar:$ref"
  echo "image $ref -> $out/${name##*/}.tar"
}

certs() { mkdir -p "$rootfs/etc/ssl/certs"; cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"; }
fill_pause() { install -m 0755 "$pause" "$rootfs/pause"; }
fill_agent() { install -s -m 0755 "$bin/llm-egress-agent" "$rootfs/llm-egress-agent"; }
fill_gateway() { certs; install -s -m 0755 "$bin/llm-egress-gateway" "$rootfs/llm-egress-gateway"; }
fill_provider() { certs; install -s -m 0755 "$bin/llm-egress-fake-provider" "$rootfs/llm-egress-fake-provider"; }
fill_client() {
  mkdir -p "$rootfs/bin" "$rootfs/usr/bin" "$rootfs/tmp"
  install -m 0755 /bin/busybox "$rootfs/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [[ "$applet" == busybox ]] || ln -sf busybox "$rootfs/bin/$applet"
  done
  # curl and the shared libraries it loads.
  install -m 0755 /usr/bin/curl "$rootfs/usr/bin/curl"
  ldd /usr/bin/curl | grep -o '/[^ ]*' | while read -r lib; do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
  done
  certs
}

image llm-egress/pause:3.2 /pause 65535:65535 fill_pause
image llm-egress/agent:0.1.0 /llm-egress-agent 0:0 fill_agent
image llm-egress/gateway:0.1.0 /llm-egress-gateway 65532:65532 fill_gateway
image llm-egress/test-provider:0.1.0 /llm-egress-fake-provider 65532:65532 fill_provider
image llm-egress/test-client:0.1.0 "" 0:0 fill_client

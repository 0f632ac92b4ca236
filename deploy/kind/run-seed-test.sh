#!/usr/bin/env bash
# Run by `cargo xtask kind` (which checks for docker and kind and passes
# KUBECTL, HELM, CLUSTER, KEEP_CLUSTER). Creates the cluster, builds and
# loads the images, issues the mTLS certificates with `llm-egress-gateway
# certs` (no cert-manager needed), then runs the seed's scenario
# (deploy/scenario/seed.sh, the same script the node fixture runs in
# `cargo xtask test`).
#
# The provider: with DASHSCOPE_API_KEY set, the real dashscope.aliyuncs.com;
# without, an OpenAI-compatible test provider in the cluster (the gateway
# resolves dashscope.aliyuncs.com to it and trusts its test certificate).
set -euo pipefail
: "${KUBECTL:?}" "${HELM:?}" "${CLUSTER:=llm-egress}" "${KEEP_CLUSTER:=0}"
work="$(mktemp -d)"
cleanup() {
  rm -rf "$work"
  if [[ "$KEEP_CLUSTER" != 1 ]]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

echo "==> kind cluster $CLUSTER"
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --config deploy/kind/config.yaml --wait 120s
export KUBECONFIG="$work/kubeconfig"
kind get kubeconfig --name "$CLUSTER" >"$KUBECONFIG"

echo "==> images"
docker build -f deploy/docker/agent.Dockerfile -t llm-egress/agent:0.1.0 .
docker build -f deploy/docker/gateway.Dockerfile -t llm-egress/gateway:0.1.0 .
docker build -f deploy/docker/gateway.Dockerfile --target test-provider -t llm-egress/test-provider:0.1.0 .
for image in agent gateway test-provider; do
  kind load docker-image --name "$CLUSTER" "llm-egress/$image:0.1.0"
done

echo "==> certificates (SPIFFE URI SANs)"
mkdir -p "$work/certs"
docker run --rm --user 0 -v "$work/certs:/out" --entrypoint /llm-egress-gateway llm-egress/gateway:0.1.0 \
  certs --out /out --gateway-dns istio-egressgateway.istio-system.svc.cluster.local --gateway-dns dashscope.aliyuncs.com

CERTS="$work/certs" CLIENT_IMAGE=curlimages/curl:8.11.1 HELM_EXTRA="--set image.pullPolicy=Never" \
  bash deploy/scenario/seed.sh

#!/usr/bin/env bash
# Run by `cargo xtask kind` (which checks for docker and kind and passes
# KUBECTL, HELM, CLUSTER, KEEP_CLUSTER). Creates the cluster, builds and
# loads the images, issues the mTLS certificates with `llm-egress-gateway
# certs` (no cert-manager needed), installs the chart and the seed's four
# resources, and runs the seed's test from a `sleep` pod: the completion,
# then `RBAC: access denied`.
#
# The provider: with DASHSCOPE_API_KEY set, the real dashscope.aliyuncs.com;
# without, an OpenAI-compatible test provider in the cluster (the gateway
# resolves dashscope.aliyuncs.com to it and trusts its test certificate).
set -euo pipefail
: "${KUBECTL:?}" "${HELM:?}" "${CLUSTER:=llm-egress}" "${KEEP_CLUSTER:=0}"
k() { "$KUBECTL" --context "kind-$CLUSTER" "$@"; }
work="$(mktemp -d)"
cleanup() {
  rm -rf "$work"
  if [[ "$KEEP_CLUSTER" != 1 ]]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

echo "==> kind cluster $CLUSTER"
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --config deploy/kind/config.yaml --wait 120s

echo "==> images"
docker build -f deploy/docker/agent.Dockerfile -t llm-egress/agent:0.1.0 .
docker build -f deploy/docker/gateway.Dockerfile -t llm-egress/gateway:0.1.0 .
docker build -f deploy/docker/gateway.Dockerfile --target test-provider -t llm-egress/test-provider:0.1.0 .
for image in agent gateway test-provider; do
  kind load docker-image --name "$CLUSTER" "llm-egress/$image:0.1.0"
done

echo "==> certificates (SPIFFE URI SANs) and the provider key"
docker run --rm --user 0 -v "$work:/out" --entrypoint /llm-egress-gateway llm-egress/gateway:0.1.0 \
  certs --out /out --gateway-dns istio-egressgateway.istio-system.svc.cluster.local --gateway-dns dashscope.aliyuncs.com
for ns in llm-egress istio-system; do k create namespace "$ns" --dry-run=client -o yaml | k apply -f -; done
k label namespace llm-egress llm-egress.io/capture=disabled --overwrite
k -n llm-egress create secret generic llm-egress-agent-tls --from-file=tls.crt="$work/agent.pem" \
  --from-file=tls.key="$work/agent-key.pem" --from-file=ca.crt="$work/ca.pem" --dry-run=client -o yaml | k apply -f -
k -n istio-system create secret generic llm-egress-gateway-tls --from-file=tls.crt="$work/gateway.pem" \
  --from-file=tls.key="$work/gateway-key.pem" --from-file=ca.crt="$work/ca.pem" --dry-run=client -o yaml | k apply -f -
key="${DASHSCOPE_API_KEY:-sk-kind-test-$RANDOM$RANDOM}"
k -n istio-system create secret generic llm-egress-provider-keys --from-literal=API_KEY="$key" \
  --dry-run=client -o yaml | k apply -f -

extra=()
if [[ -z "${DASHSCOPE_API_KEY:-}" ]]; then
  echo "==> test provider (no DASHSCOPE_API_KEY): answers as dashscope.aliyuncs.com inside the cluster"
  k -n istio-system create secret generic llm-egress-test-provider --from-file=tls.crt="$work/gateway.pem" \
    --from-file=tls.key="$work/gateway-key.pem" --dry-run=client -o yaml | k apply -f -
  cat <<YAML | k apply -f -
apiVersion: apps/v1
kind: Deployment
metadata: {name: test-provider, namespace: istio-system}
spec:
  selector: {matchLabels: {app: test-provider}}
  template:
    metadata: {labels: {app: test-provider}}
    spec:
      containers:
        - name: provider
          image: llm-egress/test-provider:0.1.0
          args: [--listen, "0.0.0.0:8443", --cert, /tls/tls.crt, --key, /tls/tls.key]
          env: [{name: PROVIDER_API_KEY, valueFrom: {secretKeyRef: {name: llm-egress-provider-keys, key: API_KEY}}}]
          volumeMounts: [{name: tls, mountPath: /tls}]
      volumes: [{name: tls, secret: {secretName: llm-egress-test-provider}}]
---
apiVersion: v1
kind: Service
metadata: {name: test-provider, namespace: istio-system}
spec:
  selector: {app: test-provider}
  ports: [{port: 443, targetPort: 8443}]
YAML
  k -n istio-system rollout status deploy/test-provider --timeout 120s
  provider_ip="$(k -n istio-system get svc test-provider -o jsonpath='{.spec.clusterIP}')"
  extra=(--set-json "gateway.extraArgs=[\"--resolve\",\"dashscope.aliyuncs.com=$provider_ip\",\"--upstream-ca\",\"/etc/llm-egress/tls/ca.crt\"]")
fi

echo "==> helm install"
"$HELM" --kube-context "kind-$CLUSTER" upgrade --install llm-egress deploy/helm/llm-egress \
  --set certificates.mode=existingSecrets --set namespace.create=false --set gateway.createNamespace=false \
  --set image.pullPolicy=Never "${extra[@]}" --wait --timeout 5m

echo "==> the seed's resources and a sleep pod"
k apply -f deploy/examples/dashscope-qwen.yaml -f deploy/examples/dashscope-route.yaml -f deploy/examples/egress-gw.yaml
k label namespace default llm-egress.io/capture=enabled --overwrite
k -n default create serviceaccount sleep --dry-run=client -o yaml | k apply -f -
cat <<YAML | k apply -f -
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: default}
spec:
  serviceAccountName: sleep
  containers: [{name: sleep, image: curlimages/curl:8.11.1, command: [sleep, infinity]}]
YAML
k -n default wait --for=condition=Ready pod/sleep --timeout 180s
sleep 3

seed() {
  k -n default exec sleep -- curl -sS --max-time 60 http://dashscope.aliyuncs.com \
    -H 'Content-Type: application/json' \
    -d '{"messages": [{"role": "user", "content": "Tell me about yourself"}]}'
}
echo "==> the seed's test, step 1: a completion without any key in the pod"
out="$(seed)"; echo "$out"
grep -q '"choices"' <<<"$out" || { echo "FAIL: no completion"; exit 1; }
echo "==> step 2: the seed's AuthorizationPolicy, then RBAC: access denied"
k apply -f deploy/examples/authpolicy.yaml
for _ in $(seq 1 30); do
  out="$(seed || true)"
  [[ "$out" == "RBAC: access denied" ]] && break
  sleep 1
done
echo "$out"
[[ "$out" == "RBAC: access denied" ]] || { echo "FAIL: not denied"; exit 1; }
k get llmroutes,llmproviders,authorizationpolicies -A
echo "PASS: the seed's test passed on the llm-egress data path"

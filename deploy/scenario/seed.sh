#!/usr/bin/env bash
# The seed's scenario on a cluster, as a user runs it: shared by
# `cargo xtask kind` (a kind cluster) and the node fixture (`cargo xtask
# node`, and `cargo xtask test`), so what is proven here is what runs there.
#
# Expects: KUBECTL, HELM (KUBECONFIG pointing at the cluster), CERTS (a
# directory from `llm-egress-gateway certs`: ca.pem, agent.pem,
# agent-key.pem, gateway.pem, gateway-key.pem), CLIENT_IMAGE (an image with
# sh, sleep and curl). Optional: HELM_EXTRA (more `helm install` arguments),
# DASHSCOPE_API_KEY (the real provider; without it an OpenAI-compatible test
# provider answers as dashscope.aliyuncs.com inside the cluster, and the
# cluster's DNS must resolve that name to the test-provider Service).
#
# Steps: the chart with `helm install`; the seed's LLMProvider, LLMRoute and
# Gateway; a captured `sleep` pod gets a completion with no key; a pod in an
# unlabelled namespace goes direct; a deleted and recreated pod is followed;
# an agent rollout restart never lets a captured connection out directly;
# the second gateway replica serves when the first is deleted; the seed's
# AuthorizationPolicy gives `RBAC: access denied`; every route is Accepted.
set -euo pipefail
: "${KUBECTL:?}" "${HELM:?}" "${CERTS:?}" "${CLIENT_IMAGE:?}"
read -r -a helm_extra <<<"${HELM_EXTRA:-}"
k() { "$KUBECTL" "$@"; }
step() { echo "==> $*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
here="$(cd "$(dirname "$0")" && pwd)"
examples="$here/../examples"

# Waits for `$@` to succeed (an event: a status, an answer), up to $1 s.
until_ok() {
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 1
  done
}

step "namespaces, certificates and the provider key"
for ns in llm-egress istio-system; do k create namespace "$ns" --dry-run=client -o yaml | k apply -f -; done
k label namespace llm-egress llm-egress.io/capture=disabled --overwrite
k -n llm-egress create secret generic llm-egress-agent-tls --from-file=tls.crt="$CERTS/agent.pem" \
  --from-file=tls.key="$CERTS/agent-key.pem" --from-file=ca.crt="$CERTS/ca.pem" --dry-run=client -o yaml | k apply -f -
k -n istio-system create secret generic llm-egress-gateway-tls --from-file=tls.crt="$CERTS/gateway.pem" \
  --from-file=tls.key="$CERTS/gateway-key.pem" --from-file=ca.crt="$CERTS/ca.pem" --dry-run=client -o yaml | k apply -f -
# A test key is made once per cluster (the test provider reads it at start).
if [[ -n "${DASHSCOPE_API_KEY:-}" ]] || ! k -n istio-system get secret llm-egress-provider-keys >/dev/null 2>&1; then
  key="${DASHSCOPE_API_KEY:-sk-scenario-$RANDOM$RANDOM$RANDOM}"
  k -n istio-system create secret generic llm-egress-provider-keys --from-literal=API_KEY="$key" \
    --dry-run=client -o yaml | k apply -f -
fi

gateway_args=()
if [[ -z "${DASHSCOPE_API_KEY:-}" ]]; then
  step "test provider (no DASHSCOPE_API_KEY): answers as dashscope.aliyuncs.com, HTTPS on 443 and plain HTTP on 80"
  k -n istio-system create secret generic llm-egress-test-provider --from-file=tls.crt="$CERTS/gateway.pem" \
    --from-file=tls.key="$CERTS/gateway-key.pem" --dry-run=client -o yaml | k apply -f -
  cat <<YAML | k apply -f -
apiVersion: apps/v1
kind: Deployment
metadata: {name: test-provider, namespace: istio-system}
spec:
  selector: {matchLabels: {app: test-provider}}
  template:
    metadata: {labels: {app: test-provider, llm-egress.io/capture: disabled}}
    spec:
      containers:
        - name: provider
          image: llm-egress/test-provider:0.1.0
          imagePullPolicy: IfNotPresent
          args: [--listen, "0.0.0.0:8443", --plain-listen, "0.0.0.0:8080", --cert, /tls/tls.crt, --key, /tls/tls.key]
          env: [{name: PROVIDER_API_KEY, valueFrom: {secretKeyRef: {name: llm-egress-provider-keys, key: API_KEY}}}]
          volumeMounts: [{name: tls, mountPath: /tls}]
      volumes: [{name: tls, secret: {secretName: llm-egress-test-provider}}]
---
apiVersion: v1
kind: Service
metadata: {name: test-provider, namespace: istio-system}
spec:
  selector: {app: test-provider}
  ports: [{name: https, port: 443, targetPort: 8443}, {name: http, port: 80, targetPort: 8080}]
YAML
  k -n istio-system rollout status deploy/test-provider --timeout 180s
  provider_ip="$(k -n istio-system get svc test-provider -o jsonpath='{.spec.clusterIP}')"
  gateway_args=(--set-json "gateway.extraArgs=[\"--resolve\",\"dashscope.aliyuncs.com=$provider_ip\",\"--upstream-ca\",\"/etc/llm-egress/tls/ca.crt\"]")
fi

step "helm install (certificates from existing Secrets)"
"$HELM" upgrade --install llm-egress "$here/../helm/llm-egress" \
  --set certificates.mode=existingSecrets --set namespace.create=false --set gateway.createNamespace=false \
  "${gateway_args[@]}" "${helm_extra[@]}" --wait --timeout 5m
k -n llm-egress rollout status ds/llm-egress-agent --timeout 180s
k -n istio-system rollout status deploy/llm-egress-gateway --timeout 180s

step "the seed's LLMProvider, LLMRoute and Gateway; a captured namespace; a sleep pod"
k apply -f "$examples/dashscope-qwen.yaml" -f "$examples/dashscope-route.yaml" -f "$examples/egress-gw.yaml"
k label namespace default llm-egress.io/capture=enabled --overwrite
sleep_pod() {  # NAMESPACE
  k -n "$1" create serviceaccount sleep --dry-run=client -o yaml | k apply -f -
  cat <<YAML | k apply -f -
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: $1}
spec:
  serviceAccountName: sleep
  terminationGracePeriodSeconds: 1
  containers: [{name: sleep, image: "$CLIENT_IMAGE", imagePullPolicy: IfNotPresent, command: [sleep, "86400"]}]
YAML
  k -n "$1" wait --for=condition=Ready pod/sleep --timeout 180s
}
sleep_pod default

# The seed's request, from the sleep pod of namespace $1.
seed() {
  k -n "${1:-default}" exec sleep -- curl -sS --max-time 30 http://dashscope.aliyuncs.com \
    -H 'Content-Type: application/json' \
    -d '{"messages": [{"role": "user", "content": "Tell me about yourself"}]}'
}
completion() { out="$(seed "${1:-default}" 2>&1)" && grep -q '"choices"' <<<"$out"; }

step "the seed's test, step 1: a completion, without any key in the pod"
until_ok 90 completion || fail "no completion through the gateway; last answer: ${out:-}"
echo "$out"

step "a pod in an unlabelled namespace goes direct (reaches the provider without a key)"
k create namespace direct --dry-run=client -o yaml | k apply -f -
sleep_pod direct
code="$(k -n direct exec sleep -- curl -s -o /dev/null -w '%{http_code}' --max-time 30 http://dashscope.aliyuncs.com \
  -H 'Content-Type: application/json' -d '{"messages": [{"role": "user", "content": "hi"}]}' || true)"
echo "direct: HTTP $code"
[[ "$code" != 000 && "$code" != 200 ]] || fail "the unlabelled pod should reach the provider itself and be refused for lack of a key (HTTP $code)"

step "a pod deleted and recreated under the same name is followed"
old_uid="$(k -n default get pod sleep -o jsonpath='{.metadata.uid}')"
k -n default delete pod sleep --wait=true --timeout 120s
sleep_pod default
new_uid="$(k -n default get pod sleep -o jsonpath='{.metadata.uid}')"
[[ "$old_uid" != "$new_uid" ]] || fail "the recreated pod kept its UID"
echo "old pod $old_uid, new pod $new_uid"
until_ok 90 completion || fail "the recreated pod gets no completion; last answer: ${out:-}"

step "an agent rollout restart never lets a captured connection out directly"
codes="$(mktemp)"
k -n default exec sleep -- sh -c 'end=$(( $(date +%s) + 600 )); while [ $(date +%s) -lt $end ] && [ ! -e /tmp/stop ]; do
  curl -s -o /dev/null -w "%{http_code}\n" --max-time 5 http://dashscope.aliyuncs.com \
    -H "Content-Type: application/json" -d "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}"; done' >"$codes" 2>/dev/null &
prober=$!
until_ok 30 grep -q 200 "$codes" || fail "the prober got no answer before the restart"
before="$(wc -l <"$codes")"
k -n llm-egress rollout restart ds/llm-egress-agent
k -n llm-egress rollout status ds/llm-egress-agent --timeout 180s
until_ok 60 completion || fail "no completion after the agent restart; last answer: ${out:-}"
k -n default exec sleep -- touch /tmp/stop
wait "$prober" || true
during=$(( $(wc -l <"$codes") - before ))
echo "answers while the agent restarted: $(sort "$codes" | uniq -c | tr '\n' ' ')"
((during > 0)) || fail "no request ran during the restart"
if grep -qvE '^(200|000)$' "$codes"; then
  fail "a captured connection got an answer that did not come through the gateway: $(grep -vE '^(200|000)$' "$codes" | sort | uniq -c | tr '\n' ' ')"
fi
rm -f "$codes"

step "the second gateway replica serves when the first is deleted"
mapfile -t gateways < <(k -n istio-system get pods -l app.kubernetes.io/name=llm-egress-gateway \
  --field-selector=status.phase=Running -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
((${#gateways[@]} >= 2)) || fail "expected two gateway replicas, found: ${gateways[*]}"
# Access log lines of every gateway replica but the deleted one.
others_served() {
  local n=0 pod
  for pod in $(k -n istio-system get pods -l app.kubernetes.io/name=llm-egress-gateway -o name); do
    [[ "$pod" == "pod/${gateways[0]}" ]] && continue
    n=$((n + $(k -n istio-system logs "$pod" 2>/dev/null | grep -c '"access"' || true)))
  done
  echo "$n"
}
before_others="$(others_served)"
k -n istio-system delete pod "${gateways[0]}" --wait=false
until_ok 60 completion || fail "no completion with the first gateway replica gone; last answer: ${out:-}"
((  $(others_served) > before_others )) || fail "the completion was not served by another replica than ${gateways[0]}"
echo "served by another replica while ${gateways[0]} was deleted"

step "the seed's test, step 2: the seed's AuthorizationPolicy, then RBAC: access denied"
k apply -f "$examples/authpolicy.yaml"
denied() { out="$(seed 2>&1 || true)"; [[ "$out" == "RBAC: access denied" ]]; }
until_ok 60 denied || fail "not denied; last answer: $out"
echo "$out"

step "every LLMRoute is Accepted"
k get llmroutes,llmproviders,authorizationpolicies -A
accepted="$(k get llmroutes -A -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Accepted")].status}{"\n"}{end}')"
[[ -n "$accepted" ]] && ! grep -qv '^True$' <<<"$accepted" || fail "LLMRoutes not all Accepted: $accepted"
echo "PASS: the seed's scenario passed on the llm-egress data path"

#!/usr/bin/env bash
# A real Kubernetes node on one machine: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, containerd, kubelet, kube-proxy
# and a small cluster DNS, all v1.20.2 (built by build-kubernetes.sh).
#
#   node.sh up STATE_DIR       start it; prints the admin kubeconfig's path
#   node.sh images STATE_DIR ARCHIVE...   import docker-archive images
#   node.sh down STATE_DIR     stop everything and restore the machine
#
# Confinement, so that a node on a developer's machine leaves no trace:
# - Every daemon runs in its own network namespace (llmeg-node, linked to
#   the host by a veth: host 10.251.0.1, node 10.251.0.2). The kubelet's and
#   kube-proxy's iptables chains, ip_forward and the pod bridge live there
#   and vanish with it. Nothing routes out of it.
# - Every daemon runs in its own mount namespace (made rshared inside, as a
#   node's is), so container rootfs, volume and netns mounts and the bpffs
#   the agent pins to vanish with it too.
# - Pods run under the cgroup root /llm-egress-node (kubelet --cgroup-root),
#   in every v1 hierarchy and in cgroup2: the agent attaches its programs
#   to that subtree only, and teardown removes it.
# - What cannot be confined is saved and restored: the kernel sysctls the
#   kubelet sets, and the /var directories it creates whatever --root-dir.
# Environment: KUBE_BIN (the built components), TOOLS (kubectl), BIN_DIR
# (llm-egress-node-dns).
set -euo pipefail
cmd="${1:?usage: node.sh up|images|down STATE_DIR}"
S="${2:?usage: node.sh up|images|down STATE_DIR}"
shift 2
NETNS=llmeg-node
HOST_IP=10.251.0.1
NODE_IP=10.251.0.2
NODE=llm-egress-node
CGROUP_ROOT=/llm-egress-node
POD_CIDR=10.244.0.0/24
SERVICE_CIDR=10.96.0.0/16
# Global sysctls the kubelet (and kube-proxy) set on start.
SYSCTLS=(kernel.panic kernel.panic_on_oops vm.overcommit_memory vm.panic_on_oom
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
# Directories the kubelet, CNI and containerd create outside their configured roots.
# (containerd's shims keep their sockets under /run/containerd whatever its state dir.)
VAR_DIRS=(/var/lib/kubelet /var/lib/cni /var/log/pods /var/log/containers /opt/containerd /run/containerd)

log() { echo "node: $*" >&2; }

# Run in the node: its network and mount namespaces.
in_node() { nsenter --net="/run/netns/$NETNS" --mount="$S/mnt.ns" -- "$@"; }

# Start a daemon in the node, detached, logging to $S/logs/NAME.log.
# (nsenter and setsid exec in place, so $! is the daemon itself.)
start() {
  local name="$1"; shift
  nsenter --net="/run/netns/$NETNS" --mount="$S/mnt.ns" -- setsid "$@" >"$S/logs/$name.log" 2>&1 < /dev/null &
  echo $! >"$S/pids/$name"
}

# Wait until `$@` succeeds, or fail naming what was awaited and the log.
wait_until() {
  local what="$1" deadline=$((SECONDS + $2)) logname="$3"; shift 3
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then
      log "timed out waiting for $what; last lines of $S/logs/$logname.log:"
      tail -n 30 "$S/logs/$logname.log" >&2 || true
      return 1
    fi
    sleep 0.5
  done
}

# The node's cgroup root in every hierarchy: one directory on a cgroup2-only
# host, one per v1 controller (and the unified one) on a hybrid host.
cgroup_dirs() {
  if [[ "$(stat -fc %T /sys/fs/cgroup)" == cgroup2fs ]]; then
    echo "/sys/fs/cgroup$CGROUP_ROOT"
    return
  fi
  for h in /sys/fs/cgroup/*/; do
    [[ -d "$h" ]] && echo "${h%/}$CGROUP_ROOT"
  done
}

pki() {
  local p="$S/pki"
  mkdir -p "$p"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3 \
    -keyout "$p/ca.key" -out "$p/ca.crt" -subj "/CN=llm-egress-node-ca" 2>/dev/null
  openssl ecparam -name prime256v1 -genkey -noout -out "$p/sa.key"
  # NAME CN O [SANs]
  cert() {
    local name="$1" cn="$2" o="$3" san="${4:-}"
    local ext="$p/$name.ext"
    printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n' >"$ext"
    [[ -n "$san" ]] && echo "subjectAltName=$san" >>"$ext"
    local subj="/CN=$cn"
    [[ -n "$o" ]] && subj="/O=$o/CN=$cn"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout "$p/$name.key" -out "$p/$name.csr" -subj "$subj" 2>/dev/null
    openssl x509 -req -in "$p/$name.csr" -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial \
      -days 3 -extfile "$ext" -out "$p/$name.crt" 2>/dev/null
  }
  cert apiserver kube-apiserver "" \
    "IP:$NODE_IP,IP:10.96.0.1,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
  cert admin admin system:masters
  cert kubelet "system:node:$NODE" system:nodes "IP:$NODE_IP,DNS:$NODE"
  cert controller-manager system:kube-controller-manager ""
  cert scheduler system:kube-scheduler ""
  cert kube-proxy system:kube-proxy ""
  # The DNS reads Services only; admin keeps this fixture short.
  for user in admin kubelet controller-manager scheduler kube-proxy; do
    cat >"$S/$user.kubeconfig" <<YAML
apiVersion: v1
kind: Config
clusters:
- name: node
  cluster: {server: "https://$NODE_IP:6443", certificate-authority: "$p/ca.crt"}
users:
- name: $user
  user: {client-certificate: "$p/$user.crt", client-key: "$p/$user.key"}
contexts:
- name: node
  context: {cluster: node, user: $user}
current-context: node
YAML
  done
}

configs() {
  mkdir -p "$S/cni" "$S/containerd"
  cat >"$S/containerd/config.toml" <<TOML
version = 2
root = "$S/containerd/root"
state = "$S/containerd/state"
[grpc]
  address = "$S/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$S/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/llm-egress/pause:3.2"
  # This VM lacks CAP_SYS_RESOURCE and AppArmor: without these every
  # sandbox fails ("can't get final child's PID from pipe").
  restrict_oom_score_adj = true
  disable_apparmor = true
  # Pod network namespaces under the state directory, not /var/run/netns.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$S/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
      Root = "$S/runc"
TOML
  cat >"$S/cni/10-llmeg.conflist" <<JSON
{"cniVersion": "0.4.0", "name": "llmeg", "plugins": [
  {"type": "bridge", "bridge": "llmeg0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$S/cni-ipam",
            "ranges": [[{"subnet": "$POD_CIDR", "gateway": "10.244.0.1"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
JSON
  : >"$S/resolv.conf"
  cat >"$S/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupRoot: $CGROUP_ROOT
failSwapOn: false
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: "$S/pki/ca.crt"}
authorization: {mode: AlwaysAllow}
clusterDNS: [$NODE_IP]
clusterDomain: cluster.local
resolvConf: "$S/resolv.conf"
tlsCertFile: "$S/pki/kubelet.crt"
tlsPrivateKeyFile: "$S/pki/kubelet.key"
# A shared test machine's disk may be fuller than a node's: never evict.
evictionHard: {memory.available: "50Mi", nodefs.available: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
YAML
  cat >"$S/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {kubeconfig: "$S/kube-proxy.kubeconfig"}
hostnameOverride: $NODE
clusterCIDR: 10.244.0.0/16
bindAddress: $NODE_IP
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
iptables: {masqueradeAll: true}
# Conntrack limits are global to the machine: leave them alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
}

up() {
  : "${KUBE_BIN:?}" "${TOOLS:?}" "${BIN_DIR:?}"
  if [[ -e "$S/up" ]]; then
    log "a node is already up in $S (run: node.sh down $S)"
    exit 1
  fi
  if ip netns list | grep -qw "$NETNS"; then
    log "another node is running (network namespace $NETNS exists): stop it first with \`cargo xtask node down\`"
    exit 1
  fi
  mkdir -p "$S/logs" "$S/pids" "$S/saved"
  # What teardown restores.
  for k in "${SYSCTLS[@]}"; do
    sysctl -n "$k" >"$S/saved/$k" 2>/dev/null || true
  done
  for d in "${VAR_DIRS[@]}"; do
    [[ -e "$d" ]] || echo "$d" >>"$S/saved/created-dirs"
  done
  touch "$S/up"

  log "network namespace $NETNS ($HOST_IP <-> $NODE_IP)"
  ip netns add "$NETNS"
  ip -n "$NETNS" link set lo up
  ip link add llmeg-h type veth peer name llmeg-n netns "$NETNS"
  ip addr add "$HOST_IP/30" dev llmeg-h
  ip link set llmeg-h up
  ip -n "$NETNS" addr add "$NODE_IP/30" dev llmeg-n
  ip -n "$NETNS" link set llmeg-n up
  # The kubelet and kube-proxy need a default route to pick the node's
  # address; it leads only to the host end of the veth, which forwards nothing.
  ip -n "$NETNS" route add default via "$HOST_IP"

  log "mount namespace (rshared inside), bpffs, cgroup root $CGROUP_ROOT"
  touch "$S/mnt.ns"
  unshare --mount="$S/mnt.ns" --propagation private true
  nsenter --mount="$S/mnt.ns" -- mount --make-rshared /
  nsenter --mount="$S/mnt.ns" -- mount -t bpf bpffs /sys/fs/bpf
  for dir in $(cgroup_dirs); do
    mkdir -p "$dir"
    if [[ -e "$dir/cpuset.cpus" ]]; then
      cat "$(dirname "$dir")/cpuset.cpus" >"$dir/cpuset.cpus"
      cat "$(dirname "$dir")/cpuset.mems" >"$dir/cpuset.mems"
    fi
  done

  pki
  configs

  log "etcd and kube-apiserver"
  start etcd etcd --data-dir "$S/etcd" --listen-client-urls http://127.0.0.1:2379 \
    --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
    --initial-advertise-peer-urls http://127.0.0.1:2380 --initial-cluster default=http://127.0.0.1:2380
  local p="$S/pki"
  start kube-apiserver "$KUBE_BIN/kube-apiserver" --etcd-servers http://127.0.0.1:2379 \
    --bind-address 0.0.0.0 --secure-port 6443 --advertise-address "$NODE_IP" \
    --tls-cert-file "$p/apiserver.crt" --tls-private-key-file "$p/apiserver.key" \
    --client-ca-file "$p/ca.crt" \
    --kubelet-client-certificate "$p/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$p/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types InternalIP \
    --service-account-key-file "$p/sa.key" --service-account-signing-key-file "$p/sa.key" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
    --allow-privileged --service-cluster-ip-range "$SERVICE_CIDR"
  kubectl() { "$TOOLS/kubectl" --kubeconfig "$S/admin.kubeconfig" "$@"; }
  wait_until "the API server" 90 kube-apiserver kubectl get --raw /readyz

  log "kube-controller-manager, kube-scheduler"
  start kube-controller-manager "$KUBE_BIN/kube-controller-manager" \
    --kubeconfig "$S/controller-manager.kubeconfig" --leader-elect=false \
    --service-account-private-key-file "$p/sa.key" --root-ca-file "$p/ca.crt" \
    --use-service-account-credentials --bind-address 127.0.0.1 --port 0
  start kube-scheduler "$KUBE_BIN/kube-scheduler" --kubeconfig "$S/scheduler.kubeconfig" \
    --leader-elect=false --bind-address 127.0.0.1 --port 0

  log "containerd"
  start containerd containerd --config "$S/containerd/config.toml"
  wait_until "containerd" 30 containerd in_node ctr --address "$S/containerd.sock" version
  for archive in "$S"/images/*.tar; do
    [[ -e "$archive" ]] && import "$archive"
  done

  log "cluster DNS on $NODE_IP:53, kubelet, kube-proxy"
  start node-dns "$BIN_DIR/llm-egress-node-dns" --listen "$NODE_IP:53" \
    --kubeconfig "$S/admin.kubeconfig" "${DNS_ALIASES[@]/#/--alias=}"
  start kubelet "$KUBE_BIN/kubelet" --config "$S/kubelet.yaml" \
    --kubeconfig "$S/kubelet.kubeconfig" --container-runtime=remote \
    --container-runtime-endpoint="unix://$S/containerd.sock" \
    --pod-infra-container-image=docker.io/llm-egress/pause:3.2 \
    --root-dir "$S/kubelet" --hostname-override "$NODE" --node-ip "$NODE_IP" -v=1
  start kube-proxy "$KUBE_BIN/kube-proxy" --config "$S/kube-proxy.yaml"
  wait_until "node $NODE to be Ready" 120 kubelet \
    kubectl wait --for=condition=Ready "node/$NODE" --timeout=2s
  wait_until "the default service account" 60 kube-controller-manager \
    kubectl -n default get serviceaccount default
  log "ready: export KUBECONFIG=$S/admin.kubeconfig"
  echo "$S/admin.kubeconfig"
}

# Imports a docker-archive into the node's containerd (k8s.io namespace).
import() {
  in_node ctr --address "$S/containerd.sock" -n k8s.io images import --no-unpack=false "$1" >/dev/null
}

images() {
  mkdir -p "$S/images"
  for archive in "$@"; do
    cp "$archive" "$S/images/"
    if [[ -S "$S/containerd.sock" ]]; then import "$S/images/$(basename "$archive")"; fi
  done
}

stop_pid() {
  local pidfile="$1" pid
  pid="$(cat "$pidfile" 2>/dev/null)" || return 0
  [[ -n "$pid" ]] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
    sleep 0.25
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

# Every process in the node's cgroups (containers), and the shims of our
# containerd (they daemonize, so no pid file has them).
node_processes() {
  for dir in $(cgroup_dirs); do
    [[ -d "$dir" ]] && find "$dir" -name cgroup.procs -exec cat {} + 2>/dev/null
  done
  pgrep -f -- "-address $S/containerd.sock" || true
}

down() {
  if [[ ! -e "$S/up" ]]; then
    log "no node in $S"
    return 0
  fi
  log "stopping the kubelet and kube-proxy first (no pod restarts meanwhile)"
  for d in kubelet kube-proxy; do stop_pid "$S/pids/$d"; done
  log "killing containers and shims"
  for _ in 1 2 3 4 5; do
    pids="$(node_processes | sort -u)"
    [[ -z "$pids" ]] && break
    kill -KILL $pids 2>/dev/null || true
    sleep 0.5
  done
  for d in containerd node-dns kube-scheduler kube-controller-manager kube-apiserver etcd; do
    stop_pid "$S/pids/$d"
  done
  log "removing cgroups under $CGROUP_ROOT"
  for dir in $(cgroup_dirs); do
    [[ -d "$dir" ]] && find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  log "releasing the mount and network namespaces"
  umount "$S/mnt.ns" 2>/dev/null || true
  ip link del llmeg-h 2>/dev/null || true
  ip netns del "$NETNS" 2>/dev/null || true
  log "restoring sysctls and /var"
  for k in "${SYSCTLS[@]}"; do
    [[ -s "$S/saved/$k" ]] && sysctl -qw "$k=$(cat "$S/saved/$k")" || true
  done
  if [[ -e "$S/saved/created-dirs" ]]; then
    while read -r d; do rm -rf "$d"; done <"$S/saved/created-dirs"
  fi
  rm -f "$S/up"
  # Anything left is a leak: say so.
  local left=0
  for dir in $(cgroup_dirs); do
    if [[ -d "$dir" ]]; then log "left behind: cgroup $dir"; left=1; fi
  done
  if [[ -n "$(node_processes)" ]]; then log "left behind: processes $(node_processes | tr '\n' ' ')"; left=1; fi
  return "$left"
}

case "$cmd" in
  up)
    DNS_ALIASES=("$@")
    up
    ;;
  images) images "$@" ;;
  down) down ;;
  *) echo "usage: node.sh up|images|down STATE_DIR" >&2; exit 2 ;;
esac

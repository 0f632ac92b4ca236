//! Node-bound identity: an agent speaks only for workloads on its own node,
//! so a compromised node cannot borrow the identity of a workload that runs
//! elsewhere. istiod checks ztunnel's certificate requests the same way
//! (`node_auth.go`: the caller's node from its own pod-bound token, then the
//! requested identity against the pods of that node).
//!
//! - Kubernetes: each stream carries the agent's projected service-account
//!   token (audience `--node-token-audience`). A TokenReview proves it is
//!   the agent's service account and names the agent's pod; the agent's node
//!   is that pod's `spec.nodeName` in a pod index watched from the API. The
//!   asserted workload's pod must exist in the index, run on that node and
//!   run as the asserted service account. Reviews are cached briefly; the
//!   pod index is consulted on every stream, so a rescheduled pod follows.
//! - Static: the agent certificate names its node (URI SAN
//!   `urn:llm-egress:node:<node>`) and an operator's file maps each node to
//!   the `namespace/serviceAccount` patterns it may assert.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{
    api::{Api, PostParams},
    runtime::{reflector::ObjectRef, watcher},
    Client,
};
use llm_egress_config::kube_watch::{spawn_reflector_trimmed, Watched};
use llm_egress_mesh::{identity::SpiffeId, tunnel::WorkloadIdentity};

/// How long a TokenReview's answer is reused.
const REVIEW_TTL: Duration = Duration::from_secs(60);
/// Reviews kept at most (one per agent pod and token rotation).
const REVIEW_CACHE_MAX: usize = 4096;
/// The extra fields the API server puts in a bound token's user info.
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// Set on pods a kubelet created from its own manifests.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";
/// Token reviews in flight at once: a node sending garbage tokens must not
/// flood the API server.
const MAX_REVIEWS_IN_FLIGHT: usize = 16;
/// How long a refused token stays refused without a new review.
const NEGATIVE_TTL: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeAuthError {
    #[error("the agent certificate names no node (URI SAN urn:llm-egress:node:<node>); issue agent certificates per node")]
    NoNodeInCertificate,
    #[error("node {node} may not assert {workload} (--node-workloads)")]
    NotMapped { node: String, workload: String },
    #[error("the stream carries no node token; give the agent --node-token-file (a projected service-account token)")]
    NoToken,
    #[error("the node token is not valid: {0}")]
    BadToken(String),
    #[error("the node token belongs to {actual}, not to the agent's service account {expected}")]
    WrongTokenOwner { expected: String, actual: String },
    #[error("the agent's own pod {0} is not known (yet)")]
    UnknownAgentPod(String),
    #[error("the asserted identity names no pod")]
    NoPod,
    #[error("pod {0} does not exist")]
    UnknownPod(String),
    #[error("pod {pod} runs on node {actual}, not on the agent's node {agent_node}")]
    WrongNode {
        pod: String,
        actual: String,
        agent_node: String,
    },
    #[error("pod {pod} runs as service account {actual}, not {asserted}")]
    WrongServiceAccount {
        pod: String,
        actual: String,
        asserted: String,
    },
    #[error("pod {pod} is {why}: it cannot be asserted")]
    NotAWorkload { pod: String, why: &'static str },
    #[error("{asserted} is not the workload identity of {namespace}/{service_account} in trust domain {trust_domain}")]
    NotCanonical {
        asserted: String,
        namespace: String,
        service_account: String,
        trust_domain: String,
    },
    #[error("an agent stream must name the workload it carries")]
    NoIdentity,
    #[error("cannot review the node token now: {0}")]
    Unavailable(String),
}

impl NodeAuthError {
    /// 503 for what may pass on retry, 403 for a refusal.
    pub fn status(&self) -> hyper::StatusCode {
        match self {
            NodeAuthError::Unavailable(_) => hyper::StatusCode::SERVICE_UNAVAILABLE,
            _ => hyper::StatusCode::FORBIDDEN,
        }
    }
}

/// What the gateway knows of the agent at the other end of a tunnel.
#[derive(Debug, Clone)]
pub struct AgentPeer {
    pub id: SpiffeId,
    /// From the certificate (static mode).
    pub node: Option<String>,
}

pub enum NodeAuth {
    /// Any agent may assert any workload (`--node-auth off`).
    Off,
    Static(StaticNodes),
    Kubernetes(Arc<KubeNodes>),
}

impl NodeAuth {
    /// Checks that `agent` may assert `who`; returns the agent's node.
    pub async fn verify(
        &self,
        agent: &AgentPeer,
        who: &WorkloadIdentity,
        token: Option<&str>,
    ) -> Result<Option<String>, NodeAuthError> {
        // Only the identity the mesh issues for (namespace, service
        // account) in the agent's own trust domain: no extra path segments
        // or foreign trust domains that a suffix pattern could match.
        let canonical = SpiffeId::workload(agent.id.trust_domain(), &who.namespace, &who.service_account);
        if !matches!(self, NodeAuth::Off) && who.spiffe != canonical {
            return Err(NodeAuthError::NotCanonical {
                asserted: who.spiffe.to_string(),
                namespace: who.namespace.clone(),
                service_account: who.service_account.clone(),
                trust_domain: agent.id.trust_domain().to_string(),
            });
        }
        match self {
            NodeAuth::Off => Ok(None),
            NodeAuth::Static(s) => {
                let node = agent.node.as_deref().ok_or(NodeAuthError::NoNodeInCertificate)?;
                s.check(node, &who.namespace, &who.service_account)?;
                Ok(Some(node.to_string()))
            }
            NodeAuth::Kubernetes(k) => {
                let token = token.ok_or(NodeAuthError::NoToken)?;
                let node = k.agent_node(&agent.id, token).await?;
                k.check_workload(&node, who)?;
                Ok(Some(node))
            }
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            NodeAuth::Off => "off",
            NodeAuth::Static(_) => "static",
            NodeAuth::Kubernetes(_) => "kubernetes",
        }
    }
}

// ---------- static ----------

/// `nodes: {node-a: ["default/*", "team-a/sleep"], node-b: ["*"]}`
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticNodes {
    nodes: BTreeMap<String, Vec<String>>,
}

fn pattern_matches(pattern: &str, namespace: &str, service_account: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.split_once('/') {
        Some((ns, "*")) => ns == namespace,
        Some((ns, sa)) => ns == namespace && sa == service_account,
        None => false,
    }
}

impl StaticNodes {
    pub fn load(path: &Path) -> Result<StaticNodes, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<StaticNodes, String> {
        let nodes: StaticNodes = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        for (node, patterns) in &nodes.nodes {
            for p in patterns {
                let ok = p == "*"
                    || p.split_once('/')
                        .is_some_and(|(n, s)| !n.is_empty() && !s.is_empty());
                if !ok {
                    return Err(format!(
                        "nodes.{node}: {p:?} is not NAMESPACE/SERVICEACCOUNT, NAMESPACE/* or *"
                    ));
                }
            }
        }
        Ok(nodes)
    }

    fn check(&self, node: &str, namespace: &str, service_account: &str) -> Result<(), NodeAuthError> {
        let allowed = self
            .nodes
            .get(node)
            .is_some_and(|ps| ps.iter().any(|p| pattern_matches(p, namespace, service_account)));
        if allowed {
            Ok(())
        } else {
            Err(NodeAuthError::NotMapped {
                node: node.into(),
                workload: format!("{namespace}/{service_account}"),
            })
        }
    }
}

// ---------- Kubernetes ----------

struct Reviewed {
    username: String,
    namespace: String,
    pod: String,
    uid: String,
    at: Instant,
}

/// Keeps what node binding reads of a Pod: uid, mirror annotation, node,
/// service account and phase.
fn trim_pod(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    meta.managed_fields = None;
    meta.labels = None;
    meta.owner_references = None;
    meta.annotations = meta
        .annotations
        .take()
        .map(|a| a.into_iter().filter(|(k, _)| k == MIRROR_ANNOTATION).collect());
    pod.spec = pod.spec.take().map(|s| k8s_openapi::api::core::v1::PodSpec {
        node_name: s.node_name,
        service_account_name: s.service_account_name,
        ..Default::default()
    });
    pod.status = pod.status.take().map(|s| k8s_openapi::api::core::v1::PodStatus {
        phase: s.phase,
        ..Default::default()
    });
}

pub struct KubeNodes {
    client: Client,
    pods: Watched<Pod>,
    audience: String,
    reviews: Mutex<HashMap<String, Arc<Reviewed>>>,
    refused: Mutex<HashMap<String, (NodeAuthError, Instant)>>,
    in_flight: tokio::sync::Semaphore,
}

impl KubeNodes {
    /// Watches every Pod (the index) and reviews tokens for `audience`.
    pub fn start(client: Client, audience: String) -> Arc<KubeNodes> {
        let (changed, _) = tokio::sync::watch::channel(0u64);
        let pods = spawn_reflector_trimmed(
            "pods (node binding)".into(),
            Api::<Pod>::all(client.clone()),
            watcher::Config::default(),
            (),
            changed,
            trim_pod,
        );
        Arc::new(KubeNodes {
            client,
            pods,
            audience,
            reviews: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            in_flight: tokio::sync::Semaphore::new(MAX_REVIEWS_IN_FLIGHT),
        })
    }

    pub fn synced(&self) -> bool {
        self.pods.synced()
    }

    fn pod(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        self.pods.store.get(&ObjectRef::new(name).within(namespace))
    }

    async fn review(&self, token: &str) -> Result<Arc<Reviewed>, NodeAuthError> {
        if let Some((e, _)) = self
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            .filter(|(_, at)| at.elapsed() < NEGATIVE_TTL)
        {
            return Err(e.clone());
        }
        let result = self.review_uncached(token).await;
        if let Err(e @ (NodeAuthError::BadToken(_) | NodeAuthError::WrongTokenOwner { .. })) = &result {
            let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
            if refused.len() >= REVIEW_CACHE_MAX {
                refused.retain(|_, (_, at)| at.elapsed() < NEGATIVE_TTL);
                if refused.len() >= REVIEW_CACHE_MAX {
                    refused.clear();
                }
            }
            refused.insert(token.to_string(), (e.clone(), Instant::now()));
        }
        result
    }

    async fn review_uncached(&self, token: &str) -> Result<Arc<Reviewed>, NodeAuthError> {
        if let Some(r) = self
            .reviews
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            .filter(|r| r.at.elapsed() < REVIEW_TTL)
        {
            return Ok(r.clone());
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let _permit = tokio::time::timeout(Duration::from_secs(5), self.in_flight.acquire())
            .await
            .map_err(|_| NodeAuthError::Unavailable("too many token reviews in flight".into()))?
            .map_err(|_| NodeAuthError::Unavailable("shutting down".into()))?;
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            Api::<TokenReview>::all(self.client.clone()).create(&PostParams::default(), &review),
        )
        .await
        .map_err(|_| NodeAuthError::Unavailable("the TokenReview timed out".into()))?
        .map_err(|e| NodeAuthError::Unavailable(e.to_string()))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(NodeAuthError::BadToken(
                status.error.unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        // The API server names the audiences it validated; ours must be one.
        if !status
            .audiences
            .as_ref()
            .is_some_and(|a| a.contains(&self.audience))
        {
            return Err(NodeAuthError::BadToken(format!(
                "not issued for the audience {}",
                self.audience
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let extra = user.extra.unwrap_or_default();
        let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        let (Some(pod), Some(uid)) = (first(EXTRA_POD_NAME), first(EXTRA_POD_UID)) else {
            return Err(NodeAuthError::BadToken(
                "not bound to a pod: mount a projected service-account token".into(),
            ));
        };
        let namespace = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|r| r.split_once(':'))
            .map(|(ns, _)| ns.to_string())
            .ok_or_else(|| NodeAuthError::BadToken(format!("{username} is not a service account")))?;
        let reviewed = Arc::new(Reviewed {
            username,
            namespace,
            pod,
            uid,
            at: Instant::now(),
        });
        let mut cache = self.reviews.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= REVIEW_CACHE_MAX {
            cache.retain(|_, r| r.at.elapsed() < REVIEW_TTL);
            if cache.len() >= REVIEW_CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(token.to_string(), reviewed.clone());
        Ok(reviewed)
    }

    /// The node of the agent whose pod-bound token this is; the token must
    /// belong to the service account of the agent's certificate.
    async fn agent_node(&self, agent: &SpiffeId, token: &str) -> Result<String, NodeAuthError> {
        let r = self.review(token).await?;
        let (namespace, username) = (r.namespace.as_str(), r.username.as_str());
        let expected = format!(
            "system:serviceaccount:{}:{}",
            agent.namespace().unwrap_or("-"),
            agent.service_account().unwrap_or("-")
        );
        if username != expected {
            return Err(NodeAuthError::WrongTokenOwner {
                expected,
                actual: username.to_string(),
            });
        }
        let id = format!("{namespace}/{}", r.pod);
        let pod = self
            .pod(namespace, &r.pod)
            .ok_or_else(|| NodeAuthError::UnknownAgentPod(id.clone()))?;
        if pod.metadata.uid.as_deref() != Some(r.uid.as_str()) {
            return Err(NodeAuthError::UnknownAgentPod(format!("{id} (uid {})", r.uid)));
        }
        pod.spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .ok_or(NodeAuthError::UnknownAgentPod(format!("{id} (not scheduled)")))
    }

    fn check_workload(&self, node: &str, who: &WorkloadIdentity) -> Result<(), NodeAuthError> {
        let name = who.pod.as_deref().ok_or(NodeAuthError::NoPod)?;
        let id = format!("{}/{name}", who.namespace);
        let pod = self
            .pod(&who.namespace, name)
            .ok_or_else(|| NodeAuthError::UnknownPod(id.clone()))?;
        let spec = pod.spec.as_ref();
        let actual = spec.and_then(|s| s.node_name.clone()).unwrap_or_default();
        if actual != node {
            return Err(NodeAuthError::WrongNode {
                pod: id,
                actual: if actual.is_empty() {
                    "(none)".into()
                } else {
                    actual
                },
                agent_node: node.into(),
            });
        }
        // A pod without a service account (a mirror pod a node created for
        // itself) or one that has finished speaks for no one.
        let mirror = pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION));
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .unwrap_or("Pending");
        if mirror || matches!(phase, "Succeeded" | "Failed") {
            return Err(NodeAuthError::NotAWorkload {
                pod: id,
                why: if mirror {
                    "a mirror (static) pod"
                } else {
                    "finished"
                },
            });
        }
        let sa = spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| NodeAuthError::NotAWorkload {
                pod: id.clone(),
                why: "without a service account",
            })?;
        if sa != who.service_account {
            return Err(NodeAuthError::WrongServiceAccount {
                pod: id,
                actual: sa,
                asserted: who.service_account.clone(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(ns: &str, sa: &str) -> WorkloadIdentity {
        WorkloadIdentity {
            spiffe: SpiffeId::workload("cluster.local", ns, sa),
            namespace: ns.into(),
            service_account: sa.into(),
            pod: Some(format!("{sa}-0")),
            node: None,
        }
    }

    fn agent(node: Option<&str>) -> AgentPeer {
        AgentPeer {
            id: SpiffeId::workload("cluster.local", "llm-egress", "llm-egress-agent"),
            node: node.map(str::to_string),
        }
    }

    #[tokio::test]
    async fn static_nodes_assert_only_their_mapped_workloads() {
        let nodes =
            StaticNodes::parse("nodes:\n  node-a: [default/sleep, team-a/*]\n  node-b: ['*']\n").unwrap();
        let auth = NodeAuth::Static(nodes);
        let a = agent(Some("node-a"));
        assert_eq!(
            auth.verify(&a, &who("default", "sleep"), None).await,
            Ok(Some("node-a".into()))
        );
        assert!(auth.verify(&a, &who("team-a", "anything"), None).await.is_ok());
        assert_eq!(
            auth.verify(&a, &who("kube-system", "admin"), None).await,
            Err(NodeAuthError::NotMapped {
                node: "node-a".into(),
                workload: "kube-system/admin".into()
            })
        );
        assert!(auth
            .verify(&agent(Some("node-b")), &who("kube-system", "admin"), None)
            .await
            .is_ok());
        assert!(auth
            .verify(&agent(Some("node-c")), &who("default", "sleep"), None)
            .await
            .is_err());
        assert_eq!(
            auth.verify(&agent(None), &who("default", "sleep"), None).await,
            Err(NodeAuthError::NoNodeInCertificate)
        );
    }

    #[test]
    fn bad_mappings_are_refused() {
        for bad in ["nodes: {a: [default]}", "nodes: {a: ['/x']}", "nodez: {}"] {
            assert!(StaticNodes::parse(bad).is_err(), "{bad}");
        }
    }
}

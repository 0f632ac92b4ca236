//! Resources from the Kubernetes API: the six kinds of `resources`, watched
//! with kube-rs reflectors (list, then watch; re-listed after an API server
//! restart with backoff).
//!
//! Each object is parsed and validated on its own. An invalid new version of
//! an object keeps that object's last good version in force, and an object
//! that was never valid is left out, so one bad resource never takes the rest
//! of the configuration down. Problems are logged once per object version and,
//! where the caller asks (the gateway), written to the object's status.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Debug,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
    runtime::{
        reflector::{self, store::Writer, Store},
        watcher, WatchStreamExt,
    },
    Client, Resource, ResourceExt,
};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::{
    resources::{Problem, ResourceSet, Severity},
    scope::{self, Scope},
};

/// A kind the gateway and agent read from the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchedKind {
    pub kind: &'static str,
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
}

impl WatchedKind {
    pub fn api_resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(self.group, self.version, self.kind),
            self.plural,
        )
    }
}

pub const LLM_PROVIDER: WatchedKind = WatchedKind {
    kind: "LLMProvider",
    group: "istio.alibabacloud.com",
    version: "v1beta1",
    plural: "llmproviders",
};
pub const LLM_ROUTE: WatchedKind = WatchedKind {
    kind: "LLMRoute",
    group: "istio.alibabacloud.com",
    version: "v1beta1",
    plural: "llmroutes",
};
pub const AUTHORIZATION_POLICY: WatchedKind = WatchedKind {
    kind: "AuthorizationPolicy",
    group: "security.istio.io",
    version: "v1beta1",
    plural: "authorizationpolicies",
};
pub const REQUEST_AUTHENTICATION: WatchedKind = WatchedKind {
    kind: "RequestAuthentication",
    group: "security.istio.io",
    version: "v1beta1",
    plural: "requestauthentications",
};
pub const GATEWAY: WatchedKind = WatchedKind {
    kind: "Gateway",
    group: "networking.istio.io",
    version: "v1beta1",
    plural: "gateways",
};
pub const LLM_TOKEN_BUDGET: WatchedKind = WatchedKind {
    kind: "LLMTokenBudget",
    group: "llm-egress.io",
    version: "v1alpha1",
    plural: "llmtokenbudgets",
};
pub const ALL_KINDS: [WatchedKind; 6] = [
    LLM_PROVIDER,
    LLM_ROUTE,
    AUTHORIZATION_POLICY,
    REQUEST_AUTHENTICATION,
    GATEWAY,
    LLM_TOKEN_BUDGET,
];

/// What `Problem::file` says for a resource read from the API.
pub const API_ORIGIN: &str = "kubernetes";

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot read kubeconfig {path}: {source}; pass a readable file with --kubeconfig")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error(
        "cannot configure the Kubernetes client: {0}; run in a pod with a service account, or pass --kubeconfig"
    )]
    Config(String),
    #[error("the Kubernetes API did not list {what} within {seconds} s: {last_error}")]
    NotSynced {
        what: String,
        seconds: u64,
        last_error: String,
    },
}

/// A client from `kubeconfig`, or in-cluster configuration, or `$KUBECONFIG`.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|source| KubeError::Kubeconfig {
                path: path.to_owned(),
                source,
            })?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| KubeError::Config(e.to_string()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeError::Config(e.to_string()))?,
    };
    Client::try_from(config).map_err(|e| KubeError::Config(e.to_string()))
}

/// One watched collection: its store, whether its first list completed, and
/// its last error (for `/readyz` and startup errors).
pub struct Watched<K: Resource + 'static>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    pub what: String,
    pub store: Store<K>,
    synced: Arc<AtomicBool>,
    last_error: Arc<Mutex<Option<String>>>,
}

impl<K: Resource + 'static> Watched<K>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Starts a reflector for `api`; `changed` is bumped after every event that
/// changes the store. A kind the API server does not serve (CRD missing) is
/// reported and counts as an empty, synced collection until it appears.
pub fn spawn_reflector<K>(
    what: String,
    api: Api<K>,
    config: watcher::Config,
    dyntype: K::DynamicType,
    changed: watch::Sender<u64>,
) -> Watched<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    spawn_reflector_trimmed(what, api, config, dyntype, changed, |_| {})
}

/// `spawn_reflector`, keeping only what `trim` leaves of each object (an
/// index of every Pod must not hold every Pod's full spec).
pub fn spawn_reflector_trimmed<K>(
    what: String,
    api: Api<K>,
    config: watcher::Config,
    dyntype: K::DynamicType,
    changed: watch::Sender<u64>,
    trim: impl FnMut(&mut K) + Send + 'static,
) -> Watched<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let writer = Writer::new(dyntype);
    let store = writer.as_reader();
    let synced = Arc::new(AtomicBool::new(false));
    let last_error = Arc::new(Mutex::new(None));
    let (synced2, last_error2, what2) = (synced.clone(), last_error.clone(), what.clone());
    tokio::spawn(async move {
        let stream = reflector::reflector(writer, watcher(api, config).default_backoff().modify(trim));
        futures::pin_mut!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
                Ok(_) => {
                    let was_failing = last_error2.lock().unwrap_or_else(|p| p.into_inner()).take();
                    if was_failing.is_some() {
                        tracing::info!(what = %what2, "watching the Kubernetes API again");
                    }
                    synced2.store(true, Ordering::Release);
                    changed.send_modify(|g| *g += 1);
                }
                Err(e) => {
                    let missing =
                        matches!(&e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404);
                    let message = if missing {
                        format!(
                            "{what2} is not served by the API server; install its CustomResourceDefinition"
                        )
                    } else {
                        e.to_string()
                    };
                    let mut last = last_error2.lock().unwrap_or_else(|p| p.into_inner());
                    if last.as_deref() != Some(message.as_str()) {
                        tracing::warn!(what = %what2, error = %message, "Kubernetes watch failed; retrying with backoff, keeping what was last seen");
                    }
                    *last = Some(message);
                    if missing && !synced2.swap(true, Ordering::AcqRel) {
                        changed.send_modify(|g| *g += 1);
                    }
                }
            }
        }
    });
    Watched {
        what,
        store,
        synced,
        last_error,
    }
}

/// The verdict on one object version.
#[derive(Debug, Clone)]
struct Checked {
    /// What the check depends on: uid, generation (spec) and labels.
    fingerprint: u64,
    /// The object alone as a resource set, if it is valid.
    valid: Option<ResourceSet>,
    problems: Vec<Problem>,
}

/// The mesh resources as the API server has them.
pub struct KubeResources {
    client: Client,
    kinds: Vec<(WatchedKind, Watched<DynamicObject>)>,
    secret: Option<Watched<Secret>>,
    changed: watch::Sender<u64>,
    checked: Mutex<HashMap<String, Checked>>,
    last_good: Mutex<HashMap<String, (String, ResourceSet)>>,
    /// Each object's verdict from the last `load`, for `report`.
    verdicts: Mutex<Vec<Verdict>>,
    /// Status last written per object: (generation, message).
    reported: Mutex<HashMap<String, (i64, String)>>,
    /// Scoping verdicts of the last `load`, logged when they change.
    scoped_out: Mutex<HashSet<String>>,
}

/// The condition written to an object's status.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub kind: WatchedKind,
    pub namespace: String,
    pub name: String,
    pub generation: i64,
    /// Empty when accepted.
    pub problems: Vec<String>,
    /// The `Accepted` condition the object carries now: (observedGeneration,
    /// message), so that a restarted gateway (or another replica) does not
    /// write what is already there.
    pub current: Option<(i64, String)>,
}

/// The object's `Accepted` condition, as `report` writes it.
fn current_condition(obj: &DynamicObject) -> Option<(i64, String)> {
    let conditions = obj.data.get("status")?.get("conditions")?.as_array()?;
    let accepted = conditions.iter().find(|c| c["type"] == "Accepted")?;
    Some((
        accepted["observedGeneration"].as_i64()?,
        accepted["message"].as_str()?.to_string(),
    ))
}

impl KubeResources {
    /// Watches `kinds` in every namespace, and `secret` (namespace, name) if
    /// given: the API keys the gateway may read.
    pub fn start(client: Client, kinds: &[WatchedKind], secret: Option<(&str, &str)>) -> Arc<KubeResources> {
        let (changed, _) = watch::channel(0u64);
        let kinds = kinds
            .iter()
            .map(|k| {
                let ar = k.api_resource();
                let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
                let w = spawn_reflector(
                    format!("{} ({}/{})", k.plural, k.group, k.version),
                    api,
                    watcher::Config::default(),
                    ar,
                    changed.clone(),
                );
                (*k, w)
            })
            .collect();
        let secret = secret.map(|(ns, name)| {
            spawn_reflector(
                format!("Secret {ns}/{name}"),
                Api::<Secret>::namespaced(client.clone(), ns),
                watcher::Config::default().fields(&format!("metadata.name={name}")),
                (),
                changed.clone(),
            )
        });
        Arc::new(KubeResources {
            client,
            kinds,
            secret,
            changed,
            checked: Mutex::new(HashMap::new()),
            last_good: Mutex::new(HashMap::new()),
            verdicts: Mutex::new(Vec::new()),
            reported: Mutex::new(HashMap::new()),
            scoped_out: Mutex::new(HashSet::new()),
        })
    }

    /// Changes when the resources' specs or labels, or the Secret, change;
    /// not when only a status does (so writing status triggers no reload).
    pub fn stamp(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for (kind, watched) in &self.kinds {
            let mut objects: Vec<(String, String, u64)> = watched
                .store
                .state()
                .iter()
                .map(|o| {
                    (
                        o.namespace().unwrap_or_default(),
                        o.name_any(),
                        object_fingerprint(o),
                    )
                })
                .collect();
            objects.sort();
            (kind.kind, objects).hash(&mut h);
        }
        if let Some(secret) = &self.secret {
            for s in secret.store.state() {
                s.metadata.resource_version.hash(&mut h);
            }
        }
        h.finish()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn all_synced(&self) -> bool {
        self.kinds.iter().all(|(_, w)| w.synced()) && self.secret.as_ref().is_none_or(|s| s.synced())
    }

    /// Errors of collections that currently fail to watch.
    pub fn watch_errors(&self) -> Vec<String> {
        let mut out: Vec<String> = self.kinds.iter().filter_map(|(_, w)| w.last_error()).collect();
        out.extend(self.secret.as_ref().and_then(|s| s.last_error()));
        out
    }

    /// Waits for the first complete list of everything.
    pub async fn wait_synced(&self, timeout: Duration) -> Result<(), KubeError> {
        let done = tokio::time::timeout(timeout, async {
            while !self.all_synced() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        done.map_err(|_| {
            let pending: Vec<String> = self
                .kinds
                .iter()
                .filter(|(_, w)| !w.synced())
                .map(|(_, w)| w.what.clone())
                .chain(self.secret.iter().filter(|s| !s.synced()).map(|s| s.what.clone()))
                .collect();
            KubeError::NotSynced {
                what: pending.join(", "),
                seconds: timeout.as_secs(),
                last_error: self.watch_errors().join("; "),
            }
        })
    }

    /// A value of the watched Secret, if it has that key.
    pub fn secret_value(&self, key: &str) -> Option<String> {
        let secret = self.secret.as_ref()?.store.state().into_iter().next()?;
        let bytes = secret.data.as_ref()?.get(key)?;
        String::from_utf8(bytes.0.clone()).ok()
    }

    /// The current resources, each object checked on its own (see the module
    /// comment) and then against `scope` (which namespaces may publish
    /// what, route conflicts), and the problems found. Each object's verdict
    /// is kept for `report`, whether or not the set as a whole compiles.
    pub fn load(&self, scope: &Scope) -> (ResourceSet, Vec<Problem>) {
        let mut set = ResourceSet::default();
        let mut problems = Vec::new();
        let mut verdicts = Vec::new();
        let mut checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
        let mut last_good = self.last_good.lock().unwrap_or_else(|p| p.into_inner());
        let mut present = Vec::new();
        for (kind, watched) in &self.kinds {
            for obj in watched.store.state() {
                let namespace = obj.namespace().unwrap_or_else(|| "default".into());
                let name = obj.name_any();
                let key = format!("{} {namespace}/{name}", kind.kind);
                let uid = obj.uid().unwrap_or_default();
                let generation = obj.meta().generation.unwrap_or(0);
                present.push(key.clone());
                let fingerprint = object_fingerprint(&obj);
                let fresh = checked.get(&key).is_some_and(|c| c.fingerprint == fingerprint);
                if !fresh {
                    let c = check_object(kind, &obj, fingerprint);
                    for p in &c.problems {
                        match p.severity {
                            Severity::Error => {
                                tracing::error!(problem = %p, "resource rejected; its last good version (if any) stays in force")
                            }
                            Severity::Warning => tracing::warn!(problem = %p, "resource warning"),
                        }
                    }
                    if let Some(valid) = &c.valid {
                        last_good.insert(key.clone(), (uid.clone(), valid.clone()));
                    }
                    checked.insert(key.clone(), c);
                }
                let Some(c) = checked.get(&key) else { continue };
                problems.extend(c.problems.iter().cloned());
                verdicts.push(Verdict {
                    kind: *kind,
                    namespace,
                    name,
                    generation,
                    problems: c
                        .problems
                        .iter()
                        .filter(|p| p.severity == Severity::Error)
                        .map(short_problem)
                        .collect(),
                    current: current_condition(&obj),
                });
                match last_good.get(&key) {
                    Some((good_uid, good)) if *good_uid == uid => set.merge(good.clone()),
                    _ => {}
                }
            }
        }
        checked.retain(|k, _| present.contains(k));
        last_good.retain(|k, _| present.contains(k));
        // Scoping depends on the other objects, so it is decided on the
        // whole set, every time; an object it removes is not accepted.
        let scoped = scope::admit(&mut set, scope);
        let mut logged = self.scoped_out.lock().unwrap_or_else(|p| p.into_inner());
        let index: HashMap<String, usize> = verdicts
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("{} {}/{}", v.kind.kind, v.namespace, v.name), i))
            .collect();
        let now: HashSet<String> = scoped.iter().map(|p| p.to_string()).collect();
        for p in &scoped {
            if !logged.contains(&p.to_string()) {
                tracing::warn!(problem = %p, "resource not accepted");
            }
            if let Some(&i) = p.resource.as_ref().and_then(|r| index.get(r)) {
                verdicts[i].problems.push(short_problem(p));
            }
        }
        *logged = now;
        problems.extend(scoped);
        *self.verdicts.lock().unwrap_or_else(|p| p.into_inner()) = verdicts;
        (set, problems)
    }

    /// Writes an `Accepted` condition to the status of each object whose
    /// verdict (from the last `load`) changed. Failures are logged, never fatal.
    pub async fn report(&self) {
        let verdicts = self.verdicts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for v in &verdicts {
            let key = format!("{} {}/{}", v.kind.kind, v.namespace, v.name);
            let message = if v.problems.is_empty() {
                "accepted by llm-egress".to_string()
            } else {
                v.problems.join("; ")
            };
            let unchanged = self
                .reported
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
                .is_some_and(|(g, m)| *g == v.generation && *m == message)
                || v.current.as_ref() == Some(&(v.generation, message.clone()));
            if unchanged {
                continue;
            }
            let accepted = v.problems.is_empty();
            let status = serde_json::json!({
                "status": {
                    "conditions": [{
                        "type": "Accepted",
                        "status": if accepted { "True" } else { "False" },
                        "reason": if accepted { "Accepted" } else { "Invalid" },
                        "message": message,
                        "observedGeneration": v.generation,
                        "lastTransitionTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
                    }]
                }
            });
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), &v.namespace, &v.kind.api_resource());
            match api
                .patch_status(&v.name, &PatchParams::default(), &Patch::Merge(&status))
                .await
            {
                Ok(_) => {
                    self.reported
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key, (v.generation, message));
                }
                Err(e) => {
                    tracing::warn!(resource = %key, error = %e, "cannot write the resource's status (the problem is still logged above)");
                    // Remember anyway: retrying every change would flood the API server.
                    self.reported
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key, (v.generation, message));
                }
            }
        }
        let present: Vec<String> = verdicts
            .iter()
            .map(|v| format!("{} {}/{}", v.kind.kind, v.namespace, v.name))
            .collect();
        self.reported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| present.contains(k));
    }
}

fn short_problem(p: &Problem) -> String {
    match &p.field {
        Some(f) => format!("{f}: {}", p.message),
        None => p.message.clone(),
    }
}

/// Parses and validates one object on its own.
/// Changes when what a check reads changes: not on status updates, which
/// bump only the resourceVersion (the status subresource keeps
/// `generation` for spec changes).
fn object_fingerprint(obj: &DynamicObject) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    obj.uid().hash(&mut h);
    obj.meta().generation.hash(&mut h);
    obj.labels().hash(&mut h);
    h.finish()
}

fn check_object(kind: &WatchedKind, obj: &DynamicObject, fingerprint: u64) -> Checked {
    let mut metadata = serde_json::Map::new();
    metadata.insert("name".into(), obj.name_any().into());
    if let Some(ns) = obj.namespace() {
        metadata.insert("namespace".into(), ns.into());
    }
    let labels: BTreeMap<String, String> = obj.labels().clone().into_iter().collect();
    metadata.insert("labels".into(), serde_json::to_value(labels).unwrap_or_default());
    if let Some(created) = obj.creation_timestamp() {
        metadata.insert("creationTimestamp".into(), created.0.to_string().into());
    }
    let mut doc = serde_json::Map::new();
    doc.insert(
        "apiVersion".into(),
        format!("{}/{}", kind.group, kind.version).into(),
    );
    doc.insert("kind".into(), kind.kind.into());
    doc.insert("metadata".into(), metadata.into());
    if let Some(spec) = obj.data.get("spec") {
        doc.insert("spec".into(), spec.clone());
    }
    let origin = PathBuf::from(API_ORIGIN);
    let mut set = ResourceSet::default();
    let mut problems = match serde_yaml_ng::to_string(&serde_json::Value::Object(doc)) {
        Ok(text) => set.add_text(&origin, &text),
        Err(e) => vec![Problem {
            severity: Severity::Error,
            file: origin.clone(),
            resource: Some(format!(
                "{} {}/{}",
                kind.kind,
                obj.namespace().unwrap_or_default(),
                obj.name_any()
            )),
            field: None,
            message: format!("cannot be read: {e}"),
        }],
    };
    problems.extend(set.validate());
    let valid = (!problems.iter().any(|p| p.severity == Severity::Error)).then_some(set);
    Checked {
        fingerprint,
        valid,
        problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(kind: &WatchedKind, name: &str, spec: serde_json::Value) -> DynamicObject {
        let mut o = DynamicObject::new(name, &kind.api_resource()).within("default");
        o.data = serde_json::json!({ "spec": spec });
        o
    }

    #[test]
    fn the_current_accepted_condition_is_read_back() {
        let mut o = object(&LLM_ROUTE, "r", serde_json::json!({}));
        assert_eq!(current_condition(&o), None);
        o.data["status"] = serde_json::json!({"conditions": [
            {"type": "Other", "observedGeneration": 1, "message": "x"},
            {"type": "Accepted", "status": "False", "observedGeneration": 3, "message": "spec.host: missing"},
        ]});
        assert_eq!(current_condition(&o), Some((3, "spec.host: missing".to_string())));
    }

    #[test]
    fn a_valid_route_becomes_a_resource_set_of_one() {
        let o = object(
            &LLM_ROUTE,
            "r",
            serde_json::json!({"host": "a.example", "rules": [{"backendRefs": [{"providerHost": "gw"}]}]}),
        );
        let c = check_object(&LLM_ROUTE, &o, 1);
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        let set = c.valid.unwrap();
        assert_eq!(set.routes.len(), 1);
        assert_eq!(set.routes[0].spec.host, "a.example");
        assert_eq!(set.routes[0].meta.namespace(), "default");
    }

    #[test]
    fn a_route_without_host_and_a_policy_with_an_unknown_action_are_rejected_with_their_field() {
        let o = object(
            &LLM_ROUTE,
            "r",
            serde_json::json!({"rules": [{"backendRefs": [{"providerHost": "gw"}]}]}),
        );
        let c = check_object(&LLM_ROUTE, &o, 1);
        assert!(c.valid.is_none());
        assert!(short_problem(&c.problems[0]).contains("host"), "{:?}", c.problems);
        let o = object(&AUTHORIZATION_POLICY, "p", serde_json::json!({"action": "MAYBE"}));
        let c = check_object(&AUTHORIZATION_POLICY, &o, 2);
        assert!(c.valid.is_none());
        assert_eq!(
            c.problems[0].field.as_deref(),
            Some("spec.action"),
            "{:?}",
            c.problems
        );
        assert_eq!(c.problems[0].file, PathBuf::from(API_ORIGIN));
    }
}

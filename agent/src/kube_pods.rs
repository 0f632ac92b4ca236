//! Kubernetes workload source: the Pods scheduled on this node (watched with
//! a `spec.nodeName` field selector) and the namespaces' labels. A pod is
//! enrolled when it or its namespace carries `llm-egress.io/capture=enabled`;
//! a pod label `disabled` opts it out. Its cgroup is found by UID under the
//! cgroup root, whatever the kubelet's cgroup driver (cgroupfs `pod<uid>`,
//! systemd `…-pod<uid_with_underscores>.slice`) and QoS class, also when
//! nested below a kubelet cgroup root (kind).

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    api::Api,
    runtime::{reflector::Store, watcher},
    Client, ResourceExt,
};
use llm_egress_config::kube_watch::{spawn_reflector, Watched};
use tokio::sync::watch;

use crate::registry::{RegistryError, WorkloadSource, WorkloadSpec};

pub const CAPTURE_LABEL: &str = "llm-egress.io/capture";

/// How deep below the cgroup root pod cgroups are looked for.
const MAX_DEPTH: usize = 6;

pub struct KubePodSource {
    node: String,
    cgroup_root: PathBuf,
    pods: Watched<Pod>,
    namespaces: Watched<Namespace>,
    changed: watch::Receiver<u64>,
    last: Option<Vec<WorkloadSpec>>,
    /// Pod UID → its cgroup directory, from the last walk.
    cgroups: HashMap<String, PathBuf>,
    problems: Vec<String>,
}

impl KubePodSource {
    pub fn start(client: Client, node: &str, cgroup_root: PathBuf) -> KubePodSource {
        let (tx, changed) = watch::channel(0u64);
        let pods = spawn_reflector(
            format!("Pods on node {node}"),
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={node}")),
            (),
            tx.clone(),
        );
        let namespaces = spawn_reflector(
            "Namespaces".into(),
            Api::<Namespace>::all(client),
            watcher::Config::default(),
            (),
            tx,
        );
        KubePodSource {
            node: node.to_string(),
            cgroup_root,
            pods,
            namespaces,
            changed,
            last: None,
            cgroups: HashMap::new(),
            problems: Vec::new(),
        }
    }

    fn desired(&mut self) -> Vec<WorkloadSpec> {
        let namespace_enrolled: HashMap<String, bool> = self
            .namespaces
            .store
            .state()
            .iter()
            .map(|ns| {
                (
                    ns.name_any(),
                    ns.labels().get(CAPTURE_LABEL).map(String::as_str) == Some("enabled"),
                )
            })
            .collect();
        let pods = enrolled_pods(&self.pods.store, &namespace_enrolled);
        if pods
            .iter()
            .any(|p| self.cgroups.get(&p.uid).is_none_or(|dir| !dir.is_dir()))
        {
            self.cgroups = index_pod_cgroups(&self.cgroup_root);
        }
        let mut specs = Vec::new();
        let mut problems = Vec::new();
        for p in pods {
            match self.cgroups.get(&p.uid) {
                Some(dir) => specs.push(WorkloadSpec {
                    namespace: p.namespace,
                    service_account: p.service_account,
                    name: p.name,
                    cgroup_path: dir.clone(),
                }),
                None => problems.push(format!(
                    "{}/{}: no cgroup for pod UID {} under {} yet (is the container started, and is --cgroup-root the host's cgroup2 mount?)",
                    p.namespace,
                    p.name,
                    p.uid,
                    self.cgroup_root.display()
                )),
            }
        }
        specs.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        self.problems = problems;
        specs
    }
}

impl WorkloadSource for KubePodSource {
    fn poll(&mut self) -> Result<Option<Vec<WorkloadSpec>>, RegistryError> {
        if !(self.pods.synced() && self.namespaces.synced()) {
            return match self.pods.last_error().or(self.namespaces.last_error()) {
                Some(e) => Err(RegistryError::Kubernetes(e)),
                None => Ok(None),
            };
        }
        let specs = self.desired();
        let error = self.pods.last_error().or(self.namespaces.last_error());
        if self.last.as_ref() == Some(&specs) {
            return match error {
                Some(e) => Err(RegistryError::Kubernetes(e)),
                None => Ok(None),
            };
        }
        self.last = Some(specs.clone());
        Ok(Some(specs))
    }

    fn describe(&self) -> String {
        format!("Kubernetes Pods on node {}", self.node)
    }

    fn problems(&self) -> Vec<String> {
        self.problems.clone()
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.changed.clone())
    }
}

#[derive(Debug, PartialEq)]
struct EnrolledPod {
    uid: String,
    namespace: String,
    name: String,
    service_account: String,
}

/// Pods to capture: labelled (or in a labelled namespace), not opted out,
/// not finished.
fn enrolled_pods(pods: &Store<Pod>, namespace_enrolled: &HashMap<String, bool>) -> Vec<EnrolledPod> {
    pods.state()
        .iter()
        .filter(|pod| {
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            !matches!(phase, Some("Succeeded" | "Failed"))
        })
        .filter(|pod| {
            let namespace = pod.namespace().unwrap_or_default();
            enrolled(
                pod.labels(),
                namespace_enrolled.get(&namespace).copied().unwrap_or(false),
            )
        })
        .filter_map(|pod| {
            Some(EnrolledPod {
                uid: pod.uid()?,
                namespace: pod.namespace()?,
                name: pod.name_any(),
                service_account: pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "default".into()),
            })
        })
        .collect()
}

fn enrolled(pod_labels: &BTreeMap<String, String>, namespace_enrolled: bool) -> bool {
    match pod_labels.get(CAPTURE_LABEL).map(String::as_str) {
        Some("enabled") => true,
        Some("disabled") => false,
        _ => namespace_enrolled,
    }
}

/// The pod UID a kubelet cgroup directory name stands for, if any:
/// `pod<uid>` (cgroupfs) or `<prefix>-pod<uid with '_'>.slice` (systemd).
fn pod_uid_of(dir_name: &str) -> Option<String> {
    let name = dir_name.strip_suffix(".slice").unwrap_or(dir_name);
    let (before, uid) = name.rsplit_once("pod")?;
    if !(before.is_empty() || before.ends_with('-')) {
        return None;
    }
    let uid = uid.replace('_', "-");
    let looks_like_uid = uid.len() == 36 && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    looks_like_uid.then_some(uid)
}

/// Walks the cgroup tree (bounded depth, not into pod cgroups) for pod
/// cgroup directories.
fn index_pod_cgroups(root: &Path) -> HashMap<String, PathBuf> {
    let mut found = HashMap::new();
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = e.path();
            match e.file_name().to_str().and_then(pod_uid_of) {
                Some(uid) => {
                    found.insert(uid, path);
                }
                None if depth + 1 < MAX_DEPTH => stack.push((path, depth + 1)),
                None => {}
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1c2d3e-4a5b-6c7d-8e9f-a0b1c2d3e4f5";

    #[test]
    fn pod_uids_are_read_from_every_kubelet_layout() {
        let underscored = UID.replace('-', "_");
        for name in [
            format!("pod{UID}"),
            format!("kubepods-pod{underscored}.slice"),
            format!("kubepods-burstable-pod{underscored}.slice"),
            format!("kubepods-besteffort-pod{underscored}.slice"),
            format!("kubelet-kubepods-besteffort-pod{underscored}.slice"),
        ] {
            assert_eq!(pod_uid_of(&name).as_deref(), Some(UID), "{name}");
        }
        for name in [
            "kubepods",
            "burstable",
            "kubepods-burstable.slice",
            "podman",
            "cri-containerd-abc.scope",
        ] {
            assert_eq!(pod_uid_of(name), None, "{name}");
        }
    }

    #[test]
    fn pod_cgroups_are_found_under_cgroupfs_systemd_and_nested_roots() {
        let root = tempfile::tempdir().unwrap();
        let u = |n: u8| format!("{n:08x}-0000-4000-8000-000000000000");
        let layouts = [
            (u(1), format!("kubepods/pod{}", u(1))),
            (u(2), format!("kubepods/burstable/pod{}", u(2))),
            (u(3), format!("kubepods/besteffort/pod{}", u(3))),
            (u(4), format!("kubepods.slice/kubepods-pod{}.slice", u(4).replace('-', "_"))),
            (
                u(5),
                format!(
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
                    u(5).replace('-', "_")
                ),
            ),
            (
                u(6),
                format!(
                    "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{}.slice",
                    u(6).replace('-', "_")
                ),
            ),
        ];
        for (_, dir) in &layouts {
            std::fs::create_dir_all(root.path().join(dir).join("container-1")).unwrap();
        }
        let index = index_pod_cgroups(root.path());
        assert_eq!(index.len(), layouts.len(), "{index:?}");
        for (uid, dir) in &layouts {
            assert_eq!(index[uid], root.path().join(dir));
        }
    }

    fn pod(ns: &str, name: &str, phase: &str, sa: Option<&str>, label: Option<&str>) -> Pod {
        let mut v = serde_json::json!({
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
            "spec": {"containers": [{"name": "c"}]},
            "status": {"phase": phase},
        });
        if let Some(sa) = sa {
            v["spec"]["serviceAccountName"] = sa.into();
        }
        if let Some(l) = label {
            v["metadata"]["labels"] = serde_json::json!({ CAPTURE_LABEL: l });
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn finished_pods_are_left_out_and_the_service_account_defaults() {
        let (store, mut writer) = kube::runtime::reflector::store::<Pod>();
        writer.apply_watcher_event(&watcher::Event::Init);
        for p in [
            pod("a", "running", "Running", Some("sleep"), None),
            pod("a", "pending", "Pending", None, None),
            pod("a", "done", "Succeeded", Some("sleep"), None),
            pod("a", "failed", "Failed", Some("sleep"), None),
            pod("b", "unlabelled", "Running", Some("x"), None),
            pod("b", "labelled", "Running", Some("x"), Some("enabled")),
        ] {
            writer.apply_watcher_event(&watcher::Event::InitApply(p));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let namespaces = HashMap::from([("a".to_string(), true), ("b".to_string(), false)]);
        let mut got: Vec<(String, String)> = enrolled_pods(&store, &namespaces)
            .into_iter()
            .map(|p| (p.name, p.service_account))
            .collect();
        got.sort();
        let want = [("labelled", "x"), ("pending", "default"), ("running", "sleep")];
        assert_eq!(got, want.map(|(a, b)| (a.to_string(), b.to_string())));
    }

    #[test]
    fn pod_label_overrides_the_namespace() {
        let labels = |v: Option<&str>| {
            v.map(|v| BTreeMap::from([(CAPTURE_LABEL.to_string(), v.to_string())]))
                .unwrap_or_default()
        };
        assert!(enrolled(&labels(Some("enabled")), false));
        assert!(enrolled(&labels(None), true));
        assert!(!enrolled(&labels(Some("disabled")), true));
        assert!(!enrolled(&labels(None), false));
        assert!(!enrolled(&labels(Some("yes")), false));
    }
}

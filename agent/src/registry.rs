//! Workload registry: which cgroups are enrolled for capture and who they
//! are. A `WorkloadSource` says which workloads should exist; the registry
//! resolves their cgroup directories to ids, keeps `ENROLLED` in sync and
//! answers "which workload is cgroup N" for the capture proxy.

use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{loader::Capture, preflight};

/// One workload as a source describes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSpec {
    pub namespace: String,
    pub service_account: String,
    pub name: String,
    /// The workload's cgroup v2 directory; relative paths are taken from the
    /// cgroup root. Processes in descendant cgroups belong to it too.
    pub cgroup_path: PathBuf,
}

/// A workload whose cgroup exists, with its kernel cgroup id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub spec: WorkloadSpec,
    pub cgroup_id: u64,
}

impl Workload {
    /// Istio-style principal, as used by AuthorizationPolicy.
    pub fn principal(&self) -> String {
        format!(
            "cluster.local/ns/{}/sa/{}",
            self.spec.namespace, self.spec.service_account
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read workload file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("workload file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("Kubernetes workload source: {0}")]
    Kubernetes(String),
    #[error("workload file {path}: workloads[{index}].{field}: {message}")]
    Invalid {
        path: PathBuf,
        index: usize,
        field: &'static str,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadFile {
    #[serde(default)]
    workloads: Vec<WorkloadSpec>,
}

/// Parses and validates a static workload file.
pub fn parse_workloads(path: &Path, text: &str) -> Result<Vec<WorkloadSpec>, RegistryError> {
    let file: WorkloadFile = if text.trim().is_empty() {
        WorkloadFile { workloads: vec![] }
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| RegistryError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?
    };
    let invalid = |index, field, message: String| RegistryError::Invalid {
        path: path.to_owned(),
        index,
        field,
        message,
    };
    let mut seen = HashSet::new();
    for (i, w) in file.workloads.iter().enumerate() {
        for (field, value) in [
            ("namespace", &w.namespace),
            ("serviceAccount", &w.service_account),
            ("name", &w.name),
        ] {
            if value.is_empty() {
                return Err(invalid(i, field, "must not be empty".into()));
            }
            if !value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
            {
                return Err(invalid(
                    i,
                    field,
                    format!("{value:?} may only hold letters, digits, '-', '.' and '_'"),
                ));
            }
        }
        if w.cgroup_path.as_os_str().is_empty() {
            return Err(invalid(i, "cgroupPath", "must not be empty".into()));
        }
        if !seen.insert(w.cgroup_path.clone()) {
            return Err(invalid(
                i,
                "cgroupPath",
                format!("{} is listed twice", w.cgroup_path.display()),
            ));
        }
    }
    Ok(file.workloads)
}

/// Where workloads come from: a static file, or the Pods of this node.
pub trait WorkloadSource: Send + 'static {
    /// The desired workloads, or `None` if nothing changed since last time.
    fn poll(&mut self) -> Result<Option<Vec<WorkloadSpec>>, RegistryError>;
    fn describe(&self) -> String;
    /// Workloads the source knows of but cannot hand over yet, and why.
    fn problems(&self) -> Vec<String> {
        Vec::new()
    }
    /// Bumped when the source may have changed: polled at once, not at the next tick.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// A YAML file of workloads, re-read when its content changes.
pub struct StaticFileSource {
    path: PathBuf,
    last: Option<String>,
}

impl StaticFileSource {
    pub fn new(path: PathBuf) -> Self {
        StaticFileSource { path, last: None }
    }
}

impl WorkloadSource for StaticFileSource {
    fn poll(&mut self) -> Result<Option<Vec<WorkloadSpec>>, RegistryError> {
        let text = std::fs::read_to_string(&self.path).map_err(|source| RegistryError::Read {
            path: self.path.clone(),
            source,
        })?;
        if self.last.as_deref() == Some(text.as_str()) {
            return Ok(None);
        }
        let specs = parse_workloads(&self.path, &text)?;
        self.last = Some(text);
        Ok(Some(specs))
    }

    fn describe(&self) -> String {
        format!("static file {}", self.path.display())
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrySnapshot {
    pub source: String,
    pub enrolled: Vec<Workload>,
    /// Workloads that could not be enrolled, and why.
    pub problems: Vec<String>,
    /// The last error reading the source; the last good list stays in force.
    pub source_error: Option<String>,
}

#[derive(Default)]
struct State {
    specs: Vec<WorkloadSpec>,
    by_cgroup: HashMap<u64, Arc<Workload>>,
    snapshot: RegistrySnapshot,
}

pub struct Registry {
    cgroup_root: PathBuf,
    /// Cgroup ids of the agent's own cgroup and its ancestors: enrolling one
    /// of them would capture the agent's own upstream connections.
    own_cgroups: HashSet<u64>,
    state: RwLock<State>,
}

impl Registry {
    pub fn new(cgroup_root: PathBuf, source: &dyn WorkloadSource) -> Registry {
        let own_cgroups = own_cgroup_ancestors();
        let state = State {
            snapshot: RegistrySnapshot {
                source: source.describe(),
                ..Default::default()
            },
            ..Default::default()
        };
        Registry {
            cgroup_root,
            own_cgroups,
            state: RwLock::new(state),
        }
    }

    pub fn workload(&self, cgroup_id: u64) -> Option<Arc<Workload>> {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_cgroup
            .get(&cgroup_id)
            .cloned()
    }

    pub fn snapshot(&self) -> RegistrySnapshot {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .snapshot
            .clone()
    }

    /// One reconciliation step: take what the source said, resolve cgroups,
    /// update ENROLLED. Errors from the source keep the last good list.
    /// `source_problems`: workloads the source knows of but cannot hand over.
    pub fn apply(
        &self,
        polled: Result<Option<Vec<WorkloadSpec>>, RegistryError>,
        source_problems: Vec<String>,
        capture: &Capture,
    ) -> Result<(), RegistryError> {
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        let result = match polled {
            Ok(Some(specs)) => {
                state.specs = specs;
                state.snapshot.source_error = None;
                Ok(())
            }
            Ok(None) => {
                state.snapshot.source_error = None;
                Ok(())
            }
            Err(e) => {
                if state.snapshot.source_error.as_deref() != Some(e.to_string().as_str()) {
                    tracing::warn!(error = %e, "workload source failed; keeping the last good workload list");
                }
                state.snapshot.source_error = Some(e.to_string());
                Err(e)
            }
        };

        let mut by_cgroup = HashMap::new();
        let mut problems = source_problems;
        for spec in &state.specs {
            match self.resolve_cgroup(&spec.cgroup_path) {
                Ok(id) => {
                    by_cgroup.insert(
                        id,
                        Arc::new(Workload {
                            spec: spec.clone(),
                            cgroup_id: id,
                        }),
                    );
                }
                Err(why) => problems.push(format!("{}/{}: {why}", spec.namespace, spec.name)),
            }
        }
        if by_cgroup.keys().collect::<HashSet<_>>() != state.by_cgroup.keys().collect::<HashSet<_>>()
            || by_cgroup.iter().any(|(id, w)| state.by_cgroup.get(id) != Some(w))
        {
            let ids: Vec<u64> = by_cgroup.keys().copied().collect();
            if let Err(e) = capture.sync_enrolled(&ids) {
                tracing::error!(error = %e, "updating the ENROLLED map failed");
                problems.push(format!("updating the ENROLLED map failed: {e}"));
            } else {
                for (id, w) in &by_cgroup {
                    if !state.by_cgroup.contains_key(id) {
                        tracing::info!(namespace = %w.spec.namespace, workload = %w.spec.name, service_account = %w.spec.service_account, cgroup_id = id, "workload enrolled");
                    }
                }
                for (id, w) in &state.by_cgroup {
                    if !by_cgroup.contains_key(id) {
                        tracing::info!(namespace = %w.spec.namespace, workload = %w.spec.name, cgroup_id = id, "workload unenrolled");
                    }
                }
                state.by_cgroup = by_cgroup;
            }
        }
        for p in problems.iter().filter(|p| !state.snapshot.problems.contains(p)) {
            tracing::warn!(problem = %p, "workload not enrolled");
        }
        let mut enrolled: Vec<Workload> = state.by_cgroup.values().map(|w| (**w).clone()).collect();
        enrolled.sort_by(|a, b| (&a.spec.namespace, &a.spec.name).cmp(&(&b.spec.namespace, &b.spec.name)));
        state.snapshot.enrolled = enrolled;
        state.snapshot.problems = problems;
        result
    }

    fn resolve_cgroup(&self, path: &Path) -> Result<u64, String> {
        let full = if path.is_absolute() {
            path.to_owned()
        } else {
            self.cgroup_root.join(path)
        };
        let meta = std::fs::metadata(&full).map_err(|e| format!("cgroup {}: {e}", full.display()))?;
        if !meta.is_dir() || !preflight::is_cgroup2(&full) {
            return Err(format!("{} is not a cgroup v2 directory", full.display()));
        }
        if !full.starts_with(&self.cgroup_root) {
            return Err(format!(
                "{} is outside the cgroup root {}; it would never be captured",
                full.display(),
                self.cgroup_root.display()
            ));
        }
        let id = meta.ino();
        if self.own_cgroups.contains(&id) {
            return Err(format!(
                "{} contains the agent itself; refusing to enroll it",
                full.display()
            ));
        }
        Ok(id)
    }

    /// Polls the source and applies it every `period`, forever.
    pub async fn run(
        self: Arc<Self>,
        mut source: Box<dyn WorkloadSource>,
        capture: Arc<Capture>,
        period: Duration,
    ) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut changes = source.changes();
        loop {
            match changes.as_mut() {
                Some(rx) => {
                    tokio::select! {
                        _ = tick.tick() => {}
                        r = rx.changed() => {
                            if r.is_err() {
                                changes = None;
                            }
                        }
                    }
                }
                None => {
                    tick.tick().await;
                }
            }
            let polled = source.poll();
            let _ = self.apply(polled, source.problems(), &capture);
        }
    }
}

/// Ids of this process's cgroup v2 directory and all its ancestors.
fn own_cgroup_ancestors() -> HashSet<u64> {
    let mut ids = HashSet::new();
    let Ok(cgroup) = std::fs::read_to_string("/proc/self/cgroup") else {
        return ids;
    };
    let Some(rel) = cgroup.lines().find_map(|l| l.strip_prefix("0::")) else {
        return ids;
    };
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return ids;
    };
    // mountinfo: id parent major:minor root mountpoint opts ... - fstype source superopts
    let mount = mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    });
    let Some(mount) = mount else { return ids };
    let mut dir = mount.join(rel.trim_start_matches('/'));
    loop {
        if let Ok(meta) = std::fs::metadata(&dir) {
            ids.insert(meta.ino());
        }
        if dir == mount || !dir.pop() {
            break;
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<WorkloadSpec>, RegistryError> {
        parse_workloads(Path::new("workloads.yaml"), text)
    }

    #[test]
    fn parses_workloads() {
        let w = parse(
            "workloads:\n- namespace: default\n  serviceAccount: sleep\n  name: sleep-1\n  cgroupPath: pods/sleep\n",
        )
        .unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].service_account, "sleep");
        assert_eq!(w[0].cgroup_path, PathBuf::from("pods/sleep"));
    }

    #[test]
    fn empty_file_is_no_workloads() {
        assert!(parse("").unwrap().is_empty());
        assert!(parse("workloads: []").unwrap().is_empty());
    }

    #[test]
    fn missing_field_is_named() {
        let err = parse("workloads:\n- namespace: default\n  name: x\n  cgroupPath: a\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("serviceAccount"), "{err}");
        assert!(err.contains("workloads.yaml"), "{err}");
    }

    #[test]
    fn unknown_field_is_named() {
        let err =
            parse("workloads:\n- namespace: d\n  serviceAccount: s\n  name: x\n  cgroupPath: a\n  sa: s\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("sa"), "{err}");
    }

    #[test]
    fn empty_and_bad_values_are_rejected_with_index() {
        let err = parse("workloads:\n- namespace: d\n  serviceAccount: s\n  name: x\n  cgroupPath: a\n- namespace: ''\n  serviceAccount: s\n  name: y\n  cgroupPath: b\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("workloads[1].namespace"), "{err}");
        let err = parse("workloads:\n- namespace: d/e\n  serviceAccount: s\n  name: x\n  cgroupPath: a\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("workloads[0].namespace"), "{err}");
    }

    #[test]
    fn duplicate_cgroup_is_rejected() {
        let err = parse("workloads:\n- {namespace: d, serviceAccount: s, name: x, cgroupPath: a}\n- {namespace: d, serviceAccount: t, name: y, cgroupPath: a}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listed twice"), "{err}");
    }

    #[test]
    fn principal_is_istio_style() {
        let w = Workload {
            spec: WorkloadSpec {
                namespace: "default".into(),
                service_account: "sleep".into(),
                name: "s".into(),
                cgroup_path: "x".into(),
            },
            cgroup_id: 1,
        };
        assert_eq!(w.principal(), "cluster.local/ns/default/sa/sleep");
    }

    #[test]
    fn static_source_reports_changes_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.yaml");
        std::fs::write(&path, "workloads: []\n").unwrap();
        let mut src = StaticFileSource::new(path.clone());
        assert_eq!(src.poll().unwrap(), Some(vec![]));
        assert_eq!(src.poll().unwrap(), None);
        std::fs::write(
            &path,
            "workloads: [{namespace: d, serviceAccount: s, name: x, cgroupPath: a}]\n",
        )
        .unwrap();
        assert_eq!(src.poll().unwrap().unwrap().len(), 1);
        std::fs::write(&path, "workloads: [{namespace: d}]\n").unwrap();
        assert!(src.poll().is_err());
    }
}

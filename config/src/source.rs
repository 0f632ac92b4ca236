//! Where resources come from: a directory of YAML files (plain hosts, tests)
//! or the Kubernetes API. Both give a `ResourceSet` with its problems and a
//! stamp that changes when the resources may have changed.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::{
    kube_watch::KubeResources,
    resources::{fingerprint, Fingerprint, Problem, ResourceSet, Severity},
    scope::{admit, Scope},
};

#[derive(Clone)]
pub enum ResourceSource {
    Dir(PathBuf),
    Kube(Arc<KubeResources>),
}

/// Compared by watchers to notice a change.
#[derive(Debug, Clone, PartialEq)]
pub enum Stamp {
    Files(Fingerprint),
    /// `KubeResources::stamp`.
    Api(u64),
    /// Equal to no source's stamp: the next check loads whatever is there.
    Unknown,
}

impl ResourceSource {
    /// The stamp now; `extra` files (mounted keys) count for a directory.
    pub fn stamp(&self, extra: &[PathBuf]) -> Stamp {
        match self {
            ResourceSource::Dir(dir) => Stamp::Files(fingerprint(dir, extra)),
            ResourceSource::Kube(k) => Stamp::Api(k.stamp()),
        }
    }

    /// Every resource that `scope` admits, with the problems found. A
    /// directory that cannot be read is an error; the API never is (what
    /// the watchers last saw is used). Objects the scope does not admit are
    /// left out and reported as warnings: one tenant's object must never
    /// take the configuration down.
    pub fn load(&self, scope: &Scope) -> Result<(ResourceSet, Vec<Problem>), Vec<Problem>> {
        match self {
            ResourceSource::Dir(dir) => {
                // Scoped even when some file has errors: whoever reads only
                // part of the set (the agent reads routes) must not see
                // what the scope refuses.
                let (mut set, mut problems) = ResourceSet::load_dir_checked(dir)?;
                problems.extend(admit(&mut set, scope).into_iter().map(|mut p| {
                    p.severity = Severity::Warning;
                    p.message = format!("not accepted: {}", p.message);
                    p
                }));
                Ok((set, problems))
            }
            ResourceSource::Kube(k) => {
                // Invalid objects are already left out one by one (their last
                // good version kept); they must not fail the whole set, so
                // they are passed on as warnings, for /readyz and `status`.
                let (set, problems) = k.load(scope);
                let problems = problems
                    .into_iter()
                    .map(|mut p| {
                        if p.severity == Severity::Error {
                            p.severity = Severity::Warning;
                            p.message = format!(
                                "rejected, its last good version (if any) stays in force: {}",
                                p.message
                            );
                        }
                        p
                    })
                    .collect();
                Ok((set, problems))
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            ResourceSource::Dir(dir) => format!("directory {}", dir.display()),
            ResourceSource::Kube(_) => "the Kubernetes API".into(),
        }
    }

    pub fn dir(&self) -> Option<&Path> {
        match self {
            ResourceSource::Dir(d) => Some(d),
            ResourceSource::Kube(_) => None,
        }
    }

    pub fn kube(&self) -> Option<&Arc<KubeResources>> {
        match self {
            ResourceSource::Kube(k) => Some(k),
            ResourceSource::Dir(_) => None,
        }
    }
}

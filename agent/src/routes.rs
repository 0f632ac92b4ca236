//! The capture side of LLMRoute: every accepted route's host is captured
//! (`llm_egress_config::scope` decides, as in the gateway), and the
//! route's rule for gateway `mesh` names (in `providerHost`) the egress
//! gateway its connections are tunnelled to. Read from the same resource
//! files the gateway uses; re-read when they change.

use std::{collections::BTreeMap, sync::RwLock};

use llm_egress_config::{
    resources::{LlmRouteSpec, Problem, ResourceSet, Severity},
    scope::Scope,
    source::{ResourceSource, Stamp},
};

/// Host → gateway name, for routes that apply to the mesh.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTable {
    pub gateway_of: BTreeMap<String, String>,
}

const MESH: &str = "mesh";

fn mesh_gateway(spec: &LlmRouteSpec) -> Option<String> {
    // Istio: a route without `gateways` applies to the mesh only.
    let for_mesh = spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == MESH);
    if !for_mesh {
        return None;
    }
    spec.rules
        .iter()
        .find(|r| {
            r.matches.is_empty()
                || r.matches
                    .iter()
                    .any(|m| m.gateways.is_empty() || m.gateways.iter().any(|g| g == MESH))
        })
        .and_then(|r| r.backend_refs.first())
        .map(|b| b.provider_host.to_ascii_lowercase())
}

impl RouteTable {
    pub fn from_set(set: &ResourceSet) -> RouteTable {
        let gateway_of = set
            .routes
            .iter()
            .filter_map(|r| mesh_gateway(&r.spec).map(|g| (r.spec.host.to_ascii_lowercase(), g)))
            .collect();
        RouteTable { gateway_of }
    }

    pub fn hosts(&self) -> Vec<String> {
        self.gateway_of.keys().cloned().collect()
    }
}

/// Loads routes. From the API each invalid route is already left out (and
/// logged) on its own, so only a directory can fail as a whole.
pub fn load_from(source: &ResourceSource, scope: &Scope) -> Result<RouteTable, Vec<Problem>> {
    let (set, problems) = source.load(scope)?;
    if source.kube().is_some() {
        return Ok(RouteTable::from_set(&set));
    }
    // The agent only needs routes; problems in other kinds are the gateway's.
    let route_errors: Vec<Problem> = problems
        .into_iter()
        .filter(|p| {
            p.severity == Severity::Error && p.resource.as_deref().is_none_or(|r| r.starts_with("LLMRoute"))
        })
        .collect();
    if !route_errors.is_empty() {
        return Err(route_errors);
    }
    Ok(RouteTable::from_set(&set))
}

pub struct Routes {
    source: Option<ResourceSource>,
    scope: Scope,
    table: RwLock<RouteTable>,
    stamp: RwLock<Option<Stamp>>,
}

impl Routes {
    pub fn new(source: Option<ResourceSource>, scope: Scope) -> Result<Routes, Vec<Problem>> {
        let (table, stamp) = match &source {
            Some(s) => {
                let stamp = s.stamp(&[]);
                (load_from(s, &scope)?, Some(stamp))
            }
            None => (RouteTable::default(), None),
        };
        Ok(Routes {
            source,
            scope,
            table: RwLock::new(table),
            stamp: RwLock::new(stamp),
        })
    }

    /// Notified when the API reports a change (none for a directory).
    pub fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.source.as_ref()?.kube().map(|k| k.subscribe())
    }

    pub fn table(&self) -> RouteTable {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn gateway_for(&self, host: &str) -> Option<String> {
        self.table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .gateway_of
            .get(&host.to_ascii_lowercase())
            .cloned()
    }

    /// Makes the next `check` re-read, changed or not (after a check that
    /// did not finish).
    pub fn forget_stamp(&self) {
        *self.stamp.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Re-reads the directory if it changed; returns the new table then.
    pub fn check(&self) -> Option<RouteTable> {
        let source = self.source.as_ref()?;
        let now = Some(source.stamp(&[]));
        if *self.stamp.read().unwrap_or_else(|p| p.into_inner()) == now {
            return None;
        }
        *self.stamp.write().unwrap_or_else(|p| p.into_inner()) = now;
        match load_from(source, &self.scope) {
            Ok(t) => {
                tracing::info!(routes = ?t.gateway_of, "LLMRoute resources reloaded");
                *self.table.write().unwrap_or_else(|p| p.into_inner()) = t.clone();
                Some(t)
            }
            Err(problems) => {
                for p in problems {
                    tracing::warn!(problem = %p, "LLMRoute change rejected; keeping the previous routes");
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    #[test]
    fn seed_route_captures_dashscope_and_tunnels_to_the_egress_gateway() {
        let t = load_from(
            &ResourceSource::Dir(PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../deploy/examples"
            ))),
            &Scope::new(["istio-system"]),
        )
        .unwrap();
        assert_eq!(t.hosts(), ["dashscope.aliyuncs.com"]);
        assert_eq!(
            t.gateway_of["dashscope.aliyuncs.com"],
            "istio-egressgateway.istio-system.svc.cluster.local"
        );
    }

    #[test]
    fn routes_not_for_the_mesh_are_not_captured() {
        let mut set = ResourceSet::default();
        let p = set.add_text(
            Path::new("r.yaml"),
            "apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata: {name: gw-only}\nspec:\n  host: a.example\n  gateways: [istio-system/egress-gw]\n  rules: [{backendRefs: [{providerHost: a.example}]}]\n---\napiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata: {name: implicit-mesh}\nspec:\n  host: B.example\n  rules: [{backendRefs: [{providerHost: gw.example}]}]\n",
        );
        assert!(p.is_empty(), "{p:?}");
        let t = RouteTable::from_set(&set);
        assert_eq!(t.hosts(), ["b.example"]);
        assert_eq!(t.gateway_of["b.example"], "gw.example");
    }

    #[test]
    fn a_tenant_route_for_a_host_no_provider_serves_is_not_captured() {
        let dir = tempfile::tempdir().unwrap();
        let examples = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples"));
        for f in ["dashscope-qwen.yaml", "dashscope-route.yaml"] {
            std::fs::copy(examples.join(f), dir.path().join(f)).unwrap();
        }
        std::fs::write(
            dir.path().join("tenant.yaml"),
            "apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata: {name: grab, namespace: team-a}\nspec:\n  host: github.com\n  rules: [{backendRefs: [{providerHost: istio-egressgateway.istio-system.svc.cluster.local}]}]\n",
        )
        .unwrap();
        let source = ResourceSource::Dir(dir.path().to_owned());
        let t = load_from(&source, &Scope::new(["istio-system"])).unwrap();
        assert_eq!(t.hosts(), ["dashscope.aliyuncs.com"]);
        // Trusted, the same route is captured.
        let t = load_from(&source, &Scope::new(["istio-system", "team-a"])).unwrap();
        assert_eq!(t.hosts(), ["dashscope.aliyuncs.com", "github.com"]);
    }
}

//! Where the external authorizers come from: Istio's mesh config, from a
//! file (`--mesh-config`) or from the `istio` ConfigMap (key `mesh`) of the
//! root namespace, as Istio keeps it. Re-read when it changes; a change that
//! does not parse is logged and the last good set kept.

use std::{path::PathBuf, sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{api::Api, runtime::watcher, Client};
use llm_egress_config::{
    kube_watch::{spawn_reflector, Watched},
    mesh_config::{parse_extension_providers, ExtAuthzProvider, MeshConfigError},
};

use super::ext_authz::ExtAuthz;
use crate::{pipeline::Gateway, upstream::Resolver};

/// Istio's ConfigMap and key for the mesh config.
pub const ISTIO_CONFIGMAP: &str = "istio";
pub const MESH_KEY: &str = "mesh";

pub enum MeshConfigSource {
    /// No mesh config: no CUSTOM provider exists (CUSTOM policies deny).
    None,
    File(PathBuf),
    ConfigMap {
        namespace: String,
        watched: Watched<ConfigMap>,
    },
}

impl MeshConfigSource {
    pub fn configmap(client: Client, namespace: &str) -> MeshConfigSource {
        let (tx, _) = tokio::sync::watch::channel(0u64);
        let watched = spawn_reflector(
            format!("ConfigMap {namespace}/{ISTIO_CONFIGMAP}"),
            Api::<ConfigMap>::namespaced(client, namespace),
            watcher::Config::default().fields(&format!("metadata.name={ISTIO_CONFIGMAP}")),
            (),
            tx,
        );
        MeshConfigSource::ConfigMap {
            namespace: namespace.to_string(),
            watched,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            MeshConfigSource::None => "no mesh config".into(),
            MeshConfigSource::File(p) => p.display().to_string(),
            MeshConfigSource::ConfigMap { namespace, .. } => {
                format!("ConfigMap {namespace}/{ISTIO_CONFIGMAP} key {MESH_KEY}")
            }
        }
    }

    /// The mesh config's text now; `Ok(None)` when there is none (yet).
    fn text(&self) -> Result<Option<String>, String> {
        match self {
            MeshConfigSource::None => Ok(Some(String::new())),
            MeshConfigSource::File(p) => std::fs::read_to_string(p)
                .map(Some)
                .map_err(|e| format!("cannot read {}: {e}", p.display())),
            MeshConfigSource::ConfigMap { watched, .. } => {
                if !watched.synced() {
                    return Ok(None);
                }
                // An absent ConfigMap or key is a mesh without extension providers.
                Ok(Some(
                    watched
                        .store
                        .state()
                        .first()
                        .and_then(|cm| cm.data.as_ref())
                        .and_then(|d| d.get(MESH_KEY).cloned())
                        .unwrap_or_default(),
                ))
            }
        }
    }

    /// The providers now (for startup, where a bad file stops the gateway).
    pub fn load(&self) -> Result<Vec<ExtAuthzProvider>, String> {
        match self.text()? {
            Some(t) => parse_extension_providers(&t).map_err(|e: MeshConfigError| e.to_string()),
            None => Ok(Vec::new()),
        }
    }

    /// Keeps `gateway.ext_authz` up to date with this source, forever.
    pub async fn follow(self, gateway: Arc<Gateway>, resolver: Resolver, mut last: Option<String>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let text = match self.text() {
                Ok(Some(t)) => t,
                Ok(None) => continue,
                Err(e) => {
                    if last.is_some() {
                        tracing::error!(source = %self.describe(), error = %e, "mesh config unreadable; keeping the last good extension providers");
                        last = None;
                    }
                    continue;
                }
            };
            if last.as_deref() == Some(text.as_str()) {
                continue;
            }
            match parse_extension_providers(&text) {
                Ok(providers) => {
                    let ext = ExtAuthz::new(providers, resolver.clone());
                    tracing::info!(source = %self.describe(), providers = ?ext.names(), "external authorizers loaded");
                    gateway.ext_authz.store(Arc::new(ext));
                }
                Err(e) => {
                    tracing::error!(source = %self.describe(), error = %e, "mesh config not valid; keeping the last good extension providers");
                }
            }
            last = Some(text);
        }
    }

    /// The text `load` saw, so `follow` does not reload it.
    pub fn current_text(&self) -> Option<String> {
        self.text().ok().flatten()
    }
}

//! Admin endpoint: `/healthz`, `/readyz`, `/metrics` (Prometheus text) and
//! `/status` (JSON, read by `llm-egress-agent status`), on loopback by
//! default: they name the node's workloads and their recent destinations.
//! The health endpoint (`--health-listen`, for kubelet probes on a
//! hostNetwork pod) answers `/healthz` and `/readyz` with a status code and
//! one word, and `/metrics` only when asked to.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Json, Router};
use llm_egress_common::COUNTER_NAMES;
use serde::{Deserialize, Serialize};

use crate::{
    loader::Attachment,
    proxy::{Proxy, RecentConnection},
    registry::RegistrySnapshot,
    targets::HostStatus,
};

pub struct AdminState {
    pub proxy: Arc<Proxy>,
    pub cgroup_root: PathBuf,
    pub listen: Vec<SocketAddr>,
    pub advertise: Vec<SocketAddr>,
    pub listening: AtomicBool,
}

/// The `/status` document.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub version: String,
    pub mode: String,
    pub attachment: String,
    pub cgroup_root: PathBuf,
    pub pin_dir: PathBuf,
    pub listen: Vec<SocketAddr>,
    pub advertise: Vec<SocketAddr>,
    pub targets: Vec<HostStatus>,
    pub workloads: RegistrySnapshot,
    pub counters: BTreeMap<String, u64>,
    pub maps: BTreeMap<String, usize>,
    pub recent: Vec<RecentConnection>,
}

impl AdminState {
    fn status(&self) -> Status {
        let capture = &self.proxy.capture;
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            mode: format!("{:?}", self.proxy.mode).to_lowercase(),
            attachment: match capture.attachment {
                Attachment::Attached => "attached".into(),
                Attachment::Reused => "reused".into(),
            },
            cgroup_root: self.cgroup_root.clone(),
            pin_dir: capture.pin_dir.clone(),
            listen: self.listen.clone(),
            advertise: self.advertise.clone(),
            targets: self.proxy.targets.snapshot(),
            workloads: self.proxy.registry.snapshot(),
            counters: COUNTER_NAMES
                .iter()
                .map(|n| n.to_string())
                .zip(capture.counters())
                .collect(),
            maps: capture
                .map_sizes()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            recent: self.proxy.recent(),
        }
    }

    /// Not-ready reasons; empty when ready.
    fn unready(&self) -> Vec<String> {
        let mut why = Vec::new();
        if !self.listening.load(Ordering::Relaxed) {
            why.push("capture proxy is not listening yet".to_string());
        }
        if !self.proxy.targets.all_attempted() {
            why.push("capture targets are still being resolved".to_string());
        }
        why
    }
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(state)
}

/// Probes only (and `/metrics` when `with_metrics`): nothing about
/// workloads, hosts or connections.
pub fn health_router(state: Arc<AdminState>, with_metrics: bool) -> Router {
    let mut r = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(bare_readyz));
    if with_metrics {
        r = r.route("/metrics", get(metrics));
    }
    r.with_state(state)
}

async fn bare_readyz(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    if state.unready().is_empty() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn readyz(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let why = state.unready();
    // Problems that do not block readiness are still worth showing.
    let mut notes = Vec::new();
    for t in state.proxy.targets.snapshot() {
        if let Some(e) = t.error {
            notes.push(format!("target {}: {e}", t.host));
        }
    }
    let snap = state.proxy.registry.snapshot();
    notes.extend(snap.problems.iter().map(|p| format!("workload {p}")));
    if let Some(e) = snap.source_error {
        notes.push(format!("workload source: {e}"));
    }
    let mut body = if why.is_empty() {
        "ready\n".to_string()
    } else {
        format!("not ready: {}\n", why.join("; "))
    };
    for n in notes {
        body.push_str(&format!("warning: {n}\n"));
    }
    (
        if why.is_empty() {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        body,
    )
}

async fn metrics(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let state = state.clone();
    // Reading eBPF maps is a series of syscalls: keep it off the reactor.
    let body = tokio::task::spawn_blocking(move || state.proxy.metrics.encode())
        .await
        .unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

async fn status(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let state = state.clone();
    match tokio::task::spawn_blocking(move || state.status()).await {
        Ok(s) => Json(s).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "status failed\n").into_response(),
    }
}

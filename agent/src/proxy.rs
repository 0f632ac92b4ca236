//! The capture proxy: accepts connections that connect4/6 redirected, finds
//! their original destination and workload, and forwards them (`direct`
//! mode: straight to the original destination).

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};

use llm_egress_mesh::{identity::SpiffeId, tunnel::WorkloadIdentity};

use crate::{
    config::Mode,
    fairness::WorkloadLimit,
    loader::Capture,
    metrics::{ByteLabels, ConnectionLabels, Metrics, RejectLabels},
    registry::Registry,
    routes::Routes,
    targets::Targets,
    uplink::{Uplink, UplinkError},
};

const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const RECENT_LEN: usize = 64;
const LIMIT_WARN_EVERY: Duration = Duration::from_secs(10);

/// One captured connection, as shown by `status` (most recent last).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecentConnection {
    pub at: u64,
    pub peer: SocketAddr,
    pub original_destination: SocketAddr,
    pub host: Option<String>,
    pub namespace: String,
    pub workload: String,
    pub service_account: String,
    pub principal: String,
}

pub struct Proxy {
    pub capture: Arc<Capture>,
    pub registry: Arc<Registry>,
    pub targets: Arc<Targets>,
    pub metrics: Arc<Metrics>,
    pub mode: Mode,
    pub routes: Arc<Routes>,
    /// Set in tunnel mode.
    pub uplink: Option<Arc<Uplink>>,
    pub trust_domain: String,
    pub node_name: String,
    workload_limit: Arc<WorkloadLimit>,
    last_limit_warning: Mutex<Option<Instant>>,
    recent: Mutex<VecDeque<RecentConnection>>,
}

/// The pieces a proxy needs besides capture state.
pub struct ProxyParts {
    pub routes: Arc<Routes>,
    pub uplink: Option<Arc<Uplink>>,
    pub trust_domain: String,
    pub node_name: String,
    pub workload_limit: Arc<WorkloadLimit>,
}

impl Proxy {
    pub fn new(
        capture: Arc<Capture>,
        registry: Arc<Registry>,
        targets: Arc<Targets>,
        metrics: Arc<Metrics>,
        mode: Mode,
        parts: ProxyParts,
    ) -> Proxy {
        Proxy {
            capture,
            registry,
            targets,
            metrics,
            mode,
            routes: parts.routes,
            uplink: parts.uplink,
            trust_domain: parts.trust_domain,
            node_name: parts.node_name,
            workload_limit: parts.workload_limit,
            last_limit_warning: Mutex::new(None),
            recent: Mutex::new(VecDeque::new()),
        }
    }

    pub fn recent(&self) -> Vec<RecentConnection> {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let this = self.clone();
                    tokio::spawn(async move { this.handle(stream, peer).await });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn reject(&self, reason: &'static str) {
        self.metrics
            .rejected
            .get_or_create(&RejectLabels { reason })
            .inc();
    }

    async fn handle(&self, mut client: TcpStream, peer: SocketAddr) {
        let Some(orig) = self.capture.take_orig_dst(peer) else {
            // Not redirected by our programs (or the record was lost): never
            // forward a connection whose destination we do not know.
            tracing::debug!(%peer, "connection without a capture record; closing");
            self.reject("no_record");
            return;
        };
        let dst = orig.socket_addr();
        let Some(workload) = self.registry.workload(orig.cgroup_id) else {
            tracing::warn!(%peer, original_dst = %dst, cgroup_id = orig.cgroup_id, "captured connection from a cgroup that is no longer enrolled; closing");
            self.reject("unknown_workload");
            return;
        };
        let Some(_slot) = self
            .workload_limit
            .try_acquire(&format!("{}/{}", workload.spec.namespace, workload.spec.name))
        else {
            self.reject("workload_limit");
            let mut last = self.last_limit_warning.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_none_or(|t| t.elapsed() >= LIMIT_WARN_EVERY) {
                *last = Some(Instant::now());
                tracing::warn!(%peer, original_dst = %dst, principal = %workload.principal(), workload = %workload.spec.name, namespace = %workload.spec.namespace, limit = self.workload_limit.max(), "a pod holds as many captured connections as --max-connections-per-workload allows; closing its new ones (logged once per 10 s)");
            }
            return;
        };
        let host = self.targets.host_of(dst.ip());
        let destination = match &host {
            Some(h) => format!("{h}:{}", dst.port()),
            None => dst.to_string(),
        };
        let labels = ConnectionLabels {
            namespace: workload.spec.namespace.clone(),
            workload: workload.spec.name.clone(),
            service_account: workload.spec.service_account.clone(),
            destination: destination.clone(),
        };
        self.metrics.connections.get_or_create(&labels).inc();
        {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() == RECENT_LEN {
                recent.pop_front();
            }
            recent.push_back(RecentConnection {
                at: SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                peer: SocketAddr::new(peer.ip().to_canonical(), peer.port()),
                original_destination: dst,
                host: host.clone(),
                namespace: labels.namespace.clone(),
                workload: labels.workload.clone(),
                service_account: labels.service_account.clone(),
                principal: workload.principal(),
            });
        }

        let started = Instant::now();
        self.metrics.active.inc();
        let outcome = match (self.mode, &self.uplink) {
            (Mode::Tunnel, Some(uplink)) => {
                // Boxed and moved into the tunnel's opening: freed once the
                // stream is open, not held for the connection's life.
                let who = Box::new(WorkloadIdentity {
                    spiffe: SpiffeId::workload(
                        &self.trust_domain,
                        &workload.spec.namespace,
                        &workload.spec.service_account,
                    ),
                    namespace: workload.spec.namespace.clone(),
                    service_account: workload.spec.service_account.clone(),
                    pod: Some(workload.spec.name.clone()),
                    node: Some(self.node_name.clone()),
                });
                let host_name = host.clone().unwrap_or_else(|| dst.ip().to_string());
                match self
                    .forward_tunnel(uplink, &mut client, dst, &host_name, who)
                    .await
                {
                    Err(TunnelFailure::Open(e)) => {
                        self.reject("gateway_unavailable");
                        if uplink.should_warn() {
                            tracing::warn!(%peer, original_dst = %dst, principal = %workload.principal(), error = %e, "cannot open a tunnel to the egress gateway; closing captured connections until it is back (logged once per burst)");
                        }
                        None
                    }
                    Err(TunnelFailure::Io(e)) => Some(Err(e)),
                    Ok(n) => Some(Ok(n)),
                }
            }
            _ => Some(self.forward_direct(&mut client, dst).await),
        };
        self.metrics.active.dec();
        // No tunnel could be opened: already counted and (rate-limited) logged.
        let Some(result) = outcome else { return };
        match result {
            Ok((sent, received)) => {
                for (direction, n) in [("sent", sent), ("received", received)] {
                    self.metrics
                        .bytes
                        .get_or_create(&ByteLabels {
                            namespace: labels.namespace.clone(),
                            workload: labels.workload.clone(),
                            service_account: labels.service_account.clone(),
                            destination: destination.clone(),
                            direction,
                        })
                        .inc_by(n);
                }
                tracing::info!(
                    %peer, original_dst = %dst, destination = %destination, principal = %workload.principal(),
                    workload = %workload.spec.name, namespace = %workload.spec.namespace,
                    sent, received, duration_ms = started.elapsed().as_millis() as u64,
                    "captured connection closed"
                );
            }
            Err(e) => {
                self.reject("upstream_error");
                tracing::warn!(%peer, original_dst = %dst, destination = %destination, principal = %workload.principal(), error = %e, "captured connection failed");
            }
        }
    }

    async fn forward_tunnel(
        &self,
        uplink: &Uplink,
        client: &mut TcpStream,
        dst: SocketAddr,
        host: &str,
        who: Box<WorkloadIdentity>,
    ) -> Result<(u64, u64), TunnelFailure> {
        let gateway = uplink
            .gateway_for(self.routes.gateway_for(host), host)
            .map_err(TunnelFailure::Open)?;
        // Boxed: opening's state (the CONNECT request and its answer) is
        // freed once open, instead of sizing the task for its whole life.
        let (mut stream, _permit) =
            Box::pin(async move { uplink.open(&gateway, &dst.to_string(), &who).await })
                .await
                .map_err(TunnelFailure::Open)?;
        let _ = client.set_nodelay(true);
        llm_egress_mesh::copy::copy_bidirectional(client, &mut stream)
            .await
            .map_err(TunnelFailure::Io)
    }

    async fn forward_direct(&self, client: &mut TcpStream, dst: SocketAddr) -> std::io::Result<(u64, u64)> {
        let mut upstream = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(dst))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connecting to {dst} timed out"),
                )
            })??;
        let _ = upstream.set_nodelay(true);
        let _ = client.set_nodelay(true);
        llm_egress_mesh::copy::copy_bidirectional(client, &mut upstream).await
    }
}

enum TunnelFailure {
    /// No stream could be opened: nothing was sent anywhere.
    Open(UplinkError),
    Io(std::io::Error),
}

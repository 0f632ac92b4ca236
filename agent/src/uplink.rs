//! The agent's side of the tunnel: one pooled HTTP/2 mTLS connection per
//! egress gateway (mesh `TunnelClient`), a bound on concurrent streams, and
//! warnings about an unreachable gateway rate-limited to one per burst.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use llm_egress_mesh::{
    identity::SpiffeId,
    tls::{client_config, Reloading, TlsError, ALPN_H2},
    tunnel::{NodeToken, TunnelClient, TunnelError, TunnelStream, WorkloadIdentity},
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::TunnelConfig;

/// Streams allowed at once across all gateways: what one tunnel
/// connection may carry.
pub const MAX_STREAMS: usize = llm_egress_mesh::tunnel::MAX_STREAMS_PER_CONNECTION as usize;
const WARN_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("no egress gateway is configured for host {0:?}; add its LLMRoute or a --gateway-address")]
    NoGateway(String),
    #[error("too many tunnelled connections at once ({MAX_STREAMS})")]
    Saturated,
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
}

pub struct Uplink {
    addrs: BTreeMap<String, String>,
    gateway_identity: SpiffeId,
    node_token: Option<Arc<NodeToken>>,
    tls: Arc<Reloading<rustls::ClientConfig>>,
    clients: Mutex<HashMap<String, Arc<TunnelClient>>>,
    streams: Arc<Semaphore>,
    last_warning: Mutex<Option<Instant>>,
}

impl Uplink {
    pub fn new(cfg: &TunnelConfig) -> Result<Uplink, TlsError> {
        let tls = Reloading::new(cfg.tls.clone(), |f| client_config(f, &[ALPN_H2]))?;
        tls.watch(Duration::from_secs(2));
        Ok(Uplink {
            addrs: cfg.gateways.clone(),
            gateway_identity: cfg.gateway_identity.clone(),
            node_token: cfg.node_token_file.clone().map(|p| Arc::new(NodeToken::new(p))),
            tls,
            clients: Mutex::new(HashMap::new()),
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
            last_warning: Mutex::new(None),
        })
    }

    /// The gateway for a host: its route's, or the only one configured.
    pub fn gateway_for(&self, routed: Option<String>, host: &str) -> Result<String, UplinkError> {
        if let Some(g) = routed.filter(|g| self.addrs.contains_key(g)) {
            return Ok(g);
        }
        if self.addrs.len() == 1 {
            if let Some(g) = self.addrs.keys().next() {
                return Ok(g.clone());
            }
        }
        Err(UplinkError::NoGateway(host.to_string()))
    }

    fn client(&self, gateway: &str) -> Result<Arc<TunnelClient>, UplinkError> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(gateway) {
            return Ok(c.clone());
        }
        let addr = self
            .addrs
            .get(gateway)
            .cloned()
            .ok_or_else(|| UplinkError::NoGateway(gateway.to_string()))?;
        let tls = self.tls.clone();
        // The gateway's certificate must carry its name as a DNS SAN and
        // its SPIFFE ID: any certificate of the CA could carry the name.
        let mut client = TunnelClient::new(addr, gateway, Arc::new(move || tls.current()))?
            .expect_peer(self.gateway_identity.clone());
        if let Some(token) = &self.node_token {
            client = client.with_node_token(token.clone());
        }
        let client = Arc::new(client);
        clients.insert(gateway.to_string(), client.clone());
        Ok(client)
    }

    /// Opens a tunnel stream to `authority` for `who` through `gateway`.
    pub async fn open(
        &self,
        gateway: &str,
        authority: &str,
        who: &WorkloadIdentity,
    ) -> Result<(TunnelStream, OwnedSemaphorePermit), UplinkError> {
        let permit = self
            .streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| UplinkError::Saturated)?;
        let client = self.client(gateway)?;
        let stream = client.connect(authority, who).await?;
        Ok((stream, permit))
    }

    /// True when this failure should be logged (once per burst).
    pub fn should_warn(&self) -> bool {
        let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < WARN_EVERY) {
            return false;
        }
        *last = Some(now);
        true
    }
}

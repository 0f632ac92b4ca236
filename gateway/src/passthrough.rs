//! TLS passthrough: a tunnelled TLS stream goes to its SNI host on the
//! original port, after an L4 policy check (principal and host = SNI). Only
//! hosts with an LLMRoute at this gateway are reachable: the gateway is not
//! an open proxy.

use std::{sync::Arc, time::Duration};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::{
    metrics::PassthroughLabels,
    pipeline::{Gateway, Source},
    policy::authz::{self, Attributes, Decision},
};

/// Longest wait for a provider to accept a passed-through connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run<S>(gw: Arc<Gateway>, source: &Source, sni: Option<String>, hello: Vec<u8>, mut client: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let principal = source.principal.clone().unwrap_or_else(|| "-".into());
    let count = |sni: &str, decision: &'static str| {
        gw.metrics
            .passthrough
            .get_or_create(&PassthroughLabels {
                principal: principal.clone(),
                sni: sni.to_string(),
                decision,
            })
            .inc();
    };
    let Some(sni) = sni else {
        tracing::info!(target: "access", entry = source.entry, principal, "TLS without SNI refused");
        count("-", "no_sni");
        return;
    };
    let cfg = gw.config.current();
    let port = source.dest_port.unwrap_or(443);
    if cfg.routes.at_this_gateway(&sni).is_none() {
        tracing::info!(target: "access", entry = source.entry, principal, sni, "TLS to a host without an LLMRoute refused");
        count(&sni, "no_route");
        return;
    }
    let attrs = Attributes {
        principal: source.principal.as_deref(),
        namespace: source.namespace.as_deref(),
        host: &sni,
        port: Some(port),
        ..Default::default()
    };
    // An HTTP authorizer cannot judge an opaque TLS stream: a CUSTOM policy
    // that matches at L4 (as restrictively as a DENY) refuses it.
    let custom = authz::custom_providers(&cfg.policies, &attrs);
    if !custom.is_empty() {
        tracing::info!(target: "access", entry = source.entry, principal, sni, providers = ?custom, "TLS passthrough refused: a CUSTOM policy applies and the stream cannot be checked");
        count(&sni, "denied");
        return;
    }
    if let Decision::Deny(why) = authz::evaluate(&cfg.policies, &attrs) {
        tracing::info!(target: "access", entry = source.entry, principal, sni, reason = why, "TLS passthrough denied");
        count(&sni, "denied");
        return;
    }
    let addrs = match gw.upstream.resolver.resolve(&sni, port).await {
        Ok(a) if !a.is_empty() => a,
        _ => {
            tracing::warn!(sni, "TLS passthrough: host does not resolve");
            count(&sni, "unresolved");
            return;
        }
    };
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&addrs[..]));
    let mut upstream = match connect.await {
        Ok(Ok(s)) => s,
        Err(_) => {
            tracing::warn!(sni, timeout = ?CONNECT_TIMEOUT, "TLS passthrough: connect timed out");
            count(&sni, "connect_error");
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!(sni, error = %e, "TLS passthrough: cannot connect");
            count(&sni, "connect_error");
            return;
        }
    };
    count(&sni, "allowed");
    if upstream.write_all(&hello).await.is_err() {
        return;
    }
    // `client` carries the idle deadline: a copy where nothing moves ends.
    let result = llm_egress_mesh::copy::copy_bidirectional(&mut client, &mut upstream).await;
    if let Err(e) = &result {
        if crate::limits::is_idle_timeout(e) {
            gw.metrics.client_timeout("idle");
        }
    }
    let (sent, received) = result.unwrap_or((0, 0));
    tracing::info!(target: "access", entry = source.entry, principal, sni, sent = sent + hello.len() as u64, received, "TLS passthrough closed");
}

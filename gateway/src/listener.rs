//! The two ways in. The tunnel entry speaks HTTP/2 CONNECT over mTLS to
//! node agents (and believes their identity headers only if the peer is a
//! configured agent identity, and only for workloads of the agent's own
//! node: `node_auth`); the direct entry serves HTTP over mTLS to workloads
//! holding their own SPIFFE certificate.

use std::{sync::Arc, time::Duration};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use llm_egress_mesh::{
    identity::SpiffeId,
    tls::{peer_node, peer_spiffe, Reloading},
    tunnel::{self, ConnectRequest, Refusal, TunnelStream, WorkloadIdentity, HEADER_NODE_TOKEN},
};
use tokio::net::TcpListener;

use crate::{
    limits::{self, IdleTimeout, MAX_HEADERS, MAX_REQUEST_HEAD},
    metrics::TunnelLabels,
    node_auth::{AgentPeer, NodeAuth, NodeAuthError},
    passthrough,
    pipeline::{Gateway, Source},
    sniff::{sniff, Prefixed, Sniffed},
};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS-accepts and returns the stream with the peer's SPIFFE ID.
async fn accept_mtls(
    tls: &Reloading<rustls::ServerConfig>,
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
) -> Option<(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, SpiffeId)> {
    let _ = tcp.set_nodelay(true);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "mTLS handshake failed; connection refused");
            return None;
        }
        Err(_) => {
            tracing::info!(%peer, "mTLS handshake timed out");
            return None;
        }
    };
    let Some(id) = peer_spiffe(stream.get_ref().1) else {
        tracing::info!(%peer, "client certificate has no SPIFFE ID; connection refused");
        return None;
    };
    Some((stream, id))
}

fn source_of(id: &SpiffeId, entry: &'static str, dest_port: Option<u16>) -> Source {
    Source {
        principal: Some(id.principal()),
        namespace: id.namespace().map(str::to_string),
        dest_port,
        entry,
    }
}

pub async fn serve_tunnel(
    gw: Arc<Gateway>,
    tls: Arc<Reloading<rustls::ServerConfig>>,
    agents: Arc<Vec<SpiffeId>>,
    node_auth: Arc<NodeAuth>,
    listener: TcpListener,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "tunnel accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (gw, tls, agents, node_auth) = (gw.clone(), tls.clone(), agents.clone(), node_auth.clone());
        tokio::spawn(async move {
            let Some((stream, id)) = accept_mtls(&tls, tcp, peer).await else {
                return;
            };
            let is_agent = agents.contains(&id);
            let agent = Arc::new(AgentPeer {
                id,
                node: peer_node(stream.get_ref().1),
            });
            tracing::debug!(%peer, identity = %agent.id, is_agent, "tunnel connection");
            let g = gw.clone();
            let admit = move |req: ConnectRequest| {
                let (gw, agent, node_auth) = (g.clone(), agent.clone(), node_auth.clone());
                async move { admit_stream(&gw, &node_auth, &agent, is_agent, &req.headers, &req.authority).await }
            };
            // No async block around tunnel_stream: it would hold a second
            // copy of the arguments for the stream's whole life.
            let handler =
                move |source: Source, stream: TunnelStream| tunnel_stream(gw.clone(), source, stream);
            if let Err(e) = tunnel::serve(stream, admit, handler).await {
                tracing::debug!(%peer, error = %e, "tunnel connection ended");
            }
        });
    }
}

/// Decides who a tunnel stream speaks for. An agent's identity headers are
/// believed only for a workload its node may assert (`node_auth`); any other
/// peer speaks for itself.
async fn admit_stream(
    gw: &Gateway,
    node_auth: &NodeAuth,
    agent: &AgentPeer,
    is_agent: bool,
    headers: &hyper::HeaderMap,
    authority: &str,
) -> Result<Source, Refusal> {
    let dest_port = authority
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok());
    let kind = if is_agent { "agent" } else { "workload" };
    let count = |outcome: &'static str| {
        gw.metrics
            .tunnel_streams
            .get_or_create(&TunnelLabels { peer: kind, outcome })
            .inc()
    };
    if !is_agent {
        if headers.keys().any(|k| k.as_str().starts_with("x-llm-egress-")) {
            tracing::warn!(peer = %agent.id, "identity headers from a peer that is not an agent ignored");
        }
        count("accepted");
        return Ok(source_of(&agent.id, "tunnel", dest_port));
    }
    let who = match WorkloadIdentity::from_headers(headers) {
        Ok(Some(w)) => w,
        // An agent carries workloads' connections; with node binding on, a
        // stream that names none is not the agent's to make.
        Ok(None) if matches!(node_auth, NodeAuth::Off) => {
            count("accepted");
            return Ok(source_of(&agent.id, "tunnel", dest_port));
        }
        Ok(None) => {
            tracing::warn!(agent = %agent.id, "agent stream without a workload identity refused");
            count("node_refused");
            let e = NodeAuthError::NoIdentity;
            return Err(Refusal {
                status: e.status(),
                reason: e.to_string(),
            });
        }
        Err(e) => {
            tracing::warn!(agent = %agent.id, error = %e, "tunnel stream with invalid identity headers refused");
            count("bad_identity");
            return Err(Refusal {
                status: hyper::StatusCode::BAD_REQUEST,
                reason: e.to_string(),
            });
        }
    };
    let token = headers.get(HEADER_NODE_TOKEN).and_then(|v| v.to_str().ok());
    if let Err(e) = node_auth.verify(agent, &who, token).await {
        tracing::warn!(
            agent = %agent.id,
            agent_node = agent.node.as_deref().unwrap_or("-"),
            asserted = %who.principal(),
            asserted_pod = who.pod.as_deref().unwrap_or("-"),
            reason = %e,
            "an agent asserted a workload its node may not speak for; stream refused"
        );
        count(if e.status() == hyper::StatusCode::FORBIDDEN {
            "node_refused"
        } else {
            "node_unavailable"
        });
        return Err(Refusal {
            status: e.status(),
            reason: e.to_string(),
        });
    }
    count("accepted");
    Ok(Source {
        principal: Some(who.principal()),
        namespace: Some(who.namespace.clone()),
        dest_port,
        entry: "tunnel",
    })
}

async fn tunnel_stream(gw: Arc<Gateway>, source: Source, mut stream: TunnelStream) {
    let mut first = Vec::new();
    let sniffed = match tokio::time::timeout(gw.deadlines.sniff, sniff(&mut stream, &mut first)).await {
        Ok(r) => r,
        Err(_) => {
            tracing::info!(principal = source.principal.as_deref().unwrap_or("-"), deadline = ?gw.deadlines.sniff, "tunnel stream sent nothing in time; closed");
            gw.metrics.client_timeout("sniff");
            return;
        }
    };
    let stream = IdleTimeout::new(stream, gw.deadlines.idle);
    // Boxed: a held stream waiting for its first byte is sized for the
    // sniff, not for an HTTP/1 connection's or a passthrough's state.
    match sniffed {
        Ok(Sniffed::Http) => Box::pin(serve_http1(gw, Arc::new(source), Prefixed::new(first, stream))).await,
        Ok(Sniffed::Tls { sni }) => Box::pin(passthrough::run(gw, &source, sni, first, stream)).await,
        Ok(Sniffed::Empty) | Err(_) => {}
    }
}

/// Counts why a client connection ended, when it was one of our deadlines.
fn count_deadline(gw: &Gateway, e: &hyper::Error) {
    let idle = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(limits::is_idle_timeout);
    if idle {
        gw.metrics.client_timeout("idle");
    } else if e.is_timeout() {
        gw.metrics.client_timeout("request_head");
    }
}

async fn serve_http1<S>(gw: Arc<Gateway>, source: Arc<Source>, io: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let g = gw.clone();
    let svc = service_fn(move |req| g.clone().handle(source.clone(), req));
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(gw.deadlines.request_head)
        .max_buf_size(MAX_REQUEST_HEAD)
        .max_headers(MAX_HEADERS)
        .serve_connection(TokioIo::new(io), svc)
        .await;
    if let Err(e) = served {
        count_deadline(&gw, &e);
    }
}

pub async fn serve_direct(
    gw: Arc<Gateway>,
    tls: Arc<Reloading<rustls::ServerConfig>>,
    listener: TcpListener,
) {
    let port = listener.local_addr().ok().map(|a| a.port());
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "direct accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (gw, tls) = (gw.clone(), tls.clone());
        tokio::spawn(async move {
            let Some((stream, id)) = accept_mtls(&tls, tcp, peer).await else {
                return;
            };
            let source = Arc::new(source_of(&id, "direct", port));
            let deadlines = gw.deadlines;
            let g = gw.clone();
            let svc = service_fn(move |req| g.clone().handle(source.clone(), req));
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(deadlines.request_head)
                .max_buf_size(MAX_REQUEST_HEAD);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_header_list_size(MAX_REQUEST_HEAD as u32);
            let stream = IdleTimeout::new(stream, deadlines.idle);
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                if let Some(e) = e.downcast_ref::<hyper::Error>() {
                    count_deadline(&gw, e);
                }
            }
        });
    }
}

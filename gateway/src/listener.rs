//! The two ways in. The tunnel entry speaks HTTP/2 CONNECT over mTLS to
//! node agents (and believes their identity headers only if the peer is a
//! configured agent identity); the direct entry serves HTTP over mTLS to
//! workloads holding their own SPIFFE certificate.

use std::{sync::Arc, time::Duration};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use llm_egress_mesh::{
    identity::SpiffeId,
    tls::{peer_spiffe, Reloading},
    tunnel::{self, ConnectRequest, TunnelStream, WorkloadIdentity},
};
use tokio::net::TcpListener;

use crate::{
    limits::{self, IdleTimeout, MAX_HEADERS, MAX_REQUEST_HEAD},
    metrics::TunnelLabels,
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
        let (gw, tls, agents) = (gw.clone(), tls.clone(), agents.clone());
        tokio::spawn(async move {
            let Some((stream, id)) = accept_mtls(&tls, tcp, peer).await else {
                return;
            };
            let is_agent = agents.contains(&id);
            tracing::debug!(%peer, identity = %id, is_agent, "tunnel connection");
            let handler = move |req: ConnectRequest, stream: TunnelStream| {
                let (gw, id) = (gw.clone(), id.clone());
                async move { tunnel_stream(gw, id, is_agent, req, stream).await }
            };
            if let Err(e) = tunnel::serve(stream, handler).await {
                tracing::debug!(%peer, error = %e, "tunnel connection ended");
            }
        });
    }
}

async fn tunnel_stream(
    gw: Arc<Gateway>,
    peer_id: SpiffeId,
    is_agent: bool,
    req: ConnectRequest,
    mut stream: TunnelStream,
) {
    let dest_port = req
        .authority
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok());
    let kind = if is_agent { "agent" } else { "workload" };
    let count = |outcome: &'static str| {
        gw.metrics
            .tunnel_streams
            .get_or_create(&TunnelLabels { peer: kind, outcome })
            .inc()
    };
    let source = if is_agent {
        match WorkloadIdentity::from_headers(&req.headers) {
            Ok(Some(w)) => Source {
                principal: Some(w.principal()),
                namespace: Some(w.namespace.clone()),
                dest_port,
                entry: "tunnel",
            },
            Ok(None) => source_of(&peer_id, "tunnel", dest_port),
            Err(e) => {
                tracing::warn!(agent = %peer_id, error = %e, "tunnel stream with invalid identity headers closed");
                count("bad_identity");
                return;
            }
        }
    } else {
        if req
            .headers
            .keys()
            .any(|k| k.as_str().starts_with("x-llm-egress-"))
        {
            tracing::warn!(peer = %peer_id, "identity headers from a peer that is not an agent ignored");
        }
        source_of(&peer_id, "tunnel", dest_port)
    };
    count("accepted");
    let mut first = Vec::new();
    let deadlines = gw.deadlines;
    let sniffed = match tokio::time::timeout(deadlines.sniff, sniff(&mut stream, &mut first)).await {
        Ok(r) => r,
        Err(_) => {
            tracing::info!(principal = source.principal.as_deref().unwrap_or("-"), deadline = ?deadlines.sniff, "tunnel stream sent nothing in time; closed");
            gw.metrics.client_timeout("sniff");
            return;
        }
    };
    let stream = IdleTimeout::new(stream, deadlines.idle);
    match sniffed {
        Ok(Sniffed::Http) => serve_http1(gw, Arc::new(source), Prefixed::new(first, stream)).await,
        Ok(Sniffed::Tls { sni }) => passthrough::run(gw, &source, sni, first, stream).await,
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

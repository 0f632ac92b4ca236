//! The agent → gateway tunnel, HBONE-style: one long-lived HTTP/2
//! connection over mTLS; each captured TCP connection is one CONNECT stream
//! whose `:authority` is the original destination, tagged with the
//! workload's identity in `x-llm-egress-*` headers. Bytes then flow
//! unchanged both ways.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{
    header::{HeaderMap, HeaderValue},
    Method, Request, Response, StatusCode,
};
use tokio::io::{AsyncRead, AsyncWrite};

pub use crate::h2_stream::H2Stream as TunnelStream;
use crate::identity::SpiffeId;

pub const HEADER_WORKLOAD: &str = "x-llm-egress-workload";
pub const HEADER_NAMESPACE: &str = "x-llm-egress-namespace";
pub const HEADER_SERVICE_ACCOUNT: &str = "x-llm-egress-service-account";
pub const HEADER_POD: &str = "x-llm-egress-pod";
pub const HEADER_NODE: &str = "x-llm-egress-node";
/// The agent's node credential on Kubernetes: a projected service-account
/// token bound to the agent's pod (the gateway learns the node from it).
pub const HEADER_NODE_TOKEN: &str = "x-llm-egress-node-token";
/// Why the gateway refused a stream, on a non-200 answer.
pub const HEADER_REFUSAL: &str = "x-llm-egress-refusal";

/// Streams one tunnel connection may carry at once. A default of a few
/// hundred (hyper's was 200) would cap a node at 200 concurrent captured connections, since an agent
/// multiplexes all of them on one connection per gateway.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 16384;

/// Per-stream receive window. LLM requests and responses are kilobytes;
/// 256 KiB still moves ~250 MB/s at a 1 ms round trip, and bounds what one
/// stream whose reader stalls can make h2 buffer.
const STREAM_WINDOW: u32 = 256 * 1024;
/// Shared by every stream of a connection (an agent multiplexes a node's
/// captured connections on one). Bytes a stream's reader has not taken yet
/// (a pod that reads slowly, a slow provider) count against it, so it must
/// be many stream windows: 256 stalled streams, not 32, before the others
/// wait. It is a limit on what h2 may buffer, not memory taken up front.
const CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;
/// Largest header block accepted: identity headers and a node token are
/// well under 4 KiB.
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// A peer must speak HTTP/2 this soon after its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Both ends ping an idle connection this often, and drop it when a ping
/// goes unanswered for `KEEPALIVE_TIMEOUT` (a peer that vanished without a
/// FIN, e.g. a node that lost power).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("identity header {0} is not valid: {1}")]
    BadHeader(&'static str, String),
    #[error("cannot reach the gateway at {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("TLS with the gateway at {addr} failed: {source}")]
    Tls { addr: String, source: std::io::Error },
    #[error("HTTP/2 with the gateway failed: {0}")]
    Http(#[from] h2::Error),
    #[error("the gateway refused the tunnel: {0}: {1}")]
    Refused(StatusCode, String),
    #[error("the gateway at {addr} is {actual}, not the expected {expected}: check --gateway-identity and the gateway's certificate")]
    WrongPeer {
        addr: String,
        expected: String,
        actual: String,
    },
    #[error("invalid tunnel request: {0}")]
    Request(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("the gateway at {addr} was unreachable moments ago; retrying in {retry_in:?}")]
    Backoff { addr: String, retry_in: Duration },
}

/// Who a tunnelled connection belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadIdentity {
    pub spiffe: SpiffeId,
    pub namespace: String,
    pub service_account: String,
    pub pod: Option<String>,
    pub node: Option<String>,
}

fn header_safe(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 253
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

impl WorkloadIdentity {
    pub fn principal(&self) -> String {
        self.spiffe.principal()
    }

    pub fn write_headers(&self, headers: &mut HeaderMap) -> Result<(), TunnelError> {
        let mut put = |name: &'static str, v: &str| -> Result<(), TunnelError> {
            let value = HeaderValue::from_str(v).map_err(|_| TunnelError::BadHeader(name, v.into()))?;
            headers.insert(name, value);
            Ok(())
        };
        put(HEADER_WORKLOAD, &self.spiffe.to_string())?;
        put(HEADER_NAMESPACE, &self.namespace)?;
        put(HEADER_SERVICE_ACCOUNT, &self.service_account)?;
        if let Some(p) = &self.pod {
            put(HEADER_POD, p)?;
        }
        if let Some(n) = &self.node {
            put(HEADER_NODE, n)?;
        }
        Ok(())
    }

    /// Reads the identity headers; `None` when there are none. The caller
    /// decides whether the peer is allowed to assert them.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<WorkloadIdentity>, TunnelError> {
        let get = |name: &'static str| -> Result<Option<String>, TunnelError> {
            match headers.get(name) {
                None => Ok(None),
                Some(v) => {
                    let s = v
                        .to_str()
                        .map_err(|_| TunnelError::BadHeader(name, "not ASCII".into()))?;
                    Ok(Some(s.to_string()))
                }
            }
        };
        let Some(workload) = get(HEADER_WORKLOAD)? else {
            return Ok(None);
        };
        let spiffe =
            SpiffeId::parse(&workload).map_err(|e| TunnelError::BadHeader(HEADER_WORKLOAD, e.to_string()))?;
        let namespace = spiffe.namespace().map(str::to_string);
        let sa = spiffe.service_account().map(str::to_string);
        let (Some(namespace), Some(service_account)) = (namespace, sa) else {
            return Err(TunnelError::BadHeader(
                HEADER_WORKLOAD,
                "not a workload identity (…/ns/<ns>/sa/<sa>)".into(),
            ));
        };
        // The separate headers must agree with the SPIFFE ID.
        for (name, expect) in [
            (HEADER_NAMESPACE, &namespace),
            (HEADER_SERVICE_ACCOUNT, &service_account),
        ] {
            if let Some(v) = get(name)? {
                if &v != expect {
                    return Err(TunnelError::BadHeader(
                        name,
                        format!("{v:?} contradicts {workload}"),
                    ));
                }
            }
        }
        let pod = get(HEADER_POD)?;
        let node = get(HEADER_NODE)?;
        for (name, v) in [(HEADER_POD, &pod), (HEADER_NODE, &node)] {
            if let Some(v) = v {
                if !header_safe(v) {
                    return Err(TunnelError::BadHeader(name, v.clone()));
                }
            }
        }
        Ok(Some(WorkloadIdentity {
            spiffe,
            namespace,
            service_account,
            pod,
            node,
        }))
    }
}

/// One CONNECT stream as the server sees it.
#[derive(Debug)]
pub struct ConnectRequest {
    /// The original destination, `host:port`.
    pub authority: String,
    pub headers: HeaderMap,
}

/// A stream the server will not carry: the status answered and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: String,
}

/// Resolves when the peer stops answering pings (never, without a ping
/// handle).
async fn keepalive(ping: Option<h2::PingPong>) {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            // The connection failed: its driver reports why.
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}

/// Serves one tunnel connection. Each CONNECT stream is first put to
/// `admit` (identity checks), which takes the request; admitted streams are
/// answered `200` and handed to `handler` with what `admit` returned and
/// their byte stream, refused ones get the refusal's status and reason.
/// Other methods get `405`. One task per stream runs both.
pub async fn serve<IO, A, AF, T, H, F>(io: IO, admit: A, handler: H) -> Result<(), TunnelError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A: Fn(ConnectRequest) -> AF + Clone + Send + Sync + 'static,
    AF: Future<Output = Result<T, Refusal>> + Send + 'static,
    T: Send + 'static,
    H: Fn(T, TunnelStream) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST)
        .handshake::<_, Bytes>(io);
    let mut conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| TunnelError::Timeout(HANDSHAKE_TIMEOUT))??;
    let peer_gone = keepalive(conn.ping_pong());
    tokio::pin!(peer_gone);
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            () = &mut peer_gone => return Err(TunnelError::Timeout(KEEPALIVE_TIMEOUT)),
        };
        let Some(next) = next else {
            return Ok(());
        };
        let (req, respond) = next?;
        // The task holds the opening (the request, admission) boxed, and
        // frees it once the stream is answered: a held stream's task is
        // sized for its handler only.
        let opening = Box::pin(open_stream(req, respond, admit.clone()));
        let handler = handler.clone();
        tokio::spawn(async move {
            if let Some((admitted, stream)) = opening.await {
                handler(admitted, stream).await;
            }
        });
    }
}

/// Admits or refuses one stream; an admitted one is answered `200` and
/// returned with what `admit` gave.
async fn open_stream<A, AF, T>(
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    admit: A,
) -> Option<(T, TunnelStream)>
where
    A: Fn(ConnectRequest) -> AF,
    AF: Future<Output = Result<T, Refusal>>,
{
    fn answer_only<T>(
        respond: &mut h2::server::SendResponse<Bytes>,
        status: StatusCode,
        reason: Option<&str>,
    ) -> Option<T> {
        let mut resp = Response::new(());
        *resp.status_mut() = status;
        if let Some(v) = reason.and_then(|r| HeaderValue::from_str(r).ok()) {
            resp.headers_mut().insert(HEADER_REFUSAL, v);
        }
        // The peer may have reset the stream meanwhile: nothing to tell.
        let _ = respond.send_response(resp, true);
        None
    }
    if req.method() != Method::CONNECT {
        return answer_only(&mut respond, StatusCode::METHOD_NOT_ALLOWED, None);
    }
    let (parts, body) = req.into_parts();
    let Some(authority) = parts.uri.authority().map(|a| a.to_string()) else {
        return answer_only(&mut respond, StatusCode::BAD_REQUEST, None);
    };
    let connect = ConnectRequest {
        authority,
        headers: parts.headers,
    };
    // A stream the peer resets while it is being admitted (a token review
    // may take seconds) stops its admission at once: h2 no longer counts a
    // reset stream against the concurrent-stream limit, so a peer could
    // otherwise pile up admissions without bound by opening and resetting.
    let decided = {
        let admission = admit(connect);
        let reset = std::future::poll_fn(|cx| respond.poll_reset(cx));
        tokio::select! {
            decided = admission => decided,
            _ = reset => {
                tracing::debug!("tunnel stream reset by the peer during admission");
                return None;
            }
        }
    };
    let admitted = match decided {
        Ok(t) => t,
        Err(r) => return answer_only(&mut respond, r.status, Some(&r.reason)),
    };
    match respond.send_response(Response::new(()), false) {
        Ok(send) => Some((admitted, TunnelStream::new(send, body))),
        Err(e) => {
            tracing::debug!(error = %e, "tunnel stream reset before it was answered");
            None
        }
    }
}

/// The agent's node credential, read from a file that the kubelet rotates
/// (a projected service-account token); re-read when the file changes.
pub struct NodeToken {
    path: std::path::PathBuf,
    cached: std::sync::Mutex<Option<(std::time::SystemTime, HeaderValue)>>,
}

impl NodeToken {
    pub fn new(path: impl Into<std::path::PathBuf>) -> NodeToken {
        NodeToken {
            path: path.into(),
            cached: std::sync::Mutex::new(None),
        }
    }

    /// The current token as a (sensitive) header value.
    pub fn value(&self) -> Result<HeaderValue, TunnelError> {
        let unreadable = |e: String| TunnelError::Request(format!("node token {}: {e}", self.path.display()));
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .map_err(|e| unreadable(e.to_string()))?;
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, v)) = cached.as_ref() {
            if *at == modified {
                return Ok(v.clone());
            }
        }
        let text = std::fs::read_to_string(&self.path).map_err(|e| unreadable(e.to_string()))?;
        let mut v = HeaderValue::from_str(text.trim()).map_err(|_| unreadable("not a token".into()))?;
        v.set_sensitive(true);
        *cached = Some((modified, v.clone()));
        Ok(v)
    }
}

/// One client HTTP/2 connection to a gateway. A task drives it (and pings
/// it) until it fails or every handle is dropped.
#[derive(Clone)]
pub struct TunnelConnection {
    sender: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl TunnelConnection {
    /// Speaks HTTP/2 over `io` (an established mTLS stream).
    pub async fn handshake<IO>(io: IO) -> Result<TunnelConnection, TunnelError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, mut conn) = h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(MAX_HEADER_LIST)
            .handshake::<_, Bytes>(io)
            .await?;
        let closed = Arc::new(AtomicBool::new(false));
        let ping = conn.ping_pong();
        let flag = closed.clone();
        tokio::spawn(async move {
            tokio::select! {
                ended = conn => {
                    if let Err(e) = ended {
                        tracing::debug!(error = %e, "tunnel connection closed");
                    }
                }
                () = keepalive(ping) => {
                    tracing::warn!("the gateway stopped answering pings; tunnel connection dropped");
                }
            }
            flag.store(true, Ordering::Release);
        });
        Ok(TunnelConnection { sender, closed })
    }

    /// True once the connection has ended; streams must go to a new one.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Opens a CONNECT stream with `req`'s authority and headers.
    /// The gateway may be checking a node token with the API server; past
    /// `STREAM_ANSWER_TIMEOUT` the stream is given up (and reset) so that
    /// the pod's connection is closed rather than left hanging.
    pub async fn open(&self, req: Request<()>) -> Result<TunnelStream, TunnelError> {
        let opening = async {
            // A failure here is the connection's (a GOAWAY, say): mark it
            // closed at once, so the next stream dials a new one instead
            // of waiting for this one's streams to drain.
            let closed = |e: h2::Error| {
                self.closed.store(true, Ordering::Release);
                TunnelError::Http(e)
            };
            let mut sender = self.sender.clone().ready().await.map_err(closed)?;
            let (response, send) = sender.send_request(req, false).map_err(closed)?;
            Ok::<_, TunnelError>((response.await?, send))
        };
        let (resp, send) = tokio::time::timeout(STREAM_ANSWER_TIMEOUT, opening)
            .await
            .map_err(|_| TunnelError::Timeout(STREAM_ANSWER_TIMEOUT))??;
        if resp.status() != StatusCode::OK {
            let reason = resp
                .headers()
                .get(HEADER_REFUSAL)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            return Err(TunnelError::Refused(resp.status(), reason));
        }
        Ok(TunnelStream::new(send, resp.into_body()))
    }
}

/// The client half: one HTTP/2 connection to one gateway, reopened when it
/// breaks. Streams are multiplexed on it.
pub struct TunnelClient {
    /// `host:port` or `ip:port`; a name is resolved at every dial, so a
    /// gateway Service that moves is followed.
    addr: String,
    server_name: rustls::pki_types::ServerName<'static>,
    tls: Arc<dyn Fn() -> Arc<rustls::ClientConfig> + Send + Sync>,
    connect_timeout: Duration,
    connection: tokio::sync::Mutex<Option<TunnelConnection>>,
    /// The gateway's SPIFFE ID, checked after the handshake when set.
    expected_peer: Option<SpiffeId>,
    /// Sent with every stream when set (Kubernetes node binding).
    node_token: Option<Arc<NodeToken>>,
    /// After a failed dial, connections fail fast until this instant.
    backoff: std::sync::Mutex<(u32, Option<std::time::Instant>)>,
}

/// How long the gateway may take to answer a stream's CONNECT.
const STREAM_ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

impl TunnelClient {
    /// `tls` returns the current client config (so certificate reloads apply
    /// to the next connection).
    pub fn new(
        addr: impl Into<String>,
        server_name: &str,
        tls: Arc<dyn Fn() -> Arc<rustls::ClientConfig> + Send + Sync>,
    ) -> Result<TunnelClient, TunnelError> {
        let server_name = rustls::pki_types::ServerName::try_from(server_name.to_string())
            .map_err(|e| TunnelError::Request(format!("gateway name {server_name:?}: {e}")))?;
        Ok(TunnelClient {
            addr: addr.into(),
            server_name,
            tls,
            connect_timeout: Duration::from_secs(5),
            connection: tokio::sync::Mutex::new(None),
            expected_peer: None,
            node_token: None,
            backoff: std::sync::Mutex::new((0, None)),
        })
    }

    /// Refuse a gateway whose certificate is not `id` (the DNS name alone
    /// is not enough: any certificate of the CA may carry it).
    pub fn expect_peer(mut self, id: SpiffeId) -> TunnelClient {
        self.expected_peer = Some(id);
        self
    }

    /// Send this node credential with every stream.
    pub fn with_node_token(mut self, token: Arc<NodeToken>) -> TunnelClient {
        self.node_token = Some(token);
        self
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    async fn dial(&self) -> Result<TunnelConnection, TunnelError> {
        let addr = self.addr.as_str();
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| TunnelError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let connector = tokio_rustls::TlsConnector::from((self.tls)());
        let tls = connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|source| TunnelError::Tls {
                addr: addr.to_string(),
                source,
            })?;
        if let Some(expected) = &self.expected_peer {
            let actual = crate::tls::peer_spiffe(tls.get_ref().1);
            if actual.as_ref() != Some(expected) {
                return Err(TunnelError::WrongPeer {
                    addr: addr.to_string(),
                    expected: expected.to_string(),
                    actual: actual
                        .map_or_else(|| "a certificate without SPIFFE ID".into(), |a| a.to_string()),
                });
            }
        }
        TunnelConnection::handshake(tls).await
    }

    async fn connection(&self) -> Result<TunnelConnection, TunnelError> {
        let mut slot = self.connection.lock().await;
        if let Some(s) = slot.as_ref() {
            if !s.is_closed() {
                return Ok(s.clone());
            }
        }
        {
            let backoff = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(until) = backoff.1 {
                let now = std::time::Instant::now();
                if until > now {
                    return Err(TunnelError::Backoff {
                        addr: self.addr.clone(),
                        retry_in: until - now,
                    });
                }
            }
        }
        let dialed = match tokio::time::timeout(self.connect_timeout, self.dial()).await {
            Ok(r) => r,
            Err(_) => Err(TunnelError::Timeout(self.connect_timeout)),
        };
        let mut backoff = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        match dialed {
            Ok(s) => {
                *backoff = (0, None);
                *slot = Some(s.clone());
                Ok(s)
            }
            Err(e) => {
                // Exponential, capped: a gateway that comes back is used
                // again within BACKOFF_MAX.
                let failures = backoff.0.saturating_add(1);
                let wait = BACKOFF_START
                    .saturating_mul(1 << failures.min(5))
                    .min(BACKOFF_MAX);
                *backoff = (failures, Some(std::time::Instant::now() + wait));
                Err(e)
            }
        }
    }

    /// Opens a stream to `authority` (`ip:port` or `host:port`) on behalf of `who`.
    pub async fn connect(
        &self,
        authority: &str,
        who: &WorkloadIdentity,
    ) -> Result<TunnelStream, TunnelError> {
        let connection = self.connection().await?;
        let req = connect_request(authority, who, self.node_token.as_deref())?;
        connection.open(req).await
    }
}

/// The CONNECT request for `authority` on behalf of `who`.
pub fn connect_request(
    authority: &str,
    who: &WorkloadIdentity,
    node_token: Option<&NodeToken>,
) -> Result<Request<()>, TunnelError> {
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .body(())
        .map_err(|e| TunnelError::Request(e.to_string()))?;
    who.write_headers(req.headers_mut())?;
    if let Some(token) = node_token {
        req.headers_mut().insert(HEADER_NODE_TOKEN, token.value()?);
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who() -> WorkloadIdentity {
        WorkloadIdentity {
            spiffe: SpiffeId::workload("cluster.local", "default", "sleep"),
            namespace: "default".into(),
            service_account: "sleep".into(),
            pod: Some("sleep-7d9f".into()),
            node: Some("node-1".into()),
        }
    }

    #[test]
    fn identity_round_trips_through_headers() {
        let mut h = HeaderMap::new();
        who().write_headers(&mut h).unwrap();
        assert_eq!(h[HEADER_WORKLOAD], "spiffe://cluster.local/ns/default/sa/sleep");
        assert_eq!(WorkloadIdentity::from_headers(&h).unwrap(), Some(who()));
    }

    #[test]
    fn no_headers_is_no_identity() {
        assert_eq!(WorkloadIdentity::from_headers(&HeaderMap::new()).unwrap(), None);
    }

    #[test]
    fn contradicting_headers_are_rejected() {
        let mut h = HeaderMap::new();
        who().write_headers(&mut h).unwrap();
        h.insert(HEADER_NAMESPACE, HeaderValue::from_static("kube-system"));
        assert!(WorkloadIdentity::from_headers(&h).is_err());
        let mut h = HeaderMap::new();
        h.insert(
            HEADER_WORKLOAD,
            HeaderValue::from_static("spiffe://cluster.local/gateway"),
        );
        assert!(WorkloadIdentity::from_headers(&h).is_err());
    }

    /// A server on one end of an in-memory pipe that echoes each admitted
    /// stream upper-cased, and reports what it admitted.
    fn upper_echo_server(
        io: tokio::io::DuplexStream,
    ) -> tokio::sync::mpsc::UnboundedReceiver<(String, Option<WorkloadIdentity>)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (seen_tx, seen_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(serve(
            io,
            |req: ConnectRequest| async { Ok::<_, Refusal>(req) },
            move |req: ConnectRequest, mut stream: TunnelStream| {
                let seen_tx = seen_tx.clone();
                async move {
                    let who = WorkloadIdentity::from_headers(&req.headers).unwrap();
                    let _ = seen_tx.send((req.authority.clone(), who));
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                buf[..n].make_ascii_uppercase();
                                if stream.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = stream.shutdown().await;
                }
            },
        ));
        seen_rx
    }

    /// Opens a stream to the provider's address for `who()`.
    async fn open_stream_to_provider(conn: &TunnelConnection) -> Result<TunnelStream, TunnelError> {
        conn.open(connect_request("203.0.113.10:80", &who(), None).unwrap())
            .await
    }

    fn pipe() -> (tokio::io::DuplexStream, tokio::io::DuplexStream) {
        tokio::io::duplex(64 * 1024)
    }

    #[tokio::test]
    async fn connect_streams_carry_bytes_and_identity() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client_io, server_io) = pipe();
        let mut seen = upper_echo_server(server_io);
        let conn = TunnelConnection::handshake(client_io).await.unwrap();
        let mut stream = open_stream_to_provider(&conn).await.unwrap();
        stream.write_all(b"hello").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"HELLO");
        let (authority, who_seen) = seen.recv().await.unwrap();
        assert_eq!(authority, "203.0.113.10:80");
        assert_eq!(who_seen, Some(who()));
    }

    /// Megabytes each way on many streams at once: far past every flow
    /// control window, so it only completes if read bytes are released
    /// back to the peer and writes wait for capacity.
    #[tokio::test]
    async fn transfers_larger_than_the_windows_complete_on_concurrent_streams() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client_io, server_io) = pipe();
        let _seen = upper_echo_server(server_io);
        let conn = TunnelConnection::handshake(client_io).await.unwrap();
        let size = 3 * STREAM_WINDOW as usize + 12_345;
        let mut streams = Vec::new();
        for i in 0..4u8 {
            let stream = open_stream_to_provider(&conn).await.unwrap();
            let (mut rd, mut wr) = tokio::io::split(stream);
            let payload: Vec<u8> = (0..size).map(|j| b'a' + ((j + i as usize) % 26) as u8).collect();
            let expect = payload.to_ascii_uppercase();
            let writer = tokio::spawn(async move {
                wr.write_all(&payload).await.unwrap();
                wr.shutdown().await.unwrap();
            });
            let reader = tokio::spawn(async move {
                let mut out = Vec::new();
                rd.read_to_end(&mut out).await.unwrap();
                assert!(
                    out == expect,
                    "stream {i}: {} bytes back, not the {size} sent upper-cased",
                    out.len()
                );
            });
            streams.push((writer, reader));
        }
        let all = async {
            for (w, r) in streams {
                w.await.unwrap();
                r.await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(30), all)
            .await
            .expect("transfers stalled: flow control capacity is not released");
    }

    /// A stream the agent drops (its pod's connection failed) must end the
    /// gateway's side too, not hold it open.
    #[tokio::test]
    async fn a_dropped_client_stream_ends_the_servers_read() {
        use tokio::io::AsyncReadExt;
        let (client_io, server_io) = pipe();
        let (ended_tx, mut ended_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(serve(
            server_io,
            |_: ConnectRequest| async { Ok::<_, Refusal>(()) },
            move |_: (), mut stream: TunnelStream| {
                let ended_tx = ended_tx.clone();
                async move {
                    let mut buf = [0u8; 16];
                    let r = stream.read(&mut buf).await;
                    let _ = ended_tx.send(r.map_err(|e| e.kind()));
                }
            },
        ));
        let conn = TunnelConnection::handshake(client_io).await.unwrap();
        let stream = open_stream_to_provider(&conn).await.unwrap();
        drop(stream);
        let ended = tokio::time::timeout(Duration::from_secs(10), ended_rx.recv())
            .await
            .expect("the server's read is still waiting on a dropped stream");
        // An error, not a clean end: a pod's upload cut short must not
        // reach the provider as a complete request.
        assert!(
            matches!(ended, Some(Err(_))),
            "the server read {ended:?} from a dropped stream"
        );
    }

    /// Writing to a stream the gateway has reset fails, and does not wait
    /// for window capacity that will never come.
    #[tokio::test]
    async fn writes_to_a_stream_the_server_reset_fail() {
        use tokio::io::AsyncWriteExt;
        let (client_io, server_io) = pipe();
        tokio::spawn(serve(
            server_io,
            |_: ConnectRequest| async { Ok::<_, Refusal>(()) },
            // Dropped unread: the server resets the stream.
            |_: (), stream: TunnelStream| async move { drop(stream) },
        ));
        let conn = TunnelConnection::handshake(client_io).await.unwrap();
        let mut stream = open_stream_to_provider(&conn).await.unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        let writing = async {
            // More than the stream's window: without the reset noticed,
            // this would wait for capacity forever.
            for _ in 0..(2 * STREAM_WINDOW as usize / chunk.len() + 1) {
                stream.write_all(&chunk).await?;
            }
            Ok::<_, std::io::Error>(())
        };
        let r = tokio::time::timeout(Duration::from_secs(10), writing)
            .await
            .expect("a write to a reset stream waited forever");
        assert!(r.is_err(), "writes to a reset stream succeeded");
    }

    /// A stream reset while it is being admitted stops its admission: a
    /// peer that opens and resets streams cannot pile up admissions (h2
    /// no longer counts a reset stream against the stream limit).
    #[tokio::test]
    async fn a_stream_reset_during_admission_stops_the_admission() {
        let (client_io, server_io) = pipe();
        let (admitting_tx, admitting_rx) = tokio::sync::oneshot::channel::<()>();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let slot = Arc::new(std::sync::Mutex::new(Some((admitting_tx, started_tx))));
        tokio::spawn(serve(
            server_io,
            move |_: ConnectRequest| {
                let taken = slot.lock().unwrap().take();
                async move {
                    // Held until the admission is dropped.
                    let _admitting = taken.map(|(admitting, started)| {
                        let _ = started.send(());
                        admitting
                    });
                    std::future::pending::<Result<(), Refusal>>().await
                }
            },
            |_: (), _: TunnelStream| async {},
        ));
        let conn = TunnelConnection::handshake(client_io).await.unwrap();
        let opening = open_stream_to_provider(&conn);
        tokio::select! {
            _ = opening => panic!("a stream whose admission never ends was answered"),
            _ = started_rx => {}
        }
        // `opening` is dropped here: the client resets the stream.
        let ended = tokio::time::timeout(Duration::from_secs(10), admitting_rx).await;
        assert!(
            matches!(ended, Ok(Err(_))),
            "the admission of a reset stream is still running"
        );
    }

    /// An agent that stops answering pings (its node vanished) does not
    /// hold the gateway's connection, and its streams, forever.
    #[tokio::test(start_paused = true)]
    async fn an_agent_that_stops_answering_pings_is_dropped() {
        let (client_io, server_io) = pipe();
        // The client sends its preface, then is never polled again.
        let (_sender, frozen) = h2::client::handshake(client_io).await.unwrap();
        let served = serve(
            server_io,
            |_: ConnectRequest| async { Ok::<_, Refusal>(()) },
            |_: (), _: TunnelStream| async {},
        );
        let r = tokio::time::timeout((KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT) * 3, served)
            .await
            .expect("a silent agent's connection was never dropped");
        assert!(
            matches!(r, Err(TunnelError::Timeout(d)) if d == KEEPALIVE_TIMEOUT),
            "{r:?}"
        );
        drop(frozen);
    }

    #[tokio::test]
    async fn a_refused_stream_gets_the_status_and_reason_and_no_handler() {
        let (client_io, server_io) = pipe();
        tokio::spawn(serve(
            server_io,
            |_: ConnectRequest| async {
                Err::<(), _>(Refusal {
                    status: StatusCode::FORBIDDEN,
                    reason: "pod x runs on node-b".into(),
                })
            },
            |_: (), _: TunnelStream| async { panic!("a refused stream was served") },
        ));
        let conn = TunnelConnection::handshake(client_io).await.unwrap();
        let r = open_stream_to_provider(&conn).await;
        match r {
            Err(TunnelError::Refused(status, reason)) => {
                assert_eq!(status, StatusCode::FORBIDDEN);
                assert_eq!(reason, "pod x runs on node-b");
            }
            Err(e) => panic!("refused stream: wrong error {e}"),
            Ok(_) => panic!("a refused stream was opened"),
        }
    }

    #[tokio::test]
    async fn only_connect_is_served() {
        let (client_io, server_io) = pipe();
        let _seen = upper_echo_server(server_io);
        let conn = TunnelConnection::handshake(client_io).await.unwrap();
        let get = Request::get("https://api.openai.com/v1/models").body(()).unwrap();
        match conn.open(get).await {
            Err(TunnelError::Refused(status, _)) => assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED),
            Err(e) => panic!("GET: wrong error {e}"),
            Ok(_) => panic!("a GET was given a tunnel stream"),
        }
    }

    /// A gateway that accepts a stream but never answers it (admission
    /// stuck) does not leave the pod's connection hanging.
    #[tokio::test(start_paused = true)]
    async fn an_unanswered_stream_times_out() {
        let (client_io, server_io) = pipe();
        tokio::spawn(serve(
            server_io,
            |_: ConnectRequest| std::future::pending::<Result<(), Refusal>>(),
            |_: (), _: TunnelStream| async {},
        ));
        let conn = TunnelConnection::handshake(client_io).await.unwrap();
        let opening = open_stream_to_provider(&conn);
        let r = tokio::time::timeout(STREAM_ANSWER_TIMEOUT * 2, opening)
            .await
            .expect("an unanswered stream was waited on past its deadline");
        assert!(matches!(r, Err(TunnelError::Timeout(_))), "{:?}", r.err());
    }

    /// A peer that passed TLS but never speaks HTTP/2 does not hold a
    /// connection (and its task) forever.
    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_dropped_after_the_handshake_deadline() {
        let (_client_io, server_io) = pipe();
        let served = serve(
            server_io,
            |_: ConnectRequest| async { Ok::<_, Refusal>(()) },
            |_: (), _: TunnelStream| async {},
        );
        let r = tokio::time::timeout(HANDSHAKE_TIMEOUT * 3, served)
            .await
            .expect("a silent peer was never dropped");
        assert!(matches!(r, Err(TunnelError::Timeout(_))), "{r:?}");
    }

    /// A gateway that stops answering (its node lost power: no FIN, no
    /// RST) is noticed by the keepalive, so new streams dial afresh.
    #[tokio::test(start_paused = true)]
    async fn a_gateway_that_stops_answering_pings_closes_the_connection() {
        let (client_io, server_io) = pipe();
        // The server completes the handshake, then is never polled again.
        let frozen = tokio::spawn(async move {
            let conn = h2::server::handshake(server_io).await.unwrap();
            std::future::pending::<()>().await;
            drop(conn);
        });
        let conn = TunnelConnection::handshake(client_io).await.unwrap();
        let deadline = tokio::time::Instant::now() + (KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT) * 2;
        while !conn.is_closed() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the connection to a silent gateway is still considered open"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        frozen.abort();
    }

    #[test]
    fn the_node_token_is_reread_when_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "tok-1\n").unwrap();
        let t = NodeToken::new(&f);
        assert_eq!(t.value().unwrap(), "tok-1");
        assert!(t.value().unwrap().is_sensitive());
        std::fs::write(&f, "tok-2").unwrap();
        let later = std::time::SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(t.value().unwrap(), "tok-2");
    }

    /// Fuzz target: any identity headers an agent (or anyone) sends. Never
    /// panics; whatever is accepted is consistent and survives a round trip.
    #[test]
    fn fuzz_identity_headers() {
        const NAMES: [&str; 6] = [
            HEADER_WORKLOAD,
            HEADER_NAMESPACE,
            HEADER_SERVICE_ACCOUNT,
            HEADER_POD,
            HEADER_NODE,
            HEADER_NODE_TOKEN,
        ];
        bolero::check!()
            .with_type::<(Vec<(u8, Vec<u8>)>, String, String)>()
            .with_iterations(crate::FUZZ_ITERATIONS)
            .for_each(|(raw, ns, sa)| {
                let mut h = HeaderMap::new();
                // A plausible workload ID half of the time, so that the
                // checks after the SPIFFE parse are reached too.
                if let Ok(v) = HeaderValue::from_str(&format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")) {
                    h.insert(HEADER_WORKLOAD, v);
                }
                for (i, value) in raw {
                    if let Ok(v) = HeaderValue::from_bytes(value) {
                        h.append(NAMES[*i as usize % NAMES.len()], v);
                    }
                }
                if let Ok(Some(w)) = WorkloadIdentity::from_headers(&h) {
                    assert_eq!(w.spiffe.namespace(), Some(w.namespace.as_str()));
                    assert_eq!(w.spiffe.service_account(), Some(w.service_account.as_str()));
                    let mut again = HeaderMap::new();
                    w.write_headers(&mut again).unwrap();
                    assert_eq!(WorkloadIdentity::from_headers(&again).unwrap(), Some(w));
                }
            });
    }
}

//! The HTTPS client to providers: pooled connections (hyper-util), rustls
//! with the system roots plus an optional extra CA, timeouts, and optional
//! host → address overrides (like curl's --resolve) for local setups.

pub mod outlier;

use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{
        connect::{dns::Name, HttpConnector},
        Client,
    },
    rt::TokioExecutor,
};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to the provider: {0}")]
    Connect(String),
    #[error("the provider did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the provider connection failed: {0}")]
    Failed(String),
}

impl UpstreamError {
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::Connect(_) => StatusCode::SERVICE_UNAVAILABLE,
            UpstreamError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            UpstreamError::Failed(_) => StatusCode::BAD_GATEWAY,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "connect",
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::Failed(_) => "failed",
        }
    }
}

/// Host name resolution with overrides; everything else goes to the system resolver.
#[derive(Clone, Default)]
pub struct Resolver {
    overrides: Arc<HashMap<String, IpAddr>>,
}

impl Resolver {
    pub fn new(overrides: HashMap<String, IpAddr>) -> Resolver {
        Resolver {
            overrides: Arc::new(
                overrides
                    .into_iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v))
                    .collect(),
            ),
        }
    }

    pub async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        if let Some(ip) = self.overrides.get(&host.to_ascii_lowercase()) {
            return Ok(vec![SocketAddr::new(*ip, port)]);
        }
        Ok(tokio::net::lookup_host((host, port)).await?.collect())
    }
}

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let this = self.clone();
        // The connector puts the URI's port on every address.
        Box::pin(async move { Ok(this.resolve(name.as_str(), 0).await?.into_iter()) })
    }
}

/// Parses `host=ip` overrides.
pub fn parse_override(s: &str) -> Result<(String, IpAddr), String> {
    let (host, ip) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected HOST=IP"))?;
    let ip = ip
        .parse()
        .map_err(|_| format!("{s:?}: {ip:?} is not an IP address"))?;
    Ok((host.to_string(), ip))
}

/// A request body to a provider: bytes the gateway adapted, or a client's
/// upload streamed through.
pub type UpstreamBody = http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// `bytes` as an upstream body.
pub fn full(bytes: Bytes) -> UpstreamBody {
    use http_body_util::BodyExt;
    Full::new(bytes).map_err(|e| match e {}).boxed()
}

pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector<Resolver>>, UpstreamBody>,
    pub resolver: Resolver,
    timeout: Duration,
}

/// TLS to providers: system roots, plus `extra_ca` (e.g. a test CA).
pub fn client_tls(extra_ca: Option<&Path>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = extra_ca {
        for cert in llm_egress_mesh::tls::load_certs(path)? {
            roots
                .add(cert)
                .map_err(|e| anyhow::anyhow!("extra CA {}: {e}", path.display()))?;
        }
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(cfg)
}

impl Upstream {
    pub fn new(tls: rustls::ClientConfig, resolver: Resolver, timeout: Duration) -> Upstream {
        let mut http = HttpConnector::new_with_resolver(resolver.clone());
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(https);
        Upstream {
            client,
            resolver,
            timeout,
        }
    }

    /// Sends a request; the response body streams (only the head is timed).
    pub async fn send(
        &self,
        req: Request<UpstreamBody>,
    ) -> Result<Response<hyper::body::Incoming>, UpstreamError> {
        match tokio::time::timeout(self.timeout, self.client.request(req)).await {
            Err(_) => Err(UpstreamError::Timeout(self.timeout)),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) if e.is_connect() => Err(UpstreamError::Connect(error_chain(&e))),
            Ok(Err(e)) => Err(UpstreamError::Failed(error_chain(&e))),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_parse() {
        assert_eq!(
            parse_override("dashscope.aliyuncs.com=127.0.0.5").unwrap(),
            ("dashscope.aliyuncs.com".into(), "127.0.0.5".parse().unwrap())
        );
        assert!(parse_override("nohost").is_err());
        assert!(parse_override("a=notip").is_err());
    }

    #[tokio::test]
    async fn overrides_win_and_keep_the_port() {
        let r = Resolver::new(HashMap::from([(
            "LLM.example".to_string(),
            "127.0.0.9".parse().unwrap(),
        )]));
        assert_eq!(
            r.resolve("llm.example", 443).await.unwrap(),
            vec!["127.0.0.9:443".parse().unwrap()]
        );
    }
}

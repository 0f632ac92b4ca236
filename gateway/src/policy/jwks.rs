//! Issuers' keys for RequestAuthentication, as Istio handles them: inline
//! `jwks` parsed once per distinct text; a `jwksUri` fetched in the
//! background (`https://`, `http://`, or a `file://` path), refreshed
//! periodically (default 20 minutes; a file every 5 s), retried with
//! backoff on failure while the last good keys stay in use. A request never
//! waits on a fetch: until an issuer's first successful fetch its tokens
//! are rejected (never accepted against a placeholder). A fetch has a
//! deadline and a size limit, and never goes to a link-local or cloud
//! metadata address, whatever the name resolves to.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use jsonwebtoken::jwk::JwkSet;
use llm_egress_config::resources::JwtRule;

use crate::upstream::Resolver;

/// The largest JWKS document read.
const MAX_JWKS: usize = 1024 * 1024;
/// How often a `file://` JWKS is re-read.
const FILE_REFRESH: Duration = Duration::from_secs(5);
/// Longest wait between retries of a failing fetch.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct JwksSettings {
    pub refresh: Duration,
    pub timeout: Duration,
}

#[derive(Default)]
struct Remote {
    keys: Option<Arc<JwkSet>>,
    /// When to fetch next; `None`: now.
    next: Option<Instant>,
    failures: u32,
    last_error: Option<String>,
}

pub struct JwksCache {
    settings: JwksSettings,
    tls: rustls::ClientConfig,
    resolver: Resolver,
    inline: Mutex<HashMap<String, Arc<JwkSet>>>,
    remote: RwLock<HashMap<String, Remote>>,
}

/// Addresses a JWKS fetch must never reach: link-local (cloud metadata
/// lives there) and the metadata services outside it.
pub fn forbidden_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                // Alibaba Cloud's metadata service, Azure's wire server.
                || v4.octets() == [100, 100, 100, 200]
                || v4.octets() == [168, 63, 129, 16]
        }
        IpAddr::V6(v6) => {
            (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6.is_unspecified()
                // AWS's IPv6 metadata service.
                || v6.segments() == [0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254]
                || v6.to_ipv4_mapped().is_some_and(|v4| forbidden_address(IpAddr::V4(v4)))
                // IPv4-compatible (::a.b.c.d) and NAT64 (64:ff9b::/96) forms.
                || embedded_v4(v6).is_some_and(|v4| forbidden_address(IpAddr::V4(v4)))
        }
    }
}

/// A file, read only if it is a regular file of at most `MAX_JWKS` bytes.
async fn read_bounded(path: &str) -> Result<Bytes, String> {
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(|e| format!("cannot read {path}: {e}"))?;
    if !meta.is_file() || meta.len() > MAX_JWKS as u64 {
        return Err(format!(
            "{path} is not a regular file of at most {MAX_JWKS} bytes"
        ));
    }
    tokio::fs::read(path)
        .await
        .map(Bytes::from)
        .map_err(|e| format!("cannot read {path}: {e}"))
}

fn embedded_v4(v6: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    let seg = v6.segments();
    let compatible = seg[..6] == [0, 0, 0, 0, 0, 0];
    let nat64 = seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    let o = v6.octets();
    (compatible || nat64).then(|| std::net::Ipv4Addr::new(o[12], o[13], o[14], o[15]))
}

impl JwksCache {
    pub fn new(settings: JwksSettings, tls: rustls::ClientConfig, resolver: Resolver) -> JwksCache {
        JwksCache {
            settings,
            tls,
            resolver,
            inline: Mutex::new(HashMap::new()),
            remote: RwLock::new(HashMap::new()),
        }
    }

    /// The keys for `rule` now, without waiting on anything.
    pub fn keys(&self, rule: &JwtRule) -> Result<Arc<JwkSet>, String> {
        if let Some(text) = &rule.jwks {
            let mut inline = self.inline.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(k) = inline.get(text) {
                return Ok(k.clone());
            }
            let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("JWKS is not valid: {e}"))?;
            // Bounded: texts of removed policies are dropped wholesale.
            if inline.len() >= 256 {
                inline.clear();
            }
            let set = Arc::new(set);
            inline.insert(text.clone(), set.clone());
            return Ok(set);
        }
        let Some(uri) = &rule.jwks_uri else {
            return Err("no JWKS configured".into());
        };
        {
            let remote = self.remote.read().unwrap_or_else(|p| p.into_inner());
            if let Some(r) = remote.get(uri) {
                return match (&r.keys, &r.last_error) {
                    (Some(k), _) => Ok(k.clone()),
                    (None, Some(e)) => {
                        Err(format!("keys of {} not fetched yet from {uri}: {e}", rule.issuer))
                    }
                    (None, None) => Err(format!("keys of {} not fetched yet from {uri}", rule.issuer)),
                };
            }
        }
        // A URI the refresher has not seen yet: it fetches it next round.
        self.remote
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(uri.clone())
            .or_default();
        Err(format!("keys of {} not fetched yet from {uri}", rule.issuer))
    }

    /// Fetches what is due among `uris` (the configuration's), forgets the
    /// rest. Called by `run`; one round.
    pub async fn refresh(&self, uris: &[String]) {
        let due: Vec<String> = {
            let mut remote = self.remote.write().unwrap_or_else(|p| p.into_inner());
            remote.retain(|u, _| uris.contains(u));
            for u in uris {
                remote.entry(u.clone()).or_default();
            }
            let now = Instant::now();
            remote
                .iter()
                .filter(|(_, r)| r.next.is_none_or(|n| n <= now))
                .map(|(u, _)| u.clone())
                .collect()
        };
        let fetches = due.iter().map(|uri| async move { (uri, self.fetch(uri).await) });
        for (uri, result) in futures::future::join_all(fetches).await {
            let mut remote = self.remote.write().unwrap_or_else(|p| p.into_inner());
            let Some(r) = remote.get_mut(uri) else { continue };
            let refresh = if uri.starts_with("file://") {
                FILE_REFRESH
            } else {
                self.settings.refresh
            };
            match result {
                Ok(set) => {
                    let changed = r.keys.as_deref() != Some(&set);
                    if changed {
                        tracing::info!(uri, keys = set.keys.len(), "JWKS fetched");
                    }
                    r.keys = Some(Arc::new(set));
                    r.failures = 0;
                    r.last_error = None;
                    r.next = Some(Instant::now() + refresh);
                }
                Err(e) => {
                    r.failures = r.failures.saturating_add(1);
                    let backoff = Duration::from_secs(1 << r.failures.min(6)).min(MAX_BACKOFF);
                    tracing::warn!(uri, error = %e, retry_in = ?backoff, keeping_last_keys = r.keys.is_some(), "JWKS fetch failed");
                    r.last_error = Some(e);
                    r.next = Some(Instant::now() + backoff);
                }
            }
        }
    }

    async fn fetch(&self, uri: &str) -> Result<JwkSet, String> {
        let text = tokio::time::timeout(self.settings.timeout, async {
            match uri.strip_prefix("file://") {
                Some(path) => read_bounded(path).await,
                None => self.fetch_remote(uri).await,
            }
        })
        .await
        .map_err(|_| format!("no answer within {:?}", self.settings.timeout))??;
        serde_json::from_slice(&text).map_err(|e| format!("not a JWKS document: {e}"))
    }

    async fn fetch_remote(&self, uri: &str) -> Result<Bytes, String> {
        let parsed: hyper::Uri = uri.parse().map_err(|e| format!("not a URI: {e}"))?;
        let host = parsed
            .host()
            .ok_or("the URI has no host")?
            .trim_matches(['[', ']']);
        let port = parsed
            .port_u16()
            .unwrap_or(if parsed.scheme_str() == Some("http") {
                80
            } else {
                443
            });
        // Resolve once, vet every address, and connect only to a vetted one.
        let addrs: Vec<IpAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => self
                .resolver
                .resolve(host, port)
                .await
                .map_err(|e| format!("cannot resolve {host}: {e}"))?
                .into_iter()
                .map(|a| a.ip())
                .collect(),
        };
        if let Some(bad) = addrs.iter().find(|ip| forbidden_address(**ip)) {
            return Err(format!(
                "{host} resolves to {bad}, a link-local or metadata address: refused"
            ));
        }
        let ip = *addrs.first().ok_or_else(|| format!("{host} has no address"))?;
        let pinned = Resolver::new(HashMap::from([(host.to_string(), ip)]));
        let mut http = HttpConnector::new_with_resolver(pinned);
        http.enforce_http(false);
        http.set_connect_timeout(Some(self.settings.timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(self.tls.clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
        let resp = client
            .get(parsed)
            .await
            .map_err(|e| format!("fetch failed: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("answered {}", resp.status()));
        }
        Limited::new(resp.into_body(), MAX_JWKS)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| format!("reading the document: {e}"))
    }

    /// Keeps every `jwksUri` of the configuration fresh, forever.
    pub async fn run(self: Arc<Self>, uris: impl Fn() -> Vec<String>) {
        loop {
            self.refresh(&uris()).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> JwksCache {
        let tls =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
        JwksCache::new(
            JwksSettings {
                refresh: Duration::from_secs(1200),
                timeout: Duration::from_secs(1),
            },
            tls,
            Resolver::new(HashMap::from([(
                "metadata.test".to_string(),
                "169.254.169.254".parse().unwrap(),
            )])),
        )
    }

    const JWKS: &str = r#"{"keys":[{"kty":"oct","kid":"k1","alg":"HS256","k":"c2VjcmV0"}]}"#;

    #[test]
    fn metadata_and_link_local_addresses_are_forbidden() {
        for bad in [
            "169.254.169.254",
            "100.100.100.200",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "0.0.0.0",
        ] {
            assert!(forbidden_address(bad.parse().unwrap()), "{bad}");
        }
        for ok in ["127.0.0.1", "10.0.0.1", "203.0.113.5", "2001:db8::1"] {
            assert!(!forbidden_address(ok.parse().unwrap()), "{ok}");
        }
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_metadata_is_never_fetched() {
        let c = cache();
        let e = c.fetch("https://metadata.test/jwks.json").await.unwrap_err();
        assert!(e.contains("metadata address: refused"), "{e}");
        let e = c
            .fetch("http://169.254.169.254/latest/meta-data")
            .await
            .unwrap_err();
        assert!(e.contains("refused"), "{e}");
    }

    #[tokio::test]
    async fn until_a_first_fetch_succeeds_keys_are_refused_then_the_last_good_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("jwks.json");
        let uri = format!("file://{}", file.display());
        let rule = JwtRule {
            issuer: "https://idp.test".into(),
            jwks_uri: Some(uri.clone()),
            ..Default::default()
        };
        let c = cache();
        // Not seen yet, then not fetched (the file is missing): refused.
        assert!(c.keys(&rule).unwrap_err().contains("not fetched yet"));
        c.refresh(std::slice::from_ref(&uri)).await;
        assert!(c.keys(&rule).unwrap_err().contains("cannot read"));
        std::fs::write(&file, JWKS).unwrap();
        // Still backing off: no fetch before the retry is due.
        c.refresh(std::slice::from_ref(&uri)).await;
        assert!(c.keys(&rule).is_err());
        c.remote.write().unwrap().get_mut(&uri).unwrap().next = None;
        c.refresh(std::slice::from_ref(&uri)).await;
        assert_eq!(c.keys(&rule).unwrap().keys.len(), 1);
        // A broken document later: the last good keys stay.
        std::fs::write(&file, "not json").unwrap();
        c.remote.write().unwrap().get_mut(&uri).unwrap().next = None;
        c.refresh(std::slice::from_ref(&uri)).await;
        assert_eq!(c.keys(&rule).unwrap().keys.len(), 1);
        // Removed from the configuration: forgotten.
        c.refresh(&[]).await;
        assert!(c.remote.read().unwrap().is_empty());
    }

    #[test]
    fn inline_keys_are_parsed_once() {
        let c = cache();
        let rule = JwtRule {
            issuer: "i".into(),
            jwks: Some(JWKS.into()),
            ..Default::default()
        };
        let a = c.keys(&rule).unwrap();
        let b = c.keys(&rule).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
    }
}

//! rustls configurations for both ends of the mesh: mutual TLS against a
//! trust bundle, the peer's SPIFFE ID, and certificate files reloaded when
//! they change (new handshakes use new files; open connections keep theirs).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    ClientConfig, RootCertStore, ServerConfig,
};

use crate::identity::{node_from_cert, spiffe_from_cert, SpiffeId};

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{what} {path} holds no PEM {what}")]
    Empty { what: &'static str, path: PathBuf },
    #[error("trust bundle {path}: {message}")]
    Roots { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
}

/// Where a component's identity and trust bundle live on disk.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA certificates peers must chain to.
    pub ca: PathBuf,
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|source| TlsError::Read {
            what: "certificate",
            path: path.into(),
            source,
        })?
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            what: "certificate",
            path: path.into(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what: "certificate",
            path: path.into(),
        });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Read {
        what: "private key",
        path: path.into(),
        source,
    })
}

pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::Roots {
            path: path.into(),
            message: e.to_string(),
        })?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server side: a client certificate chaining to `files.ca` is required.
pub fn server_config(files: &TlsFiles, alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
    let roots = Arc::new(load_roots(&files.ca)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// Client side: presents `files.cert` and trusts only `files.ca`.
pub fn client_config(files: &TlsFiles, alpn: &[&[u8]]) -> Result<ClientConfig, TlsError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(load_roots(&files.ca)?)
        .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// The SPIFFE ID of the peer's leaf certificate.
pub fn peer_spiffe(state: &rustls::CommonState) -> Option<SpiffeId> {
    state
        .peer_certificates()?
        .first()
        .and_then(|c| spiffe_from_cert(c))
}

/// The node named by the peer's leaf certificate (agents in static mode).
pub fn peer_node(state: &rustls::CommonState) -> Option<String> {
    state.peer_certificates()?.first().and_then(|c| node_from_cert(c))
}

type Builder<T> = Box<dyn Fn(&TlsFiles) -> Result<T, TlsError> + Send + Sync>;

/// A configuration rebuilt from its files when any of them changes.
pub struct Reloading<T> {
    current: ArcSwap<T>,
    files: TlsFiles,
    build: Builder<T>,
    stamp: std::sync::Mutex<Vec<Option<SystemTime>>>,
}

fn stamps(files: &TlsFiles) -> Vec<Option<SystemTime>> {
    [&files.cert, &files.key, &files.ca]
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

impl<T: Send + Sync + 'static> Reloading<T> {
    pub fn new(
        files: TlsFiles,
        build: impl Fn(&TlsFiles) -> Result<T, TlsError> + Send + Sync + 'static,
    ) -> Result<Arc<Self>, TlsError> {
        let stamp = stamps(&files);
        let first = build(&files)?;
        Ok(Arc::new(Reloading {
            current: ArcSwap::from_pointee(first),
            files,
            build: Box::new(build),
            stamp: std::sync::Mutex::new(stamp),
        }))
    }

    pub fn current(&self) -> Arc<T> {
        self.current.load_full()
    }

    /// Rebuilds if a file changed; a broken file keeps the old config.
    pub fn check(&self) -> bool {
        let now = stamps(&self.files);
        let mut last = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if *last == now {
            return false;
        }
        match (self.build)(&self.files) {
            Ok(cfg) => {
                self.current.store(Arc::new(cfg));
                *last = now;
                tracing::info!(cert = %self.files.cert.display(), "TLS certificates reloaded");
                true
            }
            Err(e) => {
                // Keep the stamp stale so that a later fix is picked up.
                tracing::warn!(error = %e, "TLS certificate reload failed; keeping the previous certificates");
                false
            }
        }
    }

    /// Checks the files every `period` for as long as the runtime runs.
    pub fn watch(self: &Arc<Self>, period: Duration) {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(this) = this.upgrade() else { return };
                this.check();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs;

    fn write_identity(dir: &Path, ca: &certs::Pem, id: &SpiffeId) -> TlsFiles {
        let leaf = certs::issue(ca, id, &["localhost".into()]).unwrap();
        certs::write(dir, "leaf", &leaf).unwrap();
        std::fs::write(dir.join("ca.pem"), &ca.cert).unwrap();
        TlsFiles {
            cert: dir.join("leaf.pem"),
            key: dir.join("leaf-key.pem"),
            ca: dir.join("ca.pem"),
        }
    }

    #[tokio::test]
    async fn mutual_tls_exposes_both_spiffe_ids() {
        let ca = certs::create_ca("cluster.local").unwrap();
        let sdir = tempfile::tempdir().unwrap();
        let cdir = tempfile::tempdir().unwrap();
        let server_id = SpiffeId::parse("spiffe://cluster.local/ns/istio-system/sa/gateway").unwrap();
        let client_id = SpiffeId::workload("cluster.local", "llm-egress", "agent");
        let sfiles = write_identity(sdir.path(), &ca, &server_id);
        let cfiles = write_identity(cdir.path(), &ca, &client_id);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(&sfiles, &[ALPN_H2]).unwrap()));
        let connector =
            tokio_rustls::TlsConnector::from(Arc::new(client_config(&cfiles, &[ALPN_H2]).unwrap()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = acceptor.accept(tcp).await.unwrap();
            peer_spiffe(tls.get_ref().1)
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tls = connector
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        assert_eq!(peer_spiffe(tls.get_ref().1), Some(server_id));
        assert_eq!(server.await.unwrap(), Some(client_id));
    }

    #[tokio::test]
    async fn client_from_another_ca_is_refused() {
        let ca = certs::create_ca("cluster.local").unwrap();
        let rogue = certs::create_ca("cluster.local").unwrap();
        let sdir = tempfile::tempdir().unwrap();
        let cdir = tempfile::tempdir().unwrap();
        let sfiles = write_identity(
            sdir.path(),
            &ca,
            &SpiffeId::parse("spiffe://cluster.local/gw").unwrap(),
        );
        let mut cfiles = write_identity(
            cdir.path(),
            &rogue,
            &SpiffeId::workload("cluster.local", "x", "y"),
        );
        // The client trusts the real CA but presents a rogue certificate.
        std::fs::write(cdir.path().join("real-ca.pem"), &ca.cert).unwrap();
        cfiles.ca = cdir.path().join("real-ca.pem");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(&sfiles, &[]).unwrap()));
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(&cfiles, &[]).unwrap()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            acceptor.accept(tcp).await.is_ok()
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        // TLS 1.3: the client may finish before the server rejects its cert.
        if let Ok(mut tls) = connector.connect("localhost".try_into().unwrap(), tcp).await {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 1];
            assert!(!matches!(tls.read(&mut buf).await, Ok(n) if n > 0));
        }
        assert!(
            !server.await.unwrap(),
            "server accepted a certificate from another CA"
        );
    }

    #[test]
    fn reload_picks_up_new_files_and_survives_broken_ones() {
        let ca = certs::create_ca("cluster.local").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let files = write_identity(dir.path(), &ca, &SpiffeId::workload("cluster.local", "a", "b"));
        let r = Reloading::new(files.clone(), |f| load_certs(&f.cert)).unwrap();
        let first = r.current();
        assert!(!r.check());
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&files.cert, "garbage").unwrap();
        assert!(!r.check(), "a broken file must not replace the config");
        assert_eq!(r.current(), first);
        let leaf = certs::issue(&ca, &SpiffeId::workload("cluster.local", "c", "d"), &[]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&files.cert, &leaf.cert).unwrap();
        assert!(r.check());
        assert_ne!(r.current(), first);
    }
}

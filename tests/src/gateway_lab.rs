//! A gateway on loopback with a local OpenAI-compatible HTTPS provider, a
//! local CA and SPIFFE certificates; clients that speak the agent's tunnel
//! protocol or the direct mTLS entry, as the tests need.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, Request, Response};
use hyper_util::rt::TokioIo;
use llm_egress_mesh::{
    certs,
    identity::SpiffeId,
    tls::{client_config, TlsFiles, ALPN_H2},
    tunnel::{TunnelClient, TunnelStream, WorkloadIdentity},
};
use serde_json::Value;

use crate::{
    env,
    process::{wait_for, Daemon, Place},
};

pub const PROVIDER_HOST: &str = "dashscope.aliyuncs.com";
pub const SEED_FILES: [&str; 3] = ["egress-gw.yaml", "dashscope-qwen.yaml", "dashscope-route.yaml"];

pub fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

/// The seed's Step 4 body.
pub const SEED_BODY: &str = r#"{
"messages": [
{"role": "user", "content": "Tell me about yourself"}
]
}"#;

pub struct GatewayLab {
    pub gateway: Option<Daemon>,
    pub provider: Option<Daemon>,
    pub dir: tempfile::TempDir,
    pub ip: Ipv4Addr,
    pub api_key: String,
    /// Read resources and the key Secret from the API with this kubeconfig
    /// instead of the `config` directory.
    pub kubeconfig: Option<PathBuf>,
    /// `--node-auth` with the API (`static` unless a test binds agents to
    /// nodes through it).
    pub kube_node_auth: &'static str,
    /// More `run` flags (for the next `start_gateway`).
    pub extra_args: Vec<String>,
    /// More test-provider flags (for the next `start_provider`).
    pub provider_args: Vec<String>,
}

impl GatewayLab {
    pub fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    pub fn tunnel_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip.into(), 15008)
    }

    pub fn direct_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip.into(), 15443)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip.into(), 15020)
    }

    /// Certificates, the seed's first three manifests, the provider and the gateway.
    pub fn new() -> GatewayLab {
        Self::build(None)
    }

    /// Like `new`, but the gateway watches the Kubernetes API (`kubeconfig`)
    /// and takes its key from the Secret there, not from its environment.
    pub fn with_kubernetes(kubeconfig: PathBuf) -> GatewayLab {
        Self::build(Some(kubeconfig))
    }

    fn build(kubeconfig: Option<PathBuf>) -> GatewayLab {
        env::require_root();
        let dir = tempfile::Builder::new()
            .prefix("llm-egress-gw")
            .tempdir()
            .expect("tempdir");
        let ip = env::loopback_ip();
        // A key that looks real enough to be recognised if it ever leaked.
        let api_key = format!(
            "sk-test-{:x}{:x}",
            std::process::id(),
            Instant::now().elapsed().as_nanos() ^ 0x5eed_cafe
        );
        let mut lab = GatewayLab {
            gateway: None,
            provider: None,
            dir,
            ip,
            api_key,
            kubeconfig,
            kube_node_auth: "static",
            extra_args: Vec::new(),
            provider_args: Vec::new(),
        };

        issue_certs(&lab.certs(), &["default/sleep", "default/other"], &["localhost"]);
        std::fs::create_dir_all(lab.config()).unwrap();
        for f in SEED_FILES {
            std::fs::copy(examples_dir().join(f), lab.config().join(f)).unwrap();
        }
        lab.start_provider();
        lab.start_gateway();
        lab
    }

    pub fn start_provider(&mut self) {
        let listen = format!("{}:443", self.ip);
        self.provider = Some(spawn_provider(
            &Place::default(),
            &listen,
            &self.certs(),
            self.dir.path(),
            &self.api_key,
            &self.provider_args,
        ));
    }

    pub fn stop_provider(&mut self) {
        if let Some(mut p) = self.provider.take() {
            p.stop();
        }
    }

    pub fn gateway_args(&self) -> Vec<String> {
        let mut args = gateway_run_args(
            &self.certs(),
            &self.config(),
            &self.tunnel_addr().to_string(),
            &self.admin_addr().to_string(),
        );
        args.extend(["--direct-listen".into(), self.direct_addr().to_string()]);
        args.extend(["--resolve".into(), format!("{PROVIDER_HOST}={}", self.ip)]);
        if let Some(kc) = &self.kubeconfig {
            let i = args
                .iter()
                .position(|a| a == "--config")
                .expect("--config in the arguments");
            args.splice(
                i..i + 2,
                [
                    "--kubernetes".into(),
                    "--kubeconfig".into(),
                    kc.display().to_string(),
                    // The lab's clients carry no node token; the node
                    // binding against the API has its own test.
                    "--node-auth".into(),
                    self.kube_node_auth.into(),
                ],
            );
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// Restarts the gateway (with the current `extra_args`).
    pub fn restart_gateway(&mut self) {
        if let Some(mut g) = self.gateway.take() {
            g.stop();
        }
        self.start_gateway();
    }

    /// The gateway's resident memory, in KiB.
    pub fn gateway_rss_kib(&self) -> u64 {
        let pid = self
            .gateway
            .as_ref()
            .and_then(|g| g.child.as_ref())
            .map(|c| c.id())
            .expect("a running gateway");
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// A counter or gauge from `/metrics` (0 when absent).
    pub async fn metric(&self, series: &str) -> f64 {
        self.admin_get("/metrics")
            .await
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    pub fn start_gateway(&mut self) {
        let g = Daemon::start_with_env(
            "gateway",
            &Place::default(),
            &env::gateway_bin(),
            &self.gateway_args(),
            &if self.kubeconfig.is_some() {
                vec![("RUST_LOG", "info")]
            } else {
                vec![("API_KEY", self.api_key.as_str()), ("RUST_LOG", "info")]
            },
            self.dir.path(),
        );
        self.gateway = Some(g);
        let admin = self.admin_addr();
        wait_for("the gateway to be ready", Duration::from_secs(15), || {
            if let Some(g) = self.gateway.as_mut() {
                g.assert_running();
            }
            std::net::TcpStream::connect(admin).ok().map(|_| ())
        });
    }

    pub fn gateway_logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    pub fn provider_requests(&self) -> Vec<Value> {
        provider_requests(self.dir.path())
    }

    /// Writes (or replaces) a resource file in the watched directory.
    pub fn apply(&self, name: &str, yaml: &str) {
        write_atomically(&self.config().join(name), yaml);
    }

    pub fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.config().join(name));
    }

    pub fn tls_files(&self, name: &str) -> TlsFiles {
        TlsFiles {
            cert: self.certs().join(format!("{name}.pem")),
            key: self.certs().join(format!("{name}-key.pem")),
            ca: self.certs().join("ca.pem"),
        }
    }

    /// The seed's request through the tunnel, with certificate `cert`, as `who`.
    pub async fn seed_call(&self, cert: &str, who: &WorkloadIdentity) -> (hyper::StatusCode, String) {
        let client = self.tunnel_client(cert);
        let stream = client
            .connect(&format!("{}:80", self.ip), who)
            .await
            .expect("tunnel stream");
        let mut http = http_over(stream).await;
        let resp = http
            .send_request(seed_request(SEED_BODY))
            .await
            .expect("response");
        let status = resp.status();
        (status, body_text(resp).await)
    }

    /// A tunnel client presenting certificate `name` (`agent`, `workload-default-sleep`, …).
    pub fn tunnel_client(&self, name: &str) -> TunnelClient {
        self.tunnel_client_to(name, self.tunnel_addr())
    }

    /// `tunnel_client` to another gateway replica's tunnel entry.
    pub fn tunnel_client_to(&self, name: &str, tunnel: SocketAddr) -> TunnelClient {
        let cfg = Arc::new(client_config(&self.tls_files(name), &[ALPN_H2]).expect("client TLS config"));
        TunnelClient::new(tunnel.to_string(), "localhost", Arc::new(move || cfg.clone()))
            .expect("tunnel client")
    }

    pub async fn admin_get(&self, path: &str) -> String {
        let tcp = tokio::net::TcpStream::connect(self.admin_addr())
            .await
            .expect("admin reachable");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get(path)
            .header("host", "admin")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned()
    }
}

impl Default for GatewayLab {
    fn default() -> Self {
        Self::new()
    }
}

/// Writes then renames, as a ConfigMap update does, so that a watcher never
/// reads half a file.
pub fn write_atomically(path: &Path, text: &str) {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("renaming to {}: {e}", path.display()));
}

/// `llm-egress-gateway run` arguments for a lab: the certificates from
/// `issue_certs`, the watched `config` directory, JSON logs, the test CA
/// trusted for providers.
pub fn gateway_run_args(certs: &Path, config: &Path, tunnel: &str, admin: &str) -> Vec<String> {
    let c = |f: &str| certs.join(f).display().to_string();
    vec![
        "--log-format".into(),
        "json".into(),
        "run".into(),
        "--config".into(),
        config.display().to_string(),
        "--tls-cert".into(),
        c("gateway.pem"),
        "--tls-key".into(),
        c("gateway-key.pem"),
        "--trust-bundle".into(),
        c("ca.pem"),
        "--tunnel-listen".into(),
        tunnel.into(),
        "--admin".into(),
        admin.into(),
        "--upstream-ca".into(),
        c("ca.pem"),
        "--node-workloads".into(),
        c("node-workloads.yaml"),
    ]
}

/// The lab's agent runs on this node (its certificate says so).
pub const LAB_NODE: &str = "node-1";

/// Issues a lab's certificates into `dir`: `llm-egress-gateway certs` (CA,
/// gateway, agent and `workloads`), plus the provider's certificate for
/// dashscope.aliyuncs.com from the same CA.
pub fn issue_certs(dir: &Path, workloads: &[&str], gateway_dns: &[&str]) {
    let mut cmd = Command::new(env::gateway_bin());
    cmd.args(["certs", "--out"])
        .arg(dir)
        .args(["--agent-node", LAB_NODE]);
    for w in workloads {
        cmd.args(["--workload", w]);
    }
    for d in gateway_dns {
        cmd.args(["--gateway-dns", d]);
    }
    let out = cmd.output().expect("running llm-egress-gateway certs");
    assert!(
        out.status.success(),
        "certs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ca = certs::Pem {
        cert: std::fs::read_to_string(dir.join("ca.pem")).unwrap(),
        key: std::fs::read_to_string(dir.join("ca-key.pem")).unwrap(),
    };
    let provider = certs::issue(
        &ca,
        &SpiffeId::parse("spiffe://provider.test/dashscope").unwrap(),
        &[PROVIDER_HOST.to_string()],
    )
    .unwrap();
    certs::write(dir, "provider", &provider).unwrap();
    // Static node binding: the lab's one node may assert every workload.
    std::fs::write(
        dir.join("node-workloads.yaml"),
        format!("nodes:\n  {LAB_NODE}: ['*']\n"),
    )
    .unwrap();
}

/// Starts the OpenAI-compatible test provider on `listen` (port 443), with
/// the certificate from `issue_certs`, expecting `key`, logging requests to
/// `<log_dir>/provider.jsonl`.
pub fn spawn_provider(
    place: &Place,
    listen: &str,
    certs: &Path,
    log_dir: &Path,
    key: &str,
    extra: &[String],
) -> Daemon {
    let mut args: Vec<String> = vec![
        "--listen".into(),
        listen.into(),
        "--cert".into(),
        certs.join("provider.pem").display().to_string(),
        "--key".into(),
        certs.join("provider-key.pem").display().to_string(),
        "--log".into(),
        log_dir.join("provider.jsonl").display().to_string(),
    ];
    args.extend(extra.iter().cloned());
    // The log is appended to across restarts: wait for this start's own
    // "listening", not a previous one's (a request sent before the new
    // provider listens gets 503).
    let listening = |text: &str| text.matches("listening").count();
    let before = listening(&std::fs::read_to_string(log_dir.join("provider.log")).unwrap_or_default());
    let p = Daemon::start_with_env(
        "provider",
        place,
        &env::tests_bin("llm-egress-fake-provider"),
        &args,
        &[("PROVIDER_API_KEY", key)],
        log_dir,
    );
    wait_for("the provider", Duration::from_secs(10), || {
        (listening(&p.logs()) > before).then_some(())
    });
    p
}

/// The value of the series `name` (e.g. `gen_ai_client_token_usage_sum`)
/// whose labels include every `labels` pair, from Prometheus text.
pub fn series_value(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let (set, value) = rest.rsplit_once(' ')?;
        if !set.starts_with('{') && !set.is_empty() {
            return None;
        }
        labels
            .iter()
            .all(|(k, v)| set.contains(&format!("{k}=\"{v}\"")))
            .then(|| value.trim().parse().ok())?
    })
}

/// Requests the test provider logged under `log_dir`.
pub fn provider_requests(log_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(log_dir.join("provider.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

pub fn identity(ns: &str, sa: &str) -> WorkloadIdentity {
    WorkloadIdentity {
        spiffe: SpiffeId::workload("cluster.local", ns, sa),
        namespace: ns.into(),
        service_account: sa.into(),
        pod: Some(format!("{sa}-0")),
        node: Some("node-1".into()),
    }
}

/// An HTTP/1.1 client connection over a tunnel stream (what a pod's curl
/// sends, byte for byte, once the agent has tunnelled it).
pub async fn http_over(stream: TunnelStream) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 over the tunnel");
    tokio::spawn(conn);
    sender
}

pub fn seed_request(body: &str) -> Request<Full<Bytes>> {
    Request::post("/")
        .header("host", PROVIDER_HOST)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

pub async fn body_text(resp: Response<Incoming>) -> String {
    String::from_utf8_lossy(
        &resp
            .into_body()
            .collect()
            .await
            .expect("response body")
            .to_bytes(),
    )
    .into_owned()
}

/// Reads every file under `dir` as text, for leak checks.
pub fn read_all(dir: &Path) -> String {
    let mut out = String::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_file() && !e.file_name().to_string_lossy().ends_with(".pem") {
                out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
    }
    out
}

/// Sends `req` as `default/<sa>` through the tunnel entry `tunnel` (a
/// gateway replica's); the response head, its body still streaming.
pub async fn send_as(
    lab: &GatewayLab,
    tunnel: SocketAddr,
    sa: &str,
    req: Request<Full<Bytes>>,
) -> Response<Incoming> {
    let stream = lab
        .tunnel_client_to("agent", tunnel)
        .connect(&format!("{}:80", lab.ip), &identity("default", sa))
        .await
        .expect("tunnel stream");
    let mut http = http_over(stream).await;
    http.send_request(req).await.expect("response")
}

/// The seed's request as `default/<sa>` through the tunnel, to `path`, with
/// extra headers: status, headers and body.
pub async fn call_as(
    lab: &GatewayLab,
    sa: &str,
    path: &str,
    extra: &[(&str, &str)],
) -> (hyper::StatusCode, hyper::HeaderMap, String) {
    let mut req = seed_request(SEED_BODY);
    *req.uri_mut() = path.parse().expect("a request path");
    for (k, v) in extra {
        req.headers_mut().insert(
            hyper::header::HeaderName::from_bytes(k.as_bytes()).expect("a header name"),
            v.parse().expect("a header value"),
        );
    }
    let resp = send_as(lab, lab.tunnel_addr(), sa, req).await;
    let (status, headers) = (resp.status(), resp.headers().clone());
    (status, headers, body_text(resp).await)
}

/// A streamed completion's response head, through the tunnel as default/sleep.
pub async fn stream_call(lab: &GatewayLab) -> Response<Incoming> {
    let resp = send_as(
        lab,
        lab.tunnel_addr(),
        "sleep",
        seed_request(r#"{"stream": true, "messages": [{"role": "user", "content": "count"}]}"#),
    )
    .await;
    assert_eq!(resp.status(), hyper::StatusCode::OK);
    resp
}

/// A TLS acceptor for the test servers (HTTP/1.1), from PEM files.
pub fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let certs = llm_egress_mesh::tls::load_certs(cert)?;
    let key = llm_egress_mesh::tls::load_key(key)?;
    let mut cfg =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

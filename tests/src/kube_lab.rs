//! A real Kubernetes API server for the watcher tests: etcd and a
//! kube-apiserver v1.20 (built once from Debian's sources by `cargo xtask
//! setup`), serving TLS with a test CA, static tokens for an admin, the
//! agent's and the gateway's service accounts, and RBAC enforced, so the
//! chart's least-privilege roles are what the agent and gateway run with.
//! Everything listens on loopback (of the host or of a test namespace).

use std::{
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use crate::{
    gateway_lab::issue_certs,
    process::{run, wait_for, Daemon, Place},
};

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// helm and kubectl, installed by `cargo xtask setup`.
pub fn tools_dir() -> PathBuf {
    home().join(".local/share/llm-egress/k8s-tools")
}

/// The cached kube-apiserver build.
pub fn apiserver_dir() -> PathBuf {
    home().join(".cache/llm-egress/kube-v1.20.2")
}

pub fn tool(name: &str) -> PathBuf {
    let p = tools_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask setup` (it installs helm and kubectl)",
        p.display()
    );
    p
}

pub fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn chart_dir() -> PathBuf {
    repo_dir().join("deploy/helm/llm-egress")
}

/// Who a kubeconfig authenticates as.
#[derive(Clone, Copy, Debug)]
pub enum User {
    Admin,
    /// system:serviceaccount:llm-egress:llm-egress-agent
    Agent,
    /// system:serviceaccount:istio-system:istio-egressgateway-service-account
    Gateway,
}

impl User {
    fn token(self) -> &'static str {
        match self {
            User::Admin => "admin-token",
            User::Agent => "agent-token",
            User::Gateway => "gateway-token",
        }
    }
}

const TOKENS: &str = "admin-token,admin,1,\"system:masters\"\n\
agent-token,system:serviceaccount:llm-egress:llm-egress-agent,2,\"system:serviceaccounts,system:serviceaccounts:llm-egress\"\n\
gateway-token,system:serviceaccount:istio-system:istio-egressgateway-service-account,3,\"system:serviceaccounts,system:serviceaccounts:istio-system\"\n";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub struct ApiServer {
    pub apiserver: Option<Daemon>,
    pub etcd: Daemon,
    pub dir: tempfile::TempDir,
    pub port: u16,
}

impl ApiServer {
    /// Starts etcd and the API server in `place` and waits until it is ready.
    pub fn start(place: &Place) -> ApiServer {
        let binary = apiserver_dir().join("kube-apiserver");
        assert!(
            binary.exists(),
            "{} is missing: run `sudo -E cargo xtask setup` (it builds kube-apiserver v1.20 from Debian's sources once)",
            binary.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("llm-egress-kube")
            .tempdir()
            .expect("tempdir");
        issue_certs(&dir.path().join("certs"), &[], &["localhost"]);
        std::fs::write(dir.path().join("tokens.csv"), TOKENS).expect("token file");
        let sa_key = dir.path().join("sa.key");
        let out = std::process::Command::new("openssl")
            .args(["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out"])
            .arg(&sa_key)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (client, peer) = (free_port(), free_port());
        let etcd = Daemon::start(
            "etcd",
            place,
            Path::new("etcd"),
            &[
                "--data-dir".to_string(),
                dir.path().join("etcd").display().to_string(),
                "--listen-client-urls".into(),
                format!("http://127.0.0.1:{client}"),
                "--advertise-client-urls".into(),
                format!("http://127.0.0.1:{client}"),
                "--listen-peer-urls".into(),
                format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls".into(),
                format!("http://127.0.0.1:{peer}"),
                "--initial-cluster".into(),
                format!("default=http://127.0.0.1:{peer}"),
            ],
            dir.path(),
        );
        let mut api = ApiServer {
            apiserver: None,
            etcd,
            port: free_port(),
            dir,
        };
        std::fs::write(api.dir.path().join("etcd.port"), client.to_string()).expect("write");
        api.start_apiserver(place);
        api
    }

    fn start_apiserver(&mut self, place: &Place) {
        let d = |f: &str| self.dir.path().join(f).display().to_string();
        let etcd_port = std::fs::read_to_string(self.dir.path().join("etcd.port")).expect("etcd port");
        let args: Vec<String> = [
            "--etcd-servers",
            &format!("http://127.0.0.1:{etcd_port}"),
            "--bind-address",
            "127.0.0.1",
            "--secure-port",
            &self.port.to_string(),
            // Only written into the `kubernetes` Endpoints (which refuse loopback).
            "--advertise-address",
            "192.0.2.1",
            "--tls-cert-file",
            &d("certs/gateway.pem"),
            "--tls-private-key-file",
            &d("certs/gateway-key.pem"),
            "--service-account-key-file",
            &d("sa.key"),
            "--service-account-signing-key-file",
            &d("sa.key"),
            "--service-account-issuer",
            "https://kubernetes.default.svc",
            "--token-auth-file",
            &d("tokens.csv"),
            "--authorization-mode",
            "RBAC",
            "--service-cluster-ip-range",
            "10.96.0.0/16",
            // No controller-manager creates service accounts here.
            "--disable-admission-plugins",
            "ServiceAccount",
            "--allow-privileged",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let binary = apiserver_dir().join("kube-apiserver");
        self.apiserver = Some(Daemon::start(
            "kube-apiserver",
            place,
            &binary,
            &args,
            self.dir.path(),
        ));
        wait_for("the API server to be ready", Duration::from_secs(60), || {
            if let Some(a) = self.apiserver.as_mut() {
                a.assert_running();
            }
            let out = self.kubectl(place, &["get", "--raw", "/readyz"]);
            out.status.success().then_some(())
        });
    }

    /// Stops the API server (etcd keeps the state), as in an upgrade.
    pub fn stop_apiserver(&mut self) {
        if let Some(mut a) = self.apiserver.take() {
            a.stop();
        }
    }

    pub fn restart_apiserver(&mut self, place: &Place) {
        self.stop_apiserver();
        self.start_apiserver(place);
    }

    /// A kubeconfig for `user`, trusting the test CA.
    pub fn kubeconfig(&self, user: User) -> PathBuf {
        let path = self
            .dir
            .path()
            .join(format!("{user:?}.kubeconfig").to_lowercase());
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://localhost:{}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: {}\ncontexts:\n- name: test\n  context: {{cluster: test, user: u}}\ncurrent-context: test\n",
            self.port,
            self.dir.path().join("certs/ca.pem").display(),
            user.token()
        );
        std::fs::write(&path, text).expect("kubeconfig");
        path
    }

    /// kubectl as admin.
    pub fn kubectl(&self, place: &Place, args: &[&str]) -> Output {
        let kc = self.kubeconfig(User::Admin);
        let mut all = vec!["--kubeconfig", kc.to_str().expect("utf-8 path")];
        all.extend_from_slice(args);
        run(
            place,
            tool("kubectl").to_str().expect("utf-8 path"),
            &all,
            Duration::from_secs(60),
        )
    }

    /// kubectl as admin, which must succeed; returns stdout.
    pub fn kubectl_ok(&self, place: &Place, args: &[&str]) -> String {
        let out = self.kubectl(place, args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply` of a YAML text (written to a file first). kubectl's own
    /// schema check is off: what is accepted or refused is the API server's call.
    pub fn apply(&self, place: &Place, yaml: &str) -> Output {
        let file = tempfile::Builder::new()
            .suffix(".yaml")
            .tempfile_in(self.dir.path())
            .expect("temp file");
        std::fs::write(file.path(), yaml).expect("write manifest");
        self.kubectl(
            place,
            &[
                "apply",
                "--validate=false",
                "-f",
                file.path().to_str().expect("utf-8 path"),
            ],
        )
    }

    /// The seed's Gateway, LLMProvider and LLMRoute, and the provider-keys
    /// Secret holding `key` as `API_KEY`, as a user installs them.
    pub fn apply_seed_with_key(&self, place: &Place, key: &str) {
        for f in crate::gateway_lab::SEED_FILES {
            self.apply_ok(
                place,
                &std::fs::read_to_string(crate::gateway_lab::examples_dir().join(f)).expect("seed file"),
            );
        }
        self.kubectl_ok(
            place,
            &[
                "-n",
                "istio-system",
                "create",
                "secret",
                "generic",
                "llm-egress-provider-keys",
                &format!("--from-literal=API_KEY={key}"),
            ],
        );
    }

    pub fn apply_ok(&self, place: &Place, yaml: &str) {
        let out = self.apply(place, yaml);
        assert!(
            out.status.success(),
            "kubectl apply failed: {}\n{yaml}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Renders the chart with `helm template` (CRDs included) and returns the
/// documents of the given kinds.
pub fn render_chart(set: &[&str]) -> String {
    let mut cmd = std::process::Command::new(tool("helm"));
    cmd.args(["template", "llm-egress"])
        .arg(chart_dir())
        .arg("--include-crds");
    for s in set {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().expect("running helm");
    assert!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 manifests")
}

/// The documents of `yaml` whose kind is one of `kinds`.
pub fn documents_of(yaml: &str, kinds: &[&str]) -> String {
    yaml.split("\n---")
        .filter(|doc| {
            doc.lines().any(|l| {
                l.strip_prefix("kind: ")
                    .is_some_and(|k| kinds.contains(&k.trim()))
            })
        })
        .map(|d| format!("---{}\n", d.trim_start_matches('-')))
        .collect()
}

/// The chart's generated CRDs.
pub fn crds() -> String {
    std::fs::read_to_string(chart_dir().join("crds/crds.yaml")).expect("the chart's CRDs")
}

/// The chart's RBAC, exactly as `helm template` renders it, plus the
/// namespaces it binds into.
pub fn chart_rbac() -> String {
    let rendered = render_chart(&[]);
    documents_of(
        &rendered,
        &[
            "Namespace",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
        ],
    )
}

/// Sets up CRDs and RBAC; returns once the CRDs are served.
pub fn install_basics(api: &ApiServer, place: &Place, crds: &str) {
    api.apply_ok(place, crds);
    wait_for("the CRDs to be served", Duration::from_secs(30), || {
        api.kubectl(place, &["get", "llmroutes,authorizationpolicies", "-A"])
            .status
            .success()
            .then_some(())
    });
    api.apply_ok(place, &chart_rbac());
}

/// An object's `Accepted` condition: (status, message); empty before the gateway wrote one.
pub fn accepted(api: &ApiServer, kind: &str, ns: &str, name: &str) -> (String, String) {
    let out = api.kubectl(
        &Place::default(),
        &[
            "-n",
            ns,
            "get",
            kind,
            name,
            "-o",
            "jsonpath={.status.conditions[0].status}|{.status.conditions[0].message}",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (s, m) = text.split_once('|').unwrap_or(("", ""));
    (s.to_string(), m.to_string())
}

/// CRDs as a laxer distribution may have installed them: any spec passes
/// admission, so bad resources reach the watchers.
pub fn lax_crds() -> String {
    crds()
        .split("\n---")
        .map(|doc| {
            let mut v: serde_json::Value = match serde_yaml_ng::from_str(doc) {
                Ok(v) => v,
                Err(_) => return String::new(),
            };
            if v.is_null() {
                return String::new();
            }
            v["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"] =
                serde_json::json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
            format!("---\n{}", serde_yaml_ng::to_string(&v).unwrap())
        })
        .collect()
}

//! The capture lab: a "node" running the agent, a "pod" linked to it over
//! veth, and an "internet" holding TEST-NET addresses with a small HTTP
//! server. Routes exist only between these namespaces: nothing can leave.
//!
//! ```text
//!  pod 10.77.1.2 fd77:1::2 ──veth── 10.77.1.1 fd77:1::1  node  198.51.100.1 fd77:ff::1 ──veth── internet
//!                                     (agent proxy :15001)                                 203.0.113.10/20
//!                                                                                          2001:db8::10/20
//! ```

use std::{
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use serde_json::Value;

use crate::{
    cgroup::{cgroup2_mount, Bpffs, TestCgroup},
    env,
    netns::{veth, Netns},
    process::{run, wait_for, Daemon, Place},
};

pub const LLM_HOST: &str = "llm.example.test";
pub const LLM_V4: &str = "203.0.113.10";
pub const LLM_V6: &str = "2001:db8::10";
/// Served by the internet host but not a capture target.
pub const OTHER_V4: &str = "203.0.113.20";
pub const POD_V4: &str = "10.77.1.2";
pub const NODE_POD_V4: &str = "10.77.1.1";
pub const NODE_INET_V4: &str = "198.51.100.1";
pub const NODE_INET_V6: &str = "fd77:ff::1";
pub const ADMIN: &str = "127.0.0.1:15021";
/// The seed's provider host; the internet host answers for it too.
pub const SEED_HOST: &str = "dashscope.aliyuncs.com";
pub const GATEWAY_NAME: &str = "istio-egressgateway.istio-system.svc.cluster.local";
pub const GATEWAY_TUNNEL: &str = "10.77.2.2:15008";

pub struct CaptureLab {
    // Field order is drop order: processes first, then cgroups, mounts, namespaces.
    pub agent: Option<Daemon>,
    pub gateway: Option<Daemon>,
    pub provider: Option<Daemon>,
    pub internet_server: Daemon,
    pub cgroups: TestCgroup,
    pub bpffs: Bpffs,
    pub node: Netns,
    pub pod: Netns,
    pub internet: Netns,
    /// Where the egress gateway runs (a "central" namespace next to the node).
    pub gw: Netns,
    pub workdir: tempfile::TempDir,
    /// The provider key only the gateway (and the fake provider) know.
    pub api_key: String,
    /// Whether the agent tunnels to the gateway (set by `start_mesh`).
    pub tunnel: bool,
    /// Extra arguments for the fake provider (benchmarks tune it).
    pub provider_extra: Vec<String>,
    /// Extra arguments for the agent's `run`.
    pub agent_extra: Vec<String>,
    /// Extra arguments for the gateway's `run` (benchmarks tune it).
    pub gateway_extra: Vec<String>,
    /// Cgroup of the enrolled workload `default/sleep`.
    pub sleep_cgroup: PathBuf,
    /// A cgroup that is never enrolled.
    pub other_cgroup: PathBuf,
}

impl CaptureLab {
    pub fn new() -> CaptureLab {
        env::require_root();
        let id = env::unique_id();
        let node = Netns::new(&format!("le{id}-node"));
        let pod = Netns::new(&format!("le{id}-pod"));
        let internet = Netns::new(&format!("le{id}-inet"));
        let gw = Netns::new(&format!("le{id}-gw"));

        veth(&node, "veth-pod", &pod, "eth0");
        node.ip("addr add 10.77.1.1/24 dev veth-pod");
        node.ip("addr add fd77:1::1/64 dev veth-pod nodad");
        pod.ip("addr add 10.77.1.2/24 dev eth0");
        pod.ip("addr add fd77:1::2/64 dev eth0 nodad");
        pod.ip("route add default via 10.77.1.1");
        pod.ip("-6 route add default via fd77:1::1");

        veth(&node, "veth-inet", &internet, "eth0");
        node.ip("addr add 198.51.100.1/24 dev veth-inet");
        node.ip("addr add fd77:ff::1/64 dev veth-inet nodad");
        internet.ip("addr add 198.51.100.2/24 dev eth0");
        internet.ip("addr add fd77:ff::2/64 dev eth0 nodad");
        for a in [
            "203.0.113.10/32",
            "203.0.113.20/32",
            "2001:db8::10/128",
            "2001:db8::20/128",
        ] {
            internet.ip(&format!("addr add {a} dev lo"));
        }
        internet.ip("route add 10.77.0.0/16 via 198.51.100.1");
        internet.ip("-6 route add fd77::/16 via fd77:ff::1");
        // The gateway's namespace: reached from the node, and out to the
        // internet through it.
        veth(&node, "veth-gw", &gw, "eth0");
        node.ip("addr add 10.77.2.1/24 dev veth-gw");
        gw.ip("addr add 10.77.2.2/24 dev eth0");
        gw.ip("route add default via 10.77.2.1");
        internet.ip("route add 10.77.2.0/24 via 198.51.100.1");
        node.ip("route add 203.0.113.0/24 via 198.51.100.2");
        node.ip("-6 route add 2001:db8::/32 via fd77:ff::2");
        // Traffic that is not captured goes pod → node → internet directly.
        node.sysctl("net.ipv4.ip_forward", "1");
        node.sysctl("net.ipv6.conf.all.forwarding", "1");

        for ns in [&node, &pod, &gw] {
            for host in [LLM_HOST, SEED_HOST] {
                ns.add_host(LLM_V4, host);
                ns.add_host(LLM_V6, host);
            }
        }

        let workdir = tempfile::Builder::new()
            .prefix("llm-egress-e2e")
            .tempdir()
            .expect("tempdir");
        let cgroups = TestCgroup::new(cgroup2_mount().join(format!("llm-egress-test-{id}")));
        let sleep_cgroup = cgroups.child("pod-sleep");
        let other_cgroup = cgroups.child("pod-other");

        let internet_server = Daemon::start(
            "internet",
            &Place {
                netns: Some(&internet),
                cgroup: None,
            },
            &env::tests_bin("llm-egress-fake-internet"),
            &["--listen", "[::]:80", "--log"]
                .iter()
                .map(|s| s.to_string())
                .chain([workdir.path().join("requests.jsonl").display().to_string()])
                .collect::<Vec<_>>(),
            workdir.path(),
        );
        let lab = CaptureLab {
            agent: None,
            internet_server,
            cgroups,
            bpffs: Bpffs::new(),
            node,
            pod,
            internet,
            gw,
            workdir,
            api_key: format!(
                "sk-lab-{id}-{:x}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(7)
            ),
            gateway: None,
            provider: None,
            tunnel: false,
            provider_extra: Vec::new(),
            agent_extra: Vec::new(),
            gateway_extra: Vec::new(),
            sleep_cgroup,
            other_cgroup,
        };
        lab.write_workloads(&[("default", "sleep", "sleep", "pod-sleep")]);
        wait_for("the internet server", Duration::from_secs(10), || {
            lab.internet_server.logs().contains("listening").then_some(())
        });
        lab
    }

    pub fn workloads_file(&self) -> PathBuf {
        self.workdir.path().join("workloads.yaml")
    }

    /// Rewrites the static workload file: (namespace, serviceAccount, name, cgroupPath).
    pub fn write_workloads(&self, workloads: &[(&str, &str, &str, &str)]) {
        let mut text = String::from("workloads:\n");
        for (ns, sa, name, cg) in workloads {
            text.push_str(&format!(
                "- {{namespace: {ns}, serviceAccount: {sa}, name: {name}, cgroupPath: {cg}}}\n"
            ));
        }
        crate::gateway_lab::write_atomically(&self.workloads_file(), &text);
    }

    pub fn agent_args(&self) -> Vec<String> {
        [
            "--log-format",
            "json",
            "run",
            "--cgroup-root",
            &self.cgroups.path.display().to_string(),
            "--bpffs",
            &self.bpffs.pins().display().to_string(),
            "--proxy-advertise",
            "10.77.1.1:15001",
            "--proxy-advertise",
            "[fd77:1::1]:15001",
            "--host",
            LLM_HOST,
            "--workloads",
            &self.workloads_file().display().to_string(),
            "--admin",
            ADMIN,
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(self.mode_args())
        .chain(self.agent_extra.iter().cloned())
        .collect()
    }

    /// Direct mode until `start_mesh`; then the tunnel to the gateway.
    fn mode_args(&self) -> Vec<String> {
        if !self.tunnel {
            return vec!["--mode".into(), "direct".into()];
        }
        let c = |f: &str| self.certs().join(f).display().to_string();
        vec![
            "--mode".into(),
            "tunnel".into(),
            "--resources".into(),
            self.config().display().to_string(),
            "--gateway-address".into(),
            format!("{GATEWAY_NAME}={GATEWAY_TUNNEL}"),
            "--tls-cert".into(),
            c("agent.pem"),
            "--tls-key".into(),
            c("agent-key.pem"),
            "--trust-bundle".into(),
            c("ca.pem"),
            "--node-name".into(),
            "node-1".into(),
        ]
    }

    /// Starts the agent in the node namespace and waits until it reports
    /// the target resolved and the workload enrolled.
    pub fn start_agent(&mut self) {
        let agent = Daemon::start(
            "agent",
            &Place {
                netns: Some(&self.node),
                cgroup: None,
            },
            &env::agent_bin(),
            &self.agent_args(),
            self.workdir.path(),
        );
        self.agent = Some(agent);
        wait_for(
            "the agent to resolve targets and enroll workloads",
            Duration::from_secs(20),
            || {
                if let Some(a) = self.agent.as_mut() {
                    a.assert_running();
                }
                let s = self.try_status()?;
                // Every target tried once (resolved, or reported as failing).
                let resolved = s["targets"].as_array()?.iter().all(|t| {
                    t["attempts"].as_u64().unwrap_or(0) > 0
                        && (t["error"].is_string()
                            || t["addresses"].as_array().is_some_and(|a| !a.is_empty()))
                });
                let enrolled = !s["workloads"]["enrolled"].as_array()?.is_empty();
                (resolved && enrolled).then_some(())
            },
        );
    }

    pub fn stop_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.stop();
        }
    }

    pub fn agent_logs(&self) -> String {
        self.agent.as_ref().map(|a| a.logs()).unwrap_or_default()
    }

    pub fn try_status(&self) -> Option<Value> {
        let out = run(
            &Place {
                netns: Some(&self.node),
                cgroup: None,
            },
            env::agent_bin().to_str()?,
            &["status", "--json", "--admin", ADMIN],
            Duration::from_secs(10),
        );
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The agent's `/status` document (through `llm-egress-agent status --json`).
    pub fn status(&self) -> Value {
        self.try_status()
            .unwrap_or_else(|| panic!("agent status failed; agent log:\n{}", self.agent_logs()))
    }

    /// The most recent captured connection the agent reports.
    pub fn last_connection(&self) -> Value {
        let status = self.status();
        status["recent"]
            .as_array()
            .and_then(|r| r.last())
            .cloned()
            .unwrap_or_else(|| panic!("no captured connection in {status}"))
    }

    /// The agent's eBPF counter `name`.
    pub fn counter(&self, name: &str) -> u64 {
        self.status()["counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// Prometheus text from the agent's `/metrics`.
    pub fn metrics(&self) -> String {
        let out = self.curl_in(&self.node, None, &["-sS", &format!("http://{ADMIN}/metrics")]);
        assert!(
            out.status.success(),
            "fetching metrics failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs curl in a namespace and cgroup.
    pub fn curl_in(&self, ns: &Netns, cgroup: Option<&Path>, args: &[&str]) -> Output {
        let mut all = vec!["--max-time", "5"];
        all.extend_from_slice(args);
        run(
            &Place {
                netns: Some(ns),
                cgroup,
            },
            "curl",
            &all,
            Duration::from_secs(15),
        )
    }

    /// curl from the pod namespace in `cgroup`; returns the server's JSON
    /// answer, panicking (with the agent's log) if curl failed.
    pub fn fetch_from(&self, cgroup: &Path, args: &[&str]) -> Value {
        let mut all = vec!["-sS", "--fail"];
        all.extend_from_slice(args);
        let out = self.curl_in(&self.pod, Some(cgroup), &all);
        assert!(
            out.status.success(),
            "curl {args:?} failed ({}): {}\nagent log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.agent_logs()
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "answer is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Requests the internet server has logged so far.
    pub fn internet_requests(&self) -> Vec<Value> {
        std::fs::read_to_string(self.workdir.path().join("requests.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Default for CaptureLab {
    fn default() -> Self {
        Self::new()
    }
}

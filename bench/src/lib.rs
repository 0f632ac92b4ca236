//! `cargo xtask bench`: llm-egress against the paths a user would choose
//! instead — a direct connection, an ASM-style Envoy sidecar + egress
//! gateway, and nginx — in one run on one machine, paths interleaved round
//! by round so that figures are ratios that hold on a noisy machine.

mod curves;
mod paths;
pub mod peers;
pub mod procstat;
pub mod report;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context};
use llm_egress_tests::{
    cgroup::{cgroup2_mount, TestCgroup},
    env,
    process::{self, Daemon, Place},
    topology::{CaptureLab, LLM_V4, OTHER_V4},
};
use serde_json::{json, Value};

pub struct Options {
    pub quick: bool,
    pub rounds: usize,
    pub rate: u32,
    pub seconds: f64,
    pub out: PathBuf,
    /// Record a CPU profile (perf, cpu-clock) of the agent and gateway
    /// during llm-egress's 16-connection saturation run.
    pub profile: bool,
    /// Also measure LiteLLM's proxy (installed in its own virtual environment).
    pub litellm: bool,
    pub sections: Vec<Section>,
}

/// One way from the client to the provider.
struct PathSpec {
    name: &'static str,
    cgroup: PathBuf,
    url: String,
    headers: Vec<String>,
    body: String,
    ca: Option<PathBuf>,
    /// Proxy processes on this path, for CPU and memory.
    procs: Vec<(&'static str, u32)>,
}

fn loadgen_bin() -> PathBuf {
    env::bin_dir().join("llm-egress-loadgen")
}

fn body(model: bool, stream: bool) -> String {
    // About 1 KiB, like the benchmark's requests are meant to be.
    let content = "x".repeat(900);
    let mut v = json!({"messages": [{"role": "user", "content": content}]});
    if model {
        v["model"] = "qwen1.5-72b-chat".into();
        v["stream"] = stream.into();
    } else if stream {
        v["stream"] = true.into();
    }
    v.to_string()
}

fn run_loadgen(
    lab: &CaptureLab,
    cgroup: &Path,
    args: &[String],
    timeout: Duration,
    cpu: Option<usize>,
) -> anyhow::Result<Value> {
    let bin = loadgen_bin();
    let bin = bin.to_str().context("path")?;
    let cpu = cpu.map(|c| c.to_string());
    let mut argv: Vec<&str> = Vec::new();
    let program = match &cpu {
        Some(c) => {
            argv.extend(["-c", c.as_str(), bin]);
            "taskset"
        }
        None => bin,
    };
    argv.extend(args.iter().map(String::as_str));
    let out = process::run(
        &Place {
            netns: Some(&lab.pod),
            cgroup: Some(cgroup),
        },
        program,
        &argv,
        timeout,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "loadgen {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            stdout
        );
    }
    let last = stdout.lines().last().context("loadgen printed nothing")?;
    Ok(serde_json::from_str(last)?)
}

fn target_args(p: &PathSpec, body: &str) -> Vec<String> {
    let mut a = vec![
        "--url".to_string(),
        p.url.clone(),
        "--body".into(),
        body.to_string(),
    ];
    for h in &p.headers {
        a.push("--header".into());
        a.push(h.clone());
    }
    if let Some(ca) = &p.ca {
        a.push("--ca".into());
        a.push(ca.display().to_string());
    }
    a
}

/// Median over rounds of `path[q] - base[q]` in the same round.
fn paired_median(
    samples: &BTreeMap<&str, BTreeMap<String, Vec<f64>>>,
    path: &str,
    base: &str,
    q: &str,
) -> f64 {
    let get = |p: &str| samples.get(p).and_then(|m| m.get(q)).cloned().unwrap_or_default();
    median(get(path).iter().zip(get(base)).map(|(a, b)| a - b).collect())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Samples the given processes' stacks while a run is under way.
fn start_perf(procs: &[(&str, u32)], seconds: f64, out: &Path) -> Option<std::process::Child> {
    let pids: Vec<String> = procs.iter().map(|(_, p)| p.to_string()).collect();
    std::process::Command::new("perf")
        .args(["record", "-e", "cpu-clock", "-F", "499", "-g", "-o"])
        .arg(out.join("perf.data"))
        .args(["-p", &pids.join(","), "--", "sleep", &format!("{seconds}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| eprintln!("bench: no profile (perf: {e}); install linux-perf"))
        .ok()
}

fn finish_perf(mut child: std::process::Child, out: &Path) -> anyhow::Result<()> {
    child.wait()?;
    let report = std::process::Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--sort",
            "comm,symbol",
            "--percent-limit",
            "1",
            "-g",
            "none",
            "-i",
        ])
        .arg(out.join("perf.data"))
        .output()?;
    std::fs::write(out.join("profile.txt"), &report.stdout)?;
    println!(
        "bench: CPU profile of agent and gateway in {}",
        out.join("profile.txt").display()
    );
    Ok(())
}

/// Which parts of the benchmark to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// Latency, throughput, CPU and SSE for every path (and the ceiling check).
    Paths,
    /// The cost of connect() with the eBPF hook.
    Connect,
    /// Agent and gateway memory with 0 … 10,000 held captured connections.
    Memory,
    /// Cost curves: enrolled pods, policies and routes, reloads under load.
    Curves,
}

/// CPUs for what is measured and for the world around it: on a machine
/// with two or more CPUs the load generator and the provider run on the
/// first, every proxy under test on the second, so that a proxy's figures
/// are not the provider's and the provider never starves a proxy.
#[derive(Clone, Copy)]
struct Pinning {
    world: usize,
    proxies: usize,
}

impl Pinning {
    fn detect() -> Option<Pinning> {
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let have_taskset = std::process::Command::new("taskset")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        (cpus >= 2 && have_taskset).then_some(Pinning { world: 0, proxies: 1 })
    }
}

/// Moves every thread of `pid` (and the threads it starts later) to `cpu`.
fn pin(pid: u32, cpu: usize) {
    if pid == 0 {
        return;
    }
    let ok = std::process::Command::new("taskset")
        .args(["-a", "-cp", &cpu.to_string(), &pid.to_string()])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("bench: could not pin process {pid} to CPU {cpu}");
    }
}

struct Bench<'a> {
    opts: &'a Options,
    lab: CaptureLab,
    pinning: Option<Pinning>,
}

impl Bench<'_> {
    /// Runs the load generator in `cgroup` of the pod's namespace, on the
    /// world's CPU when pinned.
    fn loadgen(&self, cgroup: &Path, args: &[String], timeout: Duration) -> anyhow::Result<Value> {
        run_loadgen(&self.lab, cgroup, args, timeout, self.pinning.map(|p| p.world))
    }

    fn agent_pid(&self) -> u32 {
        daemon_pid(&self.lab.agent)
    }

    fn gateway_pid(&self) -> u32 {
        daemon_pid(&self.lab.gateway)
    }
}

fn daemon_pid(d: &Option<Daemon>) -> u32 {
    d.as_ref()
        .and_then(|d| d.child.as_ref())
        .map(|c| c.id())
        .unwrap_or(0)
}

/// Keeps `previous`'s figures for the sections this run did not measure
/// (`--only … --merge target/bench/results.json`).
pub fn merge(previous: Value, mut current: Value) -> Value {
    const SECTION_KEYS: [&str; 5] = ["paths", "ceiling", "connect_ns", "memory", "curves"];
    for key in SECTION_KEYS {
        if current[key].is_null() && !previous[key].is_null() {
            current[key] = previous[key].clone();
            let mut kept = current["kept_from_previous_run"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            kept.push(json!(key));
            current["kept_from_previous_run"] = json!(kept);
        }
    }
    if current["kept_from_previous_run"].is_array() {
        current["previous_run_date"] = previous["date"].clone();
        // LiteLLM runs only in the paths section: its version goes with it.
        if current["versions"]["litellm"].as_str().unwrap_or("").is_empty()
            && !previous["versions"]["litellm"].is_null()
        {
            current["versions"]["litellm"] = previous["versions"]["litellm"].clone();
        }
    }
    current
}

pub fn run(opts: &Options) -> anyhow::Result<Value> {
    std::fs::create_dir_all(&opts.out)?;
    let steal_before = procstat::steal()?;
    let started = std::time::Instant::now();

    println!("bench: setting up the namespaces, the provider and llm-egress");
    // Access logs off on every path alike (Envoy and nginx are configured so).
    std::env::set_var("RUST_LOG", "warn");
    // One worker each, as Envoy runs with --concurrency 1 and nginx with one
    // worker: a fair comparison on a small machine.
    std::env::set_var("LLM_EGRESS_WORKER_THREADS", "1");
    let mut lab = CaptureLab::new();
    // The provider: no request log and one worker (it shares the world's
    // CPU with the load generator); SSE answers paced as a model would.
    lab.provider_extra = [
        "--no-log",
        "--workers",
        "1",
        "--plain-listen",
        paths::CEILING_LISTEN,
        "--answer-bytes",
        "900",
        "--chunks",
        "200",
        "--chunk-delay-ms",
        "5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // The memory curve holds 10,000 idle connections from one pod: lift
    // the per-pod limit (1,024 by default) and the gateway's deadlines for
    // a first byte and a request head (10 s by default, against
    // slowloris), which would close them while they are counted.
    lab.agent_extra = ["--max-connections-per-workload", "16384"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    lab.gateway_extra = ["--sniff-timeout", "300", "--request-head-timeout", "300"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    lab.start_mesh();
    let pinning = Pinning::detect();
    if let Some(p) = pinning {
        pin(daemon_pid(&lab.provider), p.world);
        pin(daemon_pid(&lab.agent), p.proxies);
        pin(daemon_pid(&lab.gateway), p.proxies);
    }
    let mut bench = Bench { opts, lab, pinning };
    let envoy = peers::envoy_bin()?;

    let mut report = json!({
        "date": procstat::now_utc(),
        "machine": procstat::machine(),
        "versions": report::versions(&envoy, opts.litellm.then(peers::litellm_python).as_ref()),
        "pinning": pinning.map(|p| json!({"world_cpu": p.world, "proxies_cpu": p.proxies, "world": "load generator, provider", "proxies": "agent, gateway, Envoy pair, nginx, LiteLLM"})),
        "options": {"quick": opts.quick, "rounds": opts.rounds, "rate": opts.rate, "seconds": opts.seconds, "request_bytes": body(true, false).len(), "sections": format!("{:?}", opts.sections)},
    });
    let wants = |s: Section| opts.sections.contains(&s);
    // First, on a fresh network namespace: after the paths' tens of
    // thousands of short connections, the pod's TIME_WAIT sockets towards
    // the agent's one address make the kernel's ephemeral-port search, not
    // the hook, the cost of a captured connect() (2 ms seen).
    if wants(Section::Connect) {
        report["connect_ns"] = connect_cost(&bench)?;
    }
    if wants(Section::Paths) {
        let (paths, ceiling) = paths::measure(&mut bench, &envoy)?;
        report["paths"] = paths;
        report["ceiling"] = ceiling;
    }
    if wants(Section::Memory) {
        report["memory"] = curves::memory(&bench)?;
    }
    if wants(Section::Curves) {
        report["curves"] = json!({
            "enrolled_pods": curves::enrolled_pods(&bench)?,
            "gateway_resources": curves::gateway_resources(&bench)?,
        });
    }
    report["steal_percent"] = json!(procstat::steal_percent(steal_before, procstat::steal()?));
    report["duration_s"] = json!(started.elapsed().as_secs_f64());
    drop(bench);
    Ok(report)
}

/// The cost of connect() itself, with and without the hook.
fn connect_cost(b: &Bench) -> anyhow::Result<Value> {
    println!("bench: the cost of connect() with the eBPF hook");
    let outside =
        TestCgroup::new(cgroup2_mount().join(format!("llm-egress-bench-outside-{}", env::unique_id())));
    let count = if b.opts.quick { 200 } else { 2000 };
    let connect = |cg: &Path, addr: &str| -> anyhow::Result<Value> {
        b.loadgen(
            cg,
            &[
                "connect".into(),
                "--addr".into(),
                addr.into(),
                "--count".into(),
                count.to_string(),
            ],
            Duration::from_secs(60),
        )
    };
    Ok(json!({
        "no_program": connect(&outside.path, &format!("{OTHER_V4}:80"))?,
        "hook_non_target": connect(&b.lab.sleep_cgroup, &format!("{OTHER_V4}:80"))?,
        "hook_target_not_enrolled": connect(&b.lab.other_cgroup, &format!("{LLM_V4}:80"))?,
        "hook_captured": connect(&b.lab.sleep_cgroup, &format!("{LLM_V4}:80"))?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_keeps_only_sections_not_measured_again() {
        let previous = json!({"date": "d1", "paths": {"direct": 1}, "memory": {"old": true}});
        let current = json!({"date": "d2", "memory": {"new": true}});
        let m = merge(previous, current);
        assert_eq!(m["paths"], json!({"direct": 1}));
        assert_eq!(m["memory"], json!({"new": true}));
        assert_eq!(m["kept_from_previous_run"], json!(["paths"]));
        assert_eq!(m["previous_run_date"], "d1");
    }

    #[test]
    fn a_merged_report_says_which_sections_come_from_the_earlier_run() {
        let previous = json!({"date": "d1", "paths": {}, "versions": {"litellm": "litellm 1"}});
        let current = json!({"date": "d2", "memory": {}, "versions": {"litellm": ""}});
        let m = merge(previous, current);
        assert_eq!(m["versions"]["litellm"], "litellm 1");
        let md = report::markdown(&m);
        assert!(md.contains("kept from the run of d1: paths"), "{md}");
    }

    #[test]
    fn medians_and_paired_differences() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
        let mut samples: BTreeMap<&str, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
        // A noisy second round slows both paths: the paired difference stays 1.
        samples
            .entry("direct")
            .or_default()
            .insert("p50_us".into(), vec![10.0, 30.0, 11.0]);
        samples
            .entry("x")
            .or_default()
            .insert("p50_us".into(), vec![11.0, 31.0, 12.0]);
        assert_eq!(paired_median(&samples, "x", "direct", "p50_us"), 1.0);
    }
}

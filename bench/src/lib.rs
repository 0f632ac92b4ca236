//! `cargo xtask bench`: llm-egress against the paths a user would choose
//! instead — a direct connection, an ASM-style Envoy sidecar + egress
//! gateway, and nginx — in one run on one machine, paths interleaved round
//! by round so that figures are ratios that hold on a noisy machine.

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
    process::{self, wait_for, Daemon, Place},
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

fn run_loadgen(lab: &CaptureLab, cgroup: &Path, args: &[String], timeout: Duration) -> anyhow::Result<Value> {
    let bin = loadgen_bin();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = process::run(
        &Place {
            netns: Some(&lab.pod),
            cgroup: Some(cgroup),
        },
        bin.to_str().context("path")?,
        &args,
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

pub fn run(opts: &Options) -> anyhow::Result<Value> {
    std::fs::create_dir_all(&opts.out)?;
    let steal_before = procstat::steal()?;
    let started = std::time::Instant::now();

    println!("bench: setting up the namespaces, the provider, llm-egress, Envoy and nginx");
    // Access logs off on every path alike (Envoy and nginx are configured so).
    std::env::set_var("RUST_LOG", "warn");
    // One worker each, as Envoy runs with --concurrency 1 and nginx with one
    // worker: a fair comparison on a small machine.
    std::env::set_var("LLM_EGRESS_WORKER_THREADS", "1");
    let mut lab = CaptureLab::new();
    lab.provider_extra = [
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
    lab.start_mesh();
    let outside =
        TestCgroup::new(cgroup2_mount().join(format!("llm-egress-bench-outside-{}", env::unique_id())));
    let certs = lab.certs();
    let work = lab.workdir.path().to_owned();

    let envoy = peers::envoy_bin()?;
    std::fs::write(work.join("envoy-sidecar.yaml"), peers::envoy_sidecar(&certs))?;
    std::fs::write(
        work.join("envoy-egress.yaml"),
        peers::envoy_egress(&certs, LLM_V4, &lab.api_key),
    )?;
    std::fs::write(
        work.join("nginx.conf"),
        peers::nginx(&work, &certs.join("ca.pem"), LLM_V4, &lab.api_key),
    )?;
    let envoy_args = |cfg: &str, base: &str| -> Vec<String> {
        [
            "-c",
            cfg,
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--base-id",
            base,
            "-l",
            "error",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let sidecar = Daemon::start(
        "envoy-sidecar",
        &Place {
            netns: Some(&lab.pod),
            cgroup: None,
        },
        &envoy,
        &envoy_args(&work.join("envoy-sidecar.yaml").display().to_string(), "71"),
        &work,
    );
    let egress = Daemon::start(
        "envoy-egress",
        &Place {
            netns: Some(&lab.gw),
            cgroup: None,
        },
        &envoy,
        &envoy_args(&work.join("envoy-egress.yaml").display().to_string(), "72"),
        &work,
    );
    let nginx = Daemon::start(
        "nginx",
        &Place {
            netns: Some(&lab.gw),
            cgroup: None,
        },
        Path::new("/usr/sbin/nginx"),
        &[
            "-p".into(),
            work.display().to_string(),
            "-e".into(),
            "stderr".into(),
            "-c".into(),
            work.join("nginx.conf").display().to_string(),
        ],
        &work,
    );
    let pid = |d: &Option<Daemon>| {
        d.as_ref()
            .and_then(|d| d.child.as_ref())
            .map(|c| c.id())
            .unwrap_or(0)
    };
    let dpid = |d: &Daemon| d.child.as_ref().map(|c| c.id()).unwrap_or(0);

    let key_header = format!("Authorization: Bearer {}", lab.api_key);
    let paths = vec![
        PathSpec {
            name: "direct",
            cgroup: lab.other_cgroup.clone(),
            url: format!("https://dashscope.aliyuncs.com{}", peers::PROVIDER_PATH),
            headers: vec![key_header],
            body: body(true, false),
            ca: Some(certs.join("ca.pem")),
            procs: vec![],
        },
        PathSpec {
            name: "llm-egress",
            cgroup: lab.sleep_cgroup.clone(),
            url: "http://dashscope.aliyuncs.com/".into(),
            headers: vec![],
            body: body(false, false),
            ca: None,
            procs: vec![("agent", pid(&lab.agent)), ("gateway", pid(&lab.gateway))],
        },
        PathSpec {
            name: "envoy",
            cgroup: lab.other_cgroup.clone(),
            url: format!("http://127.0.0.1:{}/", peers::ENVOY_SIDECAR_PORT),
            headers: vec!["Host: dashscope.aliyuncs.com".into()],
            body: body(true, false),
            ca: None,
            procs: vec![("envoy-sidecar", dpid(&sidecar)), ("envoy-egress", dpid(&egress))],
        },
        PathSpec {
            name: "nginx",
            cgroup: lab.other_cgroup.clone(),
            url: format!("http://{}/", peers::NGINX_LISTEN),
            headers: vec!["Host: dashscope.aliyuncs.com".into()],
            body: body(true, false),
            ca: None,
            procs: vec![("nginx", dpid(&nginx))],
        },
    ];

    // Every path must work before anything is measured.
    for p in &paths {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let mut a = vec![
                "saturate".to_string(),
                "--connections".into(),
                "1".into(),
                "--seconds".into(),
                "0.2".into(),
            ];
            a.extend(target_args(p, &p.body));
            let last = match run_loadgen(&lab, &p.cgroup, &a, Duration::from_secs(20)) {
                Ok(v) if v["requests"].as_u64().unwrap_or(0) > 0 && v["errors"].as_u64() == Some(0) => break,
                Ok(v) => v.to_string(),
                Err(e) => e.to_string(),
            };
            if std::time::Instant::now() > deadline {
                bail!(
                    "the {} path does not answer: {last}\nenvoy sidecar:\n{}\nenvoy egress:\n{}\nnginx:\n{}\ngateway:\n{}",
                    p.name,
                    sidecar.logs(),
                    egress.logs(),
                    nginx.logs(),
                    lab.gateway_logs()
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    let conns: &[usize] = &[1, 16, 64];
    let sat_seconds = if opts.quick { 1.0 } else { 3.0 };
    let stream_count = if opts.quick { 2 } else { 5 };
    let mut samples: BTreeMap<&str, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    for round in 0..opts.rounds {
        // Rotate the order so that no path always runs first or last.
        let order: Vec<&PathSpec> = (0..paths.len())
            .map(|i| &paths[(i + round) % paths.len()])
            .collect();
        for p in order {
            println!("bench: round {}/{}: {}", round + 1, opts.rounds, p.name);
            let s = samples.entry(p.name).or_default();
            let mut put = |k: &str, v: f64| s.entry(k.to_string()).or_default().push(v);
            let cpu0: u64 = p.procs.iter().map(|(_, pid)| procstat::cpu_ticks(*pid)).sum();
            let mut a = vec![
                "rate".into(),
                "--rate".into(),
                opts.rate.to_string(),
                "--seconds".into(),
                opts.seconds.to_string(),
            ];
            a.extend(target_args(p, &p.body));
            let v = run_loadgen(&lab, &p.cgroup, &a, Duration::from_secs_f64(opts.seconds + 60.0))?;
            let cpu1: u64 = p.procs.iter().map(|(_, pid)| procstat::cpu_ticks(*pid)).sum();
            let requests = v["count"].as_f64().unwrap_or(0.0);
            for q in ["p50_us", "p90_us", "p99_us", "p999_us"] {
                put(q, v[q].as_f64().unwrap_or(0.0));
            }
            put("errors", v["errors"].as_f64().unwrap_or(0.0));
            put("achieved_rps", v["achieved_rps"].as_f64().unwrap_or(0.0));
            if !p.procs.is_empty() && requests > 0.0 {
                put(
                    "cpu_s_per_1k",
                    (cpu1 - cpu0) as f64 / procstat::ticks_per_second() / (requests / 1000.0),
                );
            }
            for c in conns {
                let mut a = vec![
                    "saturate".into(),
                    "--connections".into(),
                    c.to_string(),
                    "--seconds".into(),
                    sat_seconds.to_string(),
                ];
                a.extend(target_args(p, &p.body));
                let perf = (opts.profile && round == 0 && *c == 16 && p.name == "llm-egress")
                    .then(|| start_perf(&p.procs, sat_seconds, &opts.out))
                    .flatten();
                let v = run_loadgen(&lab, &p.cgroup, &a, Duration::from_secs(60))?;
                if let Some(child) = perf {
                    finish_perf(child, &opts.out)?;
                }
                put(&format!("sat_{c}"), v["rps"].as_f64().unwrap_or(0.0));
            }
            let mut a = vec![
                "newconn".into(),
                "--concurrency".into(),
                "8".into(),
                "--seconds".into(),
                sat_seconds.to_string(),
            ];
            a.extend(target_args(p, &p.body));
            let v = run_loadgen(&lab, &p.cgroup, &a, Duration::from_secs(60))?;
            put("newconn_rps", v["rps"].as_f64().unwrap_or(0.0));
            let sbody = if p.name == "llm-egress" {
                body(false, true)
            } else {
                body(true, true)
            };
            let mut a = vec!["stream".into(), "--count".into(), stream_count.to_string()];
            a.extend(target_args(p, &sbody));
            let v = run_loadgen(&lab, &p.cgroup, &a, Duration::from_secs(120))?;
            put("ttfb_p50_us", v["ttfb"]["p50_us"].as_f64().unwrap_or(0.0));
            put("gap_p50_us", v["gap"]["p50_us"].as_f64().unwrap_or(0.0));
            put("gap_p99_us", v["gap"]["p99_us"].as_f64().unwrap_or(0.0));
        }
    }

    let mut results = serde_json::Map::new();
    for p in &paths {
        let mut m = serde_json::Map::new();
        for (k, v) in &samples[p.name] {
            m.insert(k.clone(), json!(median(v.clone())));
        }
        // Added latency as the median of per-round differences to direct:
        // paired within a round, so that a noisy round moves both sides.
        for q in ["p50_us", "p99_us"] {
            m.insert(
                format!("added_{q}"),
                json!(paired_median(&samples, p.name, "direct", q)),
            );
        }
        let rss: serde_json::Map<String, Value> = p
            .procs
            .iter()
            .map(|(n, pid)| (n.to_string(), json!(procstat::peak_rss_kb(*pid))))
            .collect();
        m.insert("peak_rss_kb".into(), Value::Object(rss));
        results.insert(p.name.to_string(), Value::Object(m));
    }

    // connect() first: thousands of held connections being torn down would
    // skew it.
    println!("bench: the cost of connect() with the eBPF hook");
    let count = if opts.quick { 200 } else { 2000 };
    let connect = |cg: &Path, addr: &str| -> anyhow::Result<Value> {
        run_loadgen(
            &lab,
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
    let connect_ns = json!({
        "no_program": connect(&outside.path, &format!("{OTHER_V4}:80"))?,
        "hook_non_target": connect(&lab.sleep_cgroup, &format!("{OTHER_V4}:80"))?,
        "hook_target_not_enrolled": connect(&lab.other_cgroup, &format!("{LLM_V4}:80"))?,
        "hook_captured": connect(&lab.sleep_cgroup, &format!("{LLM_V4}:80"))?,
    });

    println!("bench: agent memory with open captured connections");
    let agent_pid = pid(&lab.agent);
    let mut agent_mem = serde_json::Map::new();
    agent_mem.insert("idle_kb".into(), json!(procstat::rss_kb(agent_pid)));
    for n in if opts.quick { [100, 1000] } else { [1000, 10000] } {
        let mut holder = Daemon::start(
            &format!("hold-{n}"),
            &Place {
                netns: Some(&lab.pod),
                cgroup: Some(&lab.sleep_cgroup),
            },
            &loadgen_bin(),
            &[
                "hold".into(),
                "--addr".into(),
                format!("{LLM_V4}:80"),
                "--count".into(),
                n.to_string(),
                "--seconds".into(),
                "60".into(),
            ],
            &work,
        );
        wait_for(&format!("{n} held connections"), Duration::from_secs(60), || {
            holder.logs().contains("holding").then_some(())
        });
        // Let the agent open every tunnel stream.
        std::thread::sleep(Duration::from_secs(2));
        agent_mem.insert(format!("held_{n}_kb"), json!(procstat::rss_kb(agent_pid)));
        agent_mem.insert(
            format!("held_{n}_connected"),
            json!(holder
                .logs()
                .lines()
                .find(|l| l.contains("holding"))
                .and_then(|l| serde_json::from_str::<Value>(l).ok())
                .map(|v| v["holding"].clone())
                .unwrap_or(Value::Null)),
        );
        holder.stop();
        std::thread::sleep(Duration::from_secs(1));
    }

    let steal_after = procstat::steal()?;
    let report = json!({
        "date": procstat::now_utc(),
        "machine": procstat::machine(),
        "steal_percent": procstat::steal_percent(steal_before, steal_after),
        "versions": report::versions(&envoy),
        "options": {"quick": opts.quick, "rounds": opts.rounds, "rate": opts.rate, "seconds": opts.seconds, "request_bytes": body(true, false).len()},
        "duration_s": started.elapsed().as_secs_f64(),
        "paths": results,
        "agent_memory": agent_mem,
        "connect_ns": connect_ns,
    });
    drop((sidecar, egress, nginx));
    drop(outside);
    drop(lab);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

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

//! Latency, throughput, CPU and SSE timing of every path a user could pick:
//! direct, llm-egress, the ASM-style Envoy pair, nginx and LiteLLM; then the
//! ceiling check that says whether those figures are the paths' own.

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::bail;
use llm_egress_tests::{
    process::{Daemon, Place},
    topology::LLM_V4,
};
use serde_json::{json, Value};

use crate::{
    body, daemon_pid, finish_perf, median, paired_median, peers, pin, procstat, start_perf, target_args,
    Bench, PathSpec,
};

/// The direct path must saturate at least this many times higher than
/// every proxied path for the proxied figures to be the proxies' own.
pub const CEILING_RATIO: f64 = 3.0;

/// The provider's plain-HTTP API (the ceiling path).
pub const CEILING_LISTEN: &str = "203.0.113.10:8080";

/// The fixed rate LiteLLM is measured at (it cannot serve the common one).
pub const LITELLM_RATE: u32 = 50;

pub const SATURATION_CONNECTIONS: [usize; 3] = [1, 16, 64];

pub fn measure(b: &mut Bench, envoy: &Path) -> anyhow::Result<(Value, Value)> {
    println!(
        "bench: starting Envoy, nginx{}",
        if b.opts.litellm { " and LiteLLM" } else { "" }
    );
    let lab = &b.lab;
    let certs = lab.certs();
    let work = lab.workdir.path().to_owned();
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
    let in_pod = Place {
        netns: Some(&lab.pod),
        cgroup: None,
    };
    let in_gw = Place {
        netns: Some(&lab.gw),
        cgroup: None,
    };
    let sidecar = Daemon::start(
        "envoy-sidecar",
        &in_pod,
        envoy,
        &envoy_args(&work.join("envoy-sidecar.yaml").display().to_string(), "71"),
        &work,
    );
    let egress = Daemon::start(
        "envoy-egress",
        &in_gw,
        envoy,
        &envoy_args(&work.join("envoy-egress.yaml").display().to_string(), "72"),
        &work,
    );
    let nginx = Daemon::start(
        "nginx",
        &in_gw,
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
    let litellm = if b.opts.litellm {
        std::fs::write(
            work.join("litellm.yaml"),
            peers::litellm_config(&certs.join("ca.pem")),
        )?;
        std::fs::write(work.join("litellm_launch.py"), peers::LITELLM_LAUNCHER)?;
        let python = peers::litellm_python();
        let args = peers::litellm_args(&work);
        let env = peers::litellm_env(&certs.join("ca.pem"), &lab.api_key);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Some(Daemon::start_with_env(
            "litellm", &in_gw, &python, &args, &env, &work,
        ))
    } else {
        None
    };
    let dpid = |d: &Daemon| d.child.as_ref().map(|c| c.id()).unwrap_or(0);
    if let Some(p) = b.pinning {
        for d in [&sidecar, &egress, &nginx].into_iter().chain(litellm.as_ref()) {
            pin(dpid(d), p.proxies);
        }
    }

    let key_header = format!("Authorization: Bearer {}", lab.api_key);
    let mut paths = vec![
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
            procs: vec![
                ("agent", daemon_pid(&lab.agent)),
                ("gateway", daemon_pid(&lab.gateway)),
            ],
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
    // The ceiling: the provider's own API over plain HTTP, straight from
    // the load generator. It costs the world's CPU less than any proxied
    // path does (no TLS at either end), so no path can go faster.
    paths.push(PathSpec {
        name: "ceiling",
        cgroup: lab.other_cgroup.clone(),
        url: format!("http://{CEILING_LISTEN}{}", peers::PROVIDER_PATH),
        headers: vec![format!("Authorization: Bearer {}", lab.api_key)],
        body: body(true, false),
        ca: None,
        procs: vec![],
    });
    if let Some(l) = &litellm {
        paths.push(PathSpec {
            name: "litellm",
            cgroup: lab.other_cgroup.clone(),
            url: format!("http://{}/v1/chat/completions", peers::LITELLM_LISTEN),
            headers: vec![],
            body: body(true, false),
            ca: None,
            procs: vec![("litellm", dpid(l))],
        });
    }

    // Every path must work before anything is measured (LiteLLM takes a
    // while to import).
    for p in &paths {
        let patience = if p.name == "litellm" { 120 } else { 20 };
        let deadline = std::time::Instant::now() + Duration::from_secs(patience);
        loop {
            let mut a = vec![
                "saturate".to_string(),
                "--connections".into(),
                "1".into(),
                "--seconds".into(),
                "0.2".into(),
            ];
            a.extend(target_args(p, &p.body));
            let last = match b.loadgen(&p.cgroup, &a, Duration::from_secs(20)) {
                Ok(v) if v["requests"].as_u64().unwrap_or(0) > 0 && v["errors"].as_u64() == Some(0) => break,
                Ok(v) => v.to_string(),
                Err(e) => e.to_string(),
            };
            if std::time::Instant::now() > deadline {
                bail!(
                    "the {} path does not answer: {last}\nenvoy sidecar:\n{}\nenvoy egress:\n{}\nnginx:\n{}\nlitellm:\n{}\ngateway:\n{}",
                    p.name,
                    sidecar.logs(),
                    egress.logs(),
                    nginx.logs(),
                    litellm.as_ref().map(|l| l.logs()).unwrap_or_default(),
                    lab.gateway_logs()
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    let opts = b.opts;
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
            if p.name == "ceiling" {
                for c in SATURATION_CONNECTIONS {
                    let v = b.loadgen(
                        &p.cgroup,
                        &saturate_args(p, c, sat_seconds),
                        Duration::from_secs(60),
                    )?;
                    put(&format!("sat_{c}"), v["rps"].as_f64().unwrap_or(0.0));
                }
                continue;
            }
            // LiteLLM serves ~100 req/s on one core: at the common rate its
            // queue, not its latency, would be measured (for minutes).
            let rate = if p.name == "litellm" {
                opts.rate.min(LITELLM_RATE)
            } else {
                opts.rate
            };
            put("rate", rate as f64);
            let cpu0 = sum_over(p, procstat::cpu_ticks);
            let switches0 = sum_over(p, procstat::context_switches);
            let mut a = vec![
                "rate".into(),
                "--rate".into(),
                rate.to_string(),
                "--seconds".into(),
                opts.seconds.to_string(),
            ];
            a.extend(target_args(p, &p.body));
            let v = b.loadgen(&p.cgroup, &a, Duration::from_secs_f64(opts.seconds + 60.0))?;
            let cpu1 = sum_over(p, procstat::cpu_ticks);
            let switches1 = sum_over(p, procstat::context_switches);
            // The processes' CPU covers the warm-up too: per request sent.
            let requests = v["sent"].as_f64().unwrap_or(0.0);
            for q in ["p50_us", "p90_us", "p99_us", "p999_us"] {
                put(q, v[q].as_f64().unwrap_or(0.0));
            }
            put("errors", v["errors"].as_f64().unwrap_or(0.0));
            put("achieved_rps", v["achieved_rps"].as_f64().unwrap_or(0.0));
            if !p.procs.is_empty() && requests > 0.0 {
                put("cpu_s_per_1k", cpu_s_per_1k(cpu1 - cpu0, requests));
                put(
                    "switches_per_request",
                    switches1.saturating_sub(switches0) as f64 / requests,
                );
            }
            for c in SATURATION_CONNECTIONS {
                let perf = (opts.profile && round == 0 && c == 16 && p.name == "llm-egress")
                    .then(|| start_perf(&p.procs, sat_seconds, &opts.out))
                    .flatten();
                let cpu0 = sum_over(p, procstat::cpu_ticks);
                let v = b.loadgen(
                    &p.cgroup,
                    &saturate_args(p, c, sat_seconds),
                    Duration::from_secs(60),
                )?;
                let cpu1 = sum_over(p, procstat::cpu_ticks);
                if let Some(child) = perf {
                    finish_perf(child, &opts.out)?;
                }
                put(&format!("sat_{c}"), v["rps"].as_f64().unwrap_or(0.0));
                let requests = v["requests"].as_f64().unwrap_or(0.0);
                if c == 16 && !p.procs.is_empty() && requests > 0.0 {
                    put("sat_16_cpu_s_per_1k", cpu_s_per_1k(cpu1 - cpu0, requests));
                }
            }
            let mut a = vec![
                "newconn".into(),
                "--concurrency".into(),
                "8".into(),
                "--seconds".into(),
                sat_seconds.to_string(),
            ];
            a.extend(target_args(p, &p.body));
            let v = b.loadgen(&p.cgroup, &a, Duration::from_secs(60))?;
            put("newconn_rps", v["rps"].as_f64().unwrap_or(0.0));
            let sbody = if p.name == "llm-egress" {
                body(false, true)
            } else {
                body(true, true)
            };
            let mut a = vec!["stream".into(), "--count".into(), stream_count.to_string()];
            a.extend(target_args(p, &sbody));
            let v = b.loadgen(&p.cgroup, &a, Duration::from_secs(120))?;
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
    let results = Value::Object(results);
    let ceiling = ceiling_check(&results);
    drop((sidecar, egress, nginx, litellm));
    Ok((results, ceiling))
}

/// A closed-loop run on `connections` keep-alive connections.
fn saturate_args(p: &PathSpec, connections: usize, seconds: f64) -> Vec<String> {
    let mut a = vec![
        "saturate".to_string(),
        "--connections".into(),
        connections.to_string(),
        "--seconds".into(),
        seconds.to_string(),
    ];
    a.extend(target_args(p, &p.body));
    a
}

/// A per-process counter summed over a path's proxy processes.
fn sum_over(p: &PathSpec, counter: fn(u32) -> u64) -> u64 {
    p.procs.iter().map(|(_, pid)| counter(*pid)).sum()
}

fn cpu_s_per_1k(ticks: u64, requests: f64) -> f64 {
    ticks as f64 / procstat::ticks_per_second() / (requests / 1000.0)
}

/// Per saturation column and proxied path: the ceiling's rate over the
/// path's. Below `CEILING_RATIO` the figure measures the provider and the
/// load generator as much as the path, and the report says so.
pub fn ceiling_check(paths: &Value) -> Value {
    let mut columns = serde_json::Map::new();
    for c in SATURATION_CONNECTIONS {
        let key = format!("sat_{c}");
        let ceiling = paths["ceiling"][&key].as_f64().unwrap_or(0.0);
        let mut per_path = serde_json::Map::new();
        for (name, v) in paths.as_object().into_iter().flatten() {
            if name == "ceiling" || name == "direct" {
                continue;
            }
            let rps = v[&key].as_f64().unwrap_or(0.0);
            let ratio = if rps > 0.0 { ceiling / rps } else { 0.0 };
            per_path.insert(
                name.clone(),
                json!({"rps": rps, "ratio": ratio, "provider_bound": ratio < CEILING_RATIO}),
            );
        }
        columns.insert(key, json!({"ceiling_rps": ceiling, "paths": per_path}));
    }
    json!({"required_ratio": CEILING_RATIO, "columns": columns})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_figure_is_provider_bound_when_the_ceiling_is_not_far_above_it() {
        let paths = json!({
            "ceiling": {"sat_1": 3000.0, "sat_16": 12000.0, "sat_64": 9000.0},
            "direct": {"sat_1": 2000.0, "sat_16": 8000.0, "sat_64": 8000.0},
            "llm-egress": {"sat_1": 900.0, "sat_16": 3000.0, "sat_64": 3100.0},
            "nginx": {"sat_1": 1100.0, "sat_16": 3900.0, "sat_64": 4000.0},
        });
        let c = ceiling_check(&paths);
        let verdict = |col: &str, path: &str| c["columns"][col]["paths"][path]["provider_bound"].clone();
        assert_eq!(verdict("sat_16", "llm-egress"), false, "12000/3000 = 4");
        assert_eq!(verdict("sat_16", "nginx"), false, "12000/3900 = 3.08");
        assert_eq!(verdict("sat_64", "nginx"), true, "9000/4000 < 3");
        assert_eq!(verdict("sat_1", "nginx"), true, "3000/1100 = 2.7 < 3");
        assert_eq!(verdict("sat_1", "llm-egress"), false, "3000/900 = 3.3");
        assert!(
            c["columns"]["sat_1"]["paths"]["direct"].is_null(),
            "direct is not judged"
        );
    }
}

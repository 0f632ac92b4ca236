//! How cost grows with work: agent and gateway memory with held captured
//! connections, the agent with more enrolled pods, the gateway with more
//! policies and routes, and reloads of a large configuration under load.

use std::time::{Duration, Instant};

use anyhow::bail;
use llm_egress_tests::{
    gateway_lab::series_value,
    process::{wait_for, Daemon, Place},
    topology::LLM_V4,
};
use serde_json::{json, Value};

use crate::{body, loadgen_bin, procstat, target_args, Bench, PathSpec};

/// How often the reload-under-load run changes the configuration.
const REWRITE_EVERY_S: u64 = 3;

fn agent_active(b: &Bench) -> f64 {
    series_value(&b.lab.metrics(), "llm_egress_agent_active_connections", &[]).unwrap_or(-1.0)
}

fn cpu_s(pid: u32) -> f64 {
    procstat::cpu_ticks(pid) as f64 / procstat::ticks_per_second()
}

/// Agent and gateway resident memory and CPU with 0, 1, 100, 1,000 and
/// 10,000 captured connections held open by a pod.
pub fn memory(b: &Bench) -> anyhow::Result<Value> {
    println!("bench: agent and gateway memory with held captured connections");
    let counts: &[usize] = if b.opts.quick {
        &[0, 1, 100, 1000]
    } else {
        &[0, 1, 100, 1000, 10000]
    };
    let (agent, gateway) = (b.agent_pid(), b.gateway_pid());
    let mut points = Vec::new();
    for &n in counts {
        let (cpu_agent0, cpu_gw0) = (cpu_s(agent), cpu_s(gateway));
        let started = Instant::now();
        let mut holder = (n > 0).then(|| {
            Daemon::start(
                &format!("hold-{n}"),
                &Place {
                    netns: Some(&b.lab.pod),
                    cgroup: Some(&b.lab.sleep_cgroup),
                },
                &loadgen_bin(),
                &[
                    "hold".into(),
                    "--addr".into(),
                    format!("{LLM_V4}:80"),
                    "--count".into(),
                    n.to_string(),
                    "--seconds".into(),
                    "120".into(),
                ],
                b.lab.workdir.path(),
            )
        });
        if holder.is_some() {
            // Every connection is open end to end when the agent counts it
            // active: its tunnel stream was accepted by the gateway.
            wait_for(
                &format!("{n} active captured connections"),
                Duration::from_secs(90),
                || (agent_active(b) >= n as f64).then_some(()),
            );
        }
        let opened_s = started.elapsed().as_secs_f64();
        let (agent_mem, gateway_mem) = (
            procstat::memory_breakdown(agent),
            procstat::memory_breakdown(gateway),
        );
        let point = json!({
            "connections": n,
            "agent_kb": agent_mem["rss_kb"],
            "gateway_kb": gateway_mem["rss_kb"],
            "agent_breakdown": agent_mem,
            "gateway_breakdown": gateway_mem,
            "open_s": opened_s,
            "agent_cpu_us_per_connection": if n > 0 { (cpu_s(agent) - cpu_agent0) * 1e6 / n as f64 } else { 0.0 },
            "gateway_cpu_us_per_connection": if n > 0 { (cpu_s(gateway) - cpu_gw0) * 1e6 / n as f64 } else { 0.0 },
        });
        println!("bench:   {point}");
        points.push(point);
        if let Some(h) = holder.as_mut() {
            h.stop();
            wait_for("the held connections to close", Duration::from_secs(60), || {
                (agent_active(b) == 0.0).then_some(())
            });
        }
    }
    Ok(json!({"points": points, "per_connection_kb": per_connection(&points)}))
}

/// Memory per held connection between the smallest and largest point.
fn per_connection(points: &[Value]) -> Value {
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        return Value::Null;
    };
    let n = last["connections"].as_f64().unwrap_or(0.0) - first["connections"].as_f64().unwrap_or(0.0);
    if n <= 0.0 {
        return Value::Null;
    }
    let per = |k: &str| (last[k].as_f64().unwrap_or(0.0) - first[k].as_f64().unwrap_or(0.0)) / n;
    json!({"agent": per("agent_kb"), "gateway": per("gateway_kb")})
}

/// The agent returns freed heap every 5 s (`malloc_trim`), so right after
/// a section that held 10,000 connections its RSS still carries them.
/// Waits (at most 40 s) until RSS has not moved by more than 1% over a
/// span longer than that interval, and returns it.
fn settled_rss_kb(pid: u32) -> u64 {
    const SPAN: Duration = Duration::from_secs(6);
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut before = procstat::rss_kb(pid);
    loop {
        std::thread::sleep(SPAN);
        let now = procstat::rss_kb(pid);
        if now.abs_diff(before) * 100 <= before.max(1) || Instant::now() > deadline {
            return now;
        }
        before = now;
    }
}

/// The agent with 10, 100 and 1,000 enrolled pods (cgroups): how long a
/// change of the workload list takes to apply, the agent's memory and the
/// CPU it spent on it.
pub fn enrolled_pods(b: &Bench) -> anyhow::Result<Value> {
    println!("bench: the agent with more enrolled pods");
    let agent = b.agent_pid();
    let baseline_kb = settled_rss_kb(agent);
    let mut points = Vec::new();
    for n in [10usize, 100, 1000] {
        let names: Vec<String> = (0..n).map(|i| format!("bench-pod-{i}")).collect();
        for name in &names {
            b.lab.cgroups.child(name);
        }
        let mut list: Vec<(&str, &str, &str, &str)> = vec![("default", "sleep", "sleep", "pod-sleep")];
        list.extend(names.iter().map(|nm| ("bench", "app", nm.as_str(), nm.as_str())));
        let cpu0 = cpu_s(agent);
        let t0 = Instant::now();
        b.lab.write_workloads(&list);
        wait_for(
            &format!("{} enrolled workloads", n + 1),
            Duration::from_secs(60),
            || {
                let s = b.lab.try_status()?;
                (s["workloads"]["enrolled"].as_array()?.len() == n + 1).then_some(())
            },
        );
        let applied_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let point = json!({
            "pods": n,
            "applied_ms": applied_ms,
            "agent_kb": procstat::rss_kb(agent),
            "agent_baseline_kb": baseline_kb,
            "agent_cpu_ms": (cpu_s(agent) - cpu0) * 1000.0,
        });
        println!("bench:   {point}");
        points.push(point);
    }
    b.lab
        .write_workloads(&[("default", "sleep", "sleep", "pod-sleep")]);
    wait_for("the workload list back to one", Duration::from_secs(60), || {
        let s = b.lab.try_status()?;
        (s["workloads"]["enrolled"].as_array()?.len() == 1).then_some(())
    });
    Ok(
        json!({"points": points, "note": "applied_ms includes the agent's poll of the workload file (it also reacts to the file's change at once)"}),
    )
}

/// `n` AuthorizationPolicies (DENY for other teams' principals: each is
/// evaluated for every request and none matches) and `n` LLMRoutes for
/// other hosts, as one multi-document file.
fn resources(n: usize, salt: usize) -> String {
    let mut out = String::with_capacity(n * 700);
    for i in 0..n {
        out.push_str(&format!(
            "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {{name: bench-deny-{i}, namespace: istio-system}}\nspec:\n  selector: {{matchLabels: {{istio: egressgateway}}}}\n  action: DENY\n  rules:\n  - from: [{{source: {{principals: [cluster.local/ns/team-{i}-{salt}/sa/app]}}}}]\n    to: [{{operation: {{hosts: [dashscope.aliyuncs.com], paths: [/v1/*]}}}}]\n---\n"
        ));
        out.push_str(&format!(
            "apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata: {{name: bench-route-{i}, namespace: istio-system}}\nspec:\n  host: llm-{i}.bench.example\n  gateways: [mesh, istio-system/egress-gw]\n  rules:\n  - matches: [{{gateways: [mesh]}}]\n    backendRefs: [{{providerHost: istio-egressgateway.istio-system.svc.cluster.local}}]\n  - matches: [{{gateways: [istio-system/egress-gw]}}]\n    backendRefs: [{{providerHost: dashscope.aliyuncs.com}}]\n---\n"
        ));
    }
    out
}

fn reloads(b: &Bench) -> (f64, f64, f64) {
    let m = b.lab.gateway_metrics();
    (
        series_value(
            &m,
            "llm_egress_gateway_config_reloads_total",
            &[("result", "success")],
        )
        .unwrap_or(0.0),
        series_value(&m, "llm_egress_gateway_config_reload_duration_seconds_sum", &[]).unwrap_or(0.0),
        series_value(
            &m,
            "llm_egress_gateway_config_reloads_total",
            &[("result", "failure")],
        )
        .unwrap_or(0.0),
    )
}

/// Writes the benchmark's resources and waits until the gateway applied
/// them; returns how long the gateway took to read, check and compile.
fn apply_and_wait(b: &Bench, text: &str) -> anyhow::Result<f64> {
    let (count0, sum0, failed0) = reloads(b);
    b.lab.apply("bench-resources.yaml", text);
    let (_, sum1, failed1) = wait_for("the gateway to reload", Duration::from_secs(120), || {
        let r = reloads(b);
        (r.0 > count0 || r.2 > failed0).then_some(r)
    });
    if failed1 > failed0 {
        bail!(
            "the gateway rejected the benchmark's resources:\n{}",
            b.lab.gateway_logs()
        );
    }
    Ok((sum1 - sum0) * 1000.0)
}

/// The gateway with 0, 10, 100, 1,000 and 10,000 policies and as many
/// routes: reload time, memory, and latency at the fixed rate (the p50 over
/// the 0 point is what deciding costs). At the largest point, the
/// configuration is reloaded every second under the fixed rate: no request
/// may fail.
pub fn gateway_resources(b: &Bench) -> anyhow::Result<Value> {
    println!("bench: the gateway with more policies and routes");
    let counts: &[usize] = if b.opts.quick {
        &[0, 10, 100, 1000]
    } else {
        &[0, 10, 100, 1000, 10000]
    };
    let gateway = b.gateway_pid();
    let path = PathSpec {
        name: "llm-egress",
        cgroup: b.lab.sleep_cgroup.clone(),
        url: "http://dashscope.aliyuncs.com/".into(),
        headers: vec![],
        body: body(false, false),
        ca: None,
        procs: vec![],
    };
    let seconds = if b.opts.quick { 1.0 } else { 3.0 };
    let rate_args = |seconds: f64| {
        let mut a = vec![
            "rate".to_string(),
            "--rate".into(),
            b.opts.rate.to_string(),
            "--seconds".into(),
            seconds.to_string(),
        ];
        a.extend(target_args(&path, &path.body));
        a
    };
    let mut points = Vec::new();
    let mut baseline_p50 = None;
    for &n in counts {
        let reload_ms = apply_and_wait(b, &resources(n, 0))?;
        let cpu0 = cpu_s(gateway);
        let v = b.loadgen(&path.cgroup, &rate_args(seconds), Duration::from_secs(120))?;
        let cpu1 = cpu_s(gateway);
        let p50 = v["p50_us"].as_f64().unwrap_or(0.0);
        let base = *baseline_p50.get_or_insert(p50);
        let requests = v["sent"].as_f64().unwrap_or(0.0).max(1.0);
        let point = json!({
            "policies": n,
            "routes": n,
            "reload_ms": reload_ms,
            "gateway_kb": procstat::rss_kb(gateway),
            "p50_us": p50,
            "p99_us": v["p99_us"],
            "p50_over_empty_us": p50 - base,
            "errors": v["errors"],
            "gateway_cpu_s_per_1k": (cpu1 - cpu0) / (requests / 1000.0),
        });
        println!("bench:   {point}");
        points.push(point);
    }

    // Reloads under load: 10,000 resources (half policies, half routes),
    // changed every few seconds, as a busy cluster's API would.
    let largest = counts.last().copied().unwrap_or(0) / 2;
    let under_load_s = if b.opts.quick { 4.0 } else { 12.0 };
    let (count0, _, _) = reloads(b);
    let run = std::thread::scope(|s| -> anyhow::Result<(Value, usize)> {
        let load = s.spawn(|| b.loadgen(&path.cgroup, &rate_args(under_load_s), Duration::from_secs(120)));
        let mut salt = 1;
        let end = Instant::now() + Duration::from_secs_f64(under_load_s + 1.0);
        while Instant::now() < end {
            // A changed configuration (other principals) of the same size.
            b.lab.apply("bench-resources.yaml", &resources(largest, salt));
            salt += 1;
            std::thread::sleep(Duration::from_secs(REWRITE_EVERY_S));
        }
        let v = load
            .join()
            .map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
        Ok((v, salt - 1))
    })?;
    let (v, writes) = run;
    let (count1, _, failed) = reloads(b);
    let under_load = json!({
        "resources": largest * 2,
        "rewrite_every_s": REWRITE_EVERY_S,
        "rate": b.opts.rate,
        "seconds": under_load_s,
        "configuration_writes": writes,
        "reloads": count1 - count0,
        "failed_reloads": failed,
        "requests": v["count"],
        "errors": v["errors"],
        "p50_us": v["p50_us"],
        "p99_us": v["p99_us"],
        "p999_us": v["p999_us"],
    });
    println!("bench:   reloads under load: {under_load}");
    b.lab.remove("bench-resources.yaml");
    Ok(json!({"points": points, "reload_under_load": under_load}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_resources_are_valid_and_counted() {
        let text = resources(3, 7);
        let mut set = llm_egress_config::resources::ResourceSet::default();
        let problems = set.add_text(std::path::Path::new("bench-resources.yaml"), &text);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!((set.policies.len(), set.routes.len()), (3, 3));
        assert!(text.contains("team-2-7"));
    }

    #[test]
    fn per_connection_memory_is_the_slope() {
        let points = vec![
            json!({"connections": 0, "agent_kb": 1000, "gateway_kb": 2000}),
            json!({"connections": 1000, "agent_kb": 5000, "gateway_kb": 12000}),
        ];
        assert_eq!(per_connection(&points), json!({"agent": 4.0, "gateway": 10.0}));
    }
}

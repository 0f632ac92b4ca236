//! The report: a Markdown table on stdout, JSON and a PNG chart under
//! `target/bench/`.

use std::path::Path;

use serde_json::{json, Value};

fn version_of(cmd: &Path, arg: &str) -> String {
    std::process::Command::new(cmd)
        .arg(arg)
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// `…envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL` → `envoy 1.40.0`.
fn short_envoy_version(line: &str) -> String {
    line.split("version: ")
        .nth(1)
        .and_then(|v| v.split('/').nth(1))
        .map(|v| format!("envoy {v}"))
        .unwrap_or_else(|| line.to_string())
}

pub fn versions(envoy: &Path, litellm_python: Option<&std::path::PathBuf>) -> Value {
    let litellm = litellm_python
        .map(|py| {
            std::process::Command::new(py)
                .args([
                    "-c",
                    "import importlib.metadata as m; print(m.version('litellm'))",
                ])
                .output()
                .map(|o| format!("litellm {}", String::from_utf8_lossy(&o.stdout).trim()))
                .unwrap_or_default()
        })
        .unwrap_or_default();
    json!({
        "llm-egress": env!("CARGO_PKG_VERSION"),
        "envoy": short_envoy_version(&version_of(envoy, "--version")),
        "nginx": version_of(Path::new("/usr/sbin/nginx"), "-v").replace("nginx version: nginx/", "nginx "),
        "litellm": litellm,
    })
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

fn ms(us: f64) -> String {
    format!("{:.2}", us / 1000.0)
}

pub const PATHS: [&str; 5] = ["direct", "llm-egress", "envoy", "nginx", "litellm"];

pub fn markdown(r: &Value) -> String {
    let mut out = String::new();
    let m = &r["machine"];
    out.push_str(&format!(
        "Measured {} on {} cores ({}), kernel {}; steal {:.1}% during the run; {} round(s), fixed rate {} req/s for {} s, ~{} B requests, ~1 KiB responses. Versions: llm-egress {}, {}, {}{}.\n\n",
        r["date"].as_str().unwrap_or(""),
        m["cores"],
        m["cpu"].as_str().unwrap_or(""),
        m["kernel"].as_str().unwrap_or(""),
        f(&r["steal_percent"]),
        r["options"]["rounds"],
        r["options"]["rate"],
        r["options"]["seconds"],
        r["options"]["request_bytes"],
        r["versions"]["llm-egress"].as_str().unwrap_or(""),
        r["versions"]["envoy"].as_str().unwrap_or(""),
        r["versions"]["nginx"].as_str().unwrap_or(""),
        r["versions"]["litellm"].as_str().filter(|v| !v.is_empty()).map(|v| format!(", {v}")).unwrap_or_default(),
    ));
    if let Some(pgo) = r["versions"]["pgo"].as_str() {
        out.push_str(&format!(
            "The agent and gateway are built with profile-guided optimisation (`pgo/`): {pgo}.\n\n"
        ));
    }
    if let Some(kept) = r["kept_from_previous_run"].as_array() {
        let names: Vec<&str> = kept.iter().filter_map(Value::as_str).collect();
        out.push_str(&format!(
            "Sections kept from the run of {}: {} (`--merge`); the rest measured now.\n\n",
            r["previous_run_date"].as_str().unwrap_or("an earlier run"),
            names.join(", ")
        ));
    }
    if let Some(p) = r["pinning"].as_object() {
        out.push_str(&format!(
            "CPU pinning: {} on CPU {}; {} on CPU {}.\n\n",
            p["world"].as_str().unwrap_or(""),
            p["world_cpu"],
            p["proxies"].as_str().unwrap_or(""),
            p["proxies_cpu"]
        ));
    }
    if r["paths"].is_object() {
        paths_table(r, &mut out);
    }
    if r["ceiling"].is_object() {
        ceiling_lines(&r["ceiling"], &mut out);
    }
    if r["memory"].is_object() {
        memory_table(&r["memory"], &mut out);
    }
    if r["curves"].is_object() {
        curves_tables(&r["curves"], &mut out);
    }
    if r["connect_ns"].is_object() {
        connect_table(&r["connect_ns"], &mut out);
    }
    out
}

fn paths_table(r: &Value, out: &mut String) {
    out.push_str("| path | p50 ms | p90 ms | p99 ms | p99.9 ms | added p50 / p99 ms (paired) | p50 vs direct | p50 vs Envoy | req/s 1 conn | 16 conns | 16 conns vs Envoy | 64 conns | new conn/s | CPU s per 1k req (fixed rate / 16 conns; context switches per req at the fixed rate) | peak RSS MiB | SSE TTFB ms | SSE gap p50 / p99 ms |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let p = &r["paths"];
    let direct = &p["direct"];
    let envoy = &p["envoy"];
    for name in PATHS {
        let x = &p[name];
        if x.is_null() {
            continue;
        }
        let rss: f64 = x["peak_rss_kb"]
            .as_object()
            .map(|o| o.values().map(f).sum())
            .unwrap_or(0.0);
        let procs: Vec<String> = x["peak_rss_kb"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| format!("{k} {:.1}", f(v) / 1024.0))
                    .collect()
            })
            .unwrap_or_default();
        out.push_str(&format!(
            "| {name}{} | {} | {} | {} | {} | {} / {} | {:.2}× | {:.2}× | {:.0} | {:.0} | {:.2}× | {:.0} | {:.0} | {} | {} | {} | {} / {} |\n",
            rate_note(x, &r["options"]["rate"]),
            ms(f(&x["p50_us"])),
            ms(f(&x["p90_us"])),
            ms(f(&x["p99_us"])),
            ms(f(&x["p999_us"])),
            ms(if x["added_p50_us"].is_null() { f(&x["p50_us"]) - f(&direct["p50_us"]) } else { f(&x["added_p50_us"]) }),
            ms(if x["added_p99_us"].is_null() { f(&x["p99_us"]) - f(&direct["p99_us"]) } else { f(&x["added_p99_us"]) }),
            f(&x["p50_us"]) / f(&direct["p50_us"]).max(1.0),
            f(&x["p50_us"]) / f(&envoy["p50_us"]).max(1.0),
            f(&x["sat_1"]),
            f(&x["sat_16"]),
            f(&x["sat_16"]) / f(&envoy["sat_16"]).max(1.0),
            f(&x["sat_64"]),
            f(&x["newconn_rps"]),
            cpu_cell(x),
            if procs.is_empty() { "-".to_string() } else { format!("{:.1} ({})", rss / 1024.0, procs.join(", ")) },
            ms(f(&x["ttfb_p50_us"])),
            ms(f(&x["gap_p50_us"])),
            ms(f(&x["gap_p99_us"])),
        ));
    }
}

/// CPU at the fixed rate and saturated, and how often the proxies were
/// switched in and out per request at the fixed rate (when measured).
fn cpu_cell(x: &Value) -> String {
    if x["cpu_s_per_1k"].is_null() {
        return "-".into();
    }
    let mut cell = format!(
        "{:.3} / {:.3}",
        f(&x["cpu_s_per_1k"]),
        f(&x["sat_16_cpu_s_per_1k"])
    );
    if let Some(s) = x["switches_per_request"].as_f64() {
        cell.push_str(&format!("; {s:.1}"));
    }
    cell
}

fn connect_table(c: &Value, out: &mut String) {
    out.push_str("\n| connect() (non-blocking, µs) | p50 | p99 |\n|---|---|---|\n");
    for (k, label) in [
        ("no_program", "no program attached"),
        ("hook_non_target", "hook, destination not a target"),
        ("hook_target_not_enrolled", "hook, target, workload not enrolled"),
        ("hook_captured", "hook, captured (rewritten to the agent)"),
    ] {
        out.push_str(&format!(
            "| {label} | {:.1} | {:.1} |\n",
            f(&c[k]["p50_ns"]) / 1000.0,
            f(&c[k]["p99_ns"]) / 1000.0
        ));
    }
}

/// Why a path's latencies were not taken at the run's rate, if they were not.
fn rate_note(x: &Value, run_rate: &Value) -> String {
    let rate = if x["rate"].is_null() {
        f(run_rate)
    } else {
        f(&x["rate"])
    };
    let achieved = f(&x["achieved_rps"]);
    if achieved > 0.0 && achieved < 0.95 * rate {
        format!(" (overloaded: {achieved:.0} of {rate:.0} req/s served; its latencies are queueing)")
    } else if rate < f(run_rate) {
        format!(" (at {rate:.0} req/s: it cannot serve {run_rate})")
    } else {
        String::new()
    }
}

fn ceiling_lines(c: &Value, out: &mut String) {
    out.push_str(&format!(
        "\nCeiling check: the provider's API over plain HTTP straight from the load generator (the most any path can get from the world's CPU) must be ≥ {:.0}× a path's rate for that figure to be the path's own; otherwise it is marked provider-bound.\n\n",
        f(&c["required_ratio"])
    ));
    out.push_str("| conns | ceiling req/s | path: req/s (ceiling ÷ path) |\n|---|---|---|\n");
    for (k, v) in c["columns"].as_object().into_iter().flatten() {
        let cells: Vec<String> = v["paths"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, p)| {
                format!(
                    "{name} {:.0} ({:.1}×{})",
                    f(&p["rps"]),
                    f(&p["ratio"]),
                    if p["provider_bound"].as_bool().unwrap_or(true) {
                        ", **provider-bound**"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        out.push_str(&format!(
            "| {} | {:.0} | {} |\n",
            k.trim_start_matches("sat_"),
            f(&v["ceiling_rps"]),
            cells.join("; ")
        ));
    }
}

fn mib(kb: &Value) -> String {
    format!("{:.1}", f(kb) / 1024.0)
}

fn memory_table(m: &Value, out: &mut String) {
    out.push_str("\n| held captured connections | agent RSS MiB | gateway RSS MiB | agent CPU µs per connection opened | gateway CPU µs per connection | time to open all (s) |\n|---|---|---|---|---|---|\n");
    for p in m["points"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.2} |\n",
            p["connections"],
            mib(&p["agent_kb"]),
            mib(&p["gateway_kb"]),
            f(&p["agent_cpu_us_per_connection"]),
            f(&p["gateway_cpu_us_per_connection"]),
            f(&p["open_s"]),
        ));
    }
    if let Some(idle) = m["points"].as_array().and_then(|p| p.first()) {
        for (who, k) in [("Agent", "agent_breakdown"), ("Gateway", "gateway_breakdown")] {
            let b = &idle[k];
            out.push_str(&format!(
                "\n{who} at {} connections: RSS {} MiB = {} MiB anonymous (heap, stacks) + {} MiB file-backed (program text), {} threads.",
                idle["connections"],
                mib(&b["rss_kb"]),
                mib(&b["anonymous_kb"]),
                mib(&b["file_backed_kb"]),
                b["threads"]
            ));
        }
        out.push('\n');
    }
    if m["per_connection_kb"].is_object() {
        out.push_str(&format!(
            "\nPer held connection: agent {:.1} KiB, gateway {:.1} KiB.\n",
            f(&m["per_connection_kb"]["agent"]),
            f(&m["per_connection_kb"]["gateway"])
        ));
    }
}

fn curves_tables(c: &Value, out: &mut String) {
    out.push_str("\n| enrolled pods | applied in ms | agent RSS MiB (settled before: baseline) | agent CPU ms |\n|---|---|---|---|\n");
    for p in c["enrolled_pods"]["points"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "| {} | {:.0} | {} ({}) | {:.1} |\n",
            p["pods"],
            f(&p["applied_ms"]),
            mib(&p["agent_kb"]),
            if p["agent_baseline_kb"].is_null() {
                "-".to_string()
            } else {
                mib(&p["agent_baseline_kb"])
            },
            f(&p["agent_cpu_ms"])
        ));
    }
    out.push_str("\n| policies + routes | reload ms | gateway RSS MiB | p50 ms | p99 ms | p50 over none (µs) | gateway CPU s per 1k req | errors |\n|---|---|---|---|---|---|---|---|\n");
    let g = &c["gateway_resources"];
    for p in g["points"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "| {} + {} | {:.1} | {} | {} | {} | {:.0} | {:.3} | {} |\n",
            p["policies"],
            p["routes"],
            f(&p["reload_ms"]),
            mib(&p["gateway_kb"]),
            ms(f(&p["p50_us"])),
            ms(f(&p["p99_us"])),
            f(&p["p50_over_empty_us"]),
            f(&p["gateway_cpu_s_per_1k"]),
            p["errors"]
        ));
    }
    let u = &g["reload_under_load"];
    if u.is_object() {
        out.push_str(&format!(
            "\nReloads under load: {} resources changed {} times (every {} s) in {} s at {} req/s; {} reloads applied ({} failed); {} requests, **{} failed**; p50 {} ms, p99 {} ms, p99.9 {} ms.\n",
            u["resources"], u["configuration_writes"], u["rewrite_every_s"], u["seconds"], u["rate"], u["reloads"], u["failed_reloads"], u["requests"], u["errors"],
            ms(f(&u["p50_us"])), ms(f(&u["p99_us"])), ms(f(&u["p999_us"]))
        ));
    }
}

/// Writes results.json, results.md and (with matplotlib) chart.png.
pub fn write(r: &Value, dir: &Path) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    let mut notes = Vec::new();
    let json_path = dir.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(r)?)?;
    std::fs::write(dir.join("results.md"), markdown(r))?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("chart.py");
    let png = dir.join("chart.png");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(&json_path)
        .arg(&png)
        .output();
    match out {
        Ok(o) if o.status.success() => notes.push(format!("chart: {}", png.display())),
        Ok(o) => notes.push(format!(
            "no chart ({}): install matplotlib (cargo xtask setup --bench)",
            String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")
        )),
        Err(e) => notes.push(format!("no chart: python3: {e}")),
    }
    notes.push(format!("json: {}", json_path.display()));
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_has_a_row_per_path_and_ratios() {
        let path = |p50: f64| json!({"p50_us": p50, "p90_us": p50, "p99_us": p50 * 2.0, "p999_us": p50 * 3.0, "sat_1": 100.0, "sat_16": 1000.0, "sat_64": 2000.0, "newconn_rps": 50.0, "cpu_s_per_1k": 0.1, "peak_rss_kb": {"proxy": 2048}, "ttfb_p50_us": 1000.0, "gap_p50_us": 5000.0, "gap_p99_us": 6000.0});
        let r = json!({
            "date": "d", "machine": {"cores": 2, "kernel": "k", "cpu": "c"}, "steal_percent": 0.5,
            "options": {"rounds": 1, "rate": 100, "seconds": 1, "request_bytes": 1000},
            "versions": {"llm-egress": "0", "envoy": "e", "nginx": "n", "litellm": "litellm 1"},
            "paths": {"direct": path(1000.0), "llm-egress": path(1500.0), "envoy": path(3000.0), "nginx": path(1200.0), "litellm": path(9000.0)},
            "connect_ns": {},
            "memory": {"points": [{"connections": 0, "agent_kb": 2048, "gateway_kb": 4096}, {"connections": 10, "agent_kb": 3072, "gateway_kb": 5120}], "per_connection_kb": {"agent": 102.4, "gateway": 102.4}},
        });
        let md = markdown(&r);
        assert_eq!(
            md.lines().filter(|l| l.starts_with("| ")).count(),
            1 + 5 + 1 + 4 + 1 + 2,
            "{md}"
        );
        assert!(md.contains(", litellm 1."), "{md}");
        assert!(md.contains("| 10 | 3.0 | 5.0 |"), "{md}");
        assert!(md.contains("agent 102.4 KiB"), "{md}");
        assert!(md.contains("| llm-egress | 1.50 |"), "{md}");
        assert!(md.contains("1.50× | 0.50×"), "{md}");
        assert!(md.contains("| 0.50 / 1.00 |"), "{md}");
    }
}

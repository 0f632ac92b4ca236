//! `llm-egress-agent status`: fetches `/status` from a running agent and
//! prints it for people (or as JSON).

use std::net::SocketAddr;

use anyhow::{bail, Context};
use http_body_util::{BodyExt, Empty};
use hyper::{body::Bytes, Request};
use hyper_util::rt::TokioIo;

use crate::admin::Status;

pub async fn fetch(admin: SocketAddr) -> anyhow::Result<Vec<u8>> {
    let stream = tokio::net::TcpStream::connect(admin)
        .await
        .with_context(|| format!("cannot reach the agent's admin endpoint at {admin}; is the agent running (pass --admin if it uses another address)?"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get("/status")
        .header("host", admin.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await.context("requesting /status")?;
    let code = resp.status();
    let body = resp.into_body().collect().await?.to_bytes().to_vec();
    if !code.is_success() {
        bail!("agent answered {code}: {}", String::from_utf8_lossy(&body));
    }
    Ok(body)
}

pub async fn print(admin: SocketAddr, json: bool) -> anyhow::Result<()> {
    let body = fetch(admin).await?;
    if json {
        println!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let s: Status =
        serde_json::from_slice(&body).context("the agent's /status is not what this version expects")?;
    print!("{}", render(&s));
    Ok(())
}

fn render(s: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "llm-egress-agent {} — mode {}, capture {} on {}",
        s.version,
        s.mode,
        s.attachment,
        s.cgroup_root.display()
    );
    let _ = writeln!(
        out,
        "proxy: listen {:?}, advertised to workloads as {:?}",
        s.listen, s.advertise
    );
    let _ = writeln!(out, "\nTargets:");
    for t in &s.targets {
        let addrs: Vec<String> = t.addresses.iter().map(|a| a.to_string()).collect();
        let _ = write!(
            out,
            "  {:<40} {}",
            t.host,
            if addrs.is_empty() {
                "-".into()
            } else {
                addrs.join(", ")
            }
        );
        if let Some(e) = &t.error {
            let _ = write!(out, "  (error: {e})");
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(out, "\nWorkloads ({}):", s.workloads.source);
    for w in &s.workloads.enrolled {
        let _ = writeln!(
            out,
            "  {}/{:<30} sa={:<16} cgroup {} ({})",
            w.spec.namespace,
            w.spec.name,
            w.spec.service_account,
            w.cgroup_id,
            w.spec.cgroup_path.display()
        );
    }
    for p in &s.workloads.problems {
        let _ = writeln!(out, "  not enrolled: {p}");
    }
    if let Some(e) = &s.workloads.source_error {
        let _ = writeln!(out, "  source error (last good list in force): {e}");
    }
    let _ = writeln!(out, "\nCounters:");
    for (k, v) in &s.counters {
        let _ = writeln!(out, "  {k:<12} {v}");
    }
    let _ = writeln!(out, "Maps:");
    for (k, v) in &s.maps {
        let _ = writeln!(out, "  {k:<12} {v}");
    }
    if !s.recent.is_empty() {
        let _ = writeln!(out, "\nRecent captured connections:");
        for r in s.recent.iter().rev().take(10) {
            let _ = writeln!(
                out,
                "  {} -> {} ({}) by {}",
                r.peer,
                r.original_destination,
                r.host.as_deref().unwrap_or("-"),
                r.principal
            );
        }
    }
    out
}

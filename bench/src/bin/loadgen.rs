//! The benchmark's client. Runs inside a "pod" (namespace + cgroup) and
//! prints one JSON object with what it measured.
//!
//! * `rate`: open loop at a fixed rate over keep-alive connections; latency
//!   counts from each request's scheduled time (no coordinated omission).
//! * `saturate`: closed loop, as fast as the path allows.
//! * `newconn`: a new connection per request, as `curl` does.
//! * `stream`: SSE completions; time to first byte and gaps between chunks.
//! * `hold`: opens connections and keeps them open (agent memory).
//! * `connect`: the cost of `connect()` itself (the eBPF hook).

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::{client::conn::http1::SendRequest, Request};
use hyper_util::rt::TokioIo;

#[derive(Parser)]
#[command(about = "llm-egress benchmark client")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(clap::Args, Clone)]
struct Target {
    /// http:// or https:// URL.
    #[arg(long)]
    url: String,
    /// Extra request header, NAME:VALUE (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Request body.
    #[arg(long, default_value = "{}")]
    body: String,
    /// CA file for https URLs.
    #[arg(long)]
    ca: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Mode {
    /// Fixed rate over keep-alive connections.
    Rate {
        #[command(flatten)]
        target: Target,
        /// Requests per second.
        #[arg(long)]
        rate: u32,
        /// Measured seconds (after the warm-up).
        #[arg(long)]
        seconds: f64,
        /// Keep-alive connections sharing the rate.
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Warm-up seconds at the same rate, not measured.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
    },
    /// As fast as possible on N keep-alive connections.
    Saturate {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        connections: usize,
        #[arg(long)]
        seconds: f64,
    },
    /// A new connection per request, N at a time.
    Newconn {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        #[arg(long)]
        seconds: f64,
    },
    /// Streamed completions, one after another.
    Stream {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 5)]
        count: usize,
    },
    /// Open N connections to ADDR and keep them open for S seconds.
    Hold {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        seconds: f64,
    },
    /// Time N connect() calls to ADDR.
    Connect {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 500)]
        count: usize,
    },
}

struct Client {
    https: bool,
    host: String,
    port: u16,
    path: String,
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsConnector>,
    headers: Vec<(String, String)>,
    body: Bytes,
}

impl Client {
    async fn new(t: &Target) -> anyhow::Result<Client> {
        let uri: hyper::Uri = t.url.parse().context("--url")?;
        let https = uri.scheme_str() == Some("https");
        let host = uri.host().context("URL without host")?.to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await?
            .find(|a| a.is_ipv4())
            .with_context(|| format!("{host} does not resolve to IPv4"))?;
        let tls = if https {
            let mut roots = rustls::RootCertStore::empty();
            let ca = t.ca.as_ref().context("https needs --ca")?;
            use rustls::pki_types::pem::PemObject;
            for c in rustls::pki_types::CertificateDer::pem_file_iter(ca)? {
                roots.add(c?)?;
            }
            let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
        } else {
            None
        };
        let headers = t
            .headers
            .iter()
            .map(|h| {
                h.split_once(':')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .context("--header NAME:VALUE")
            })
            .collect::<anyhow::Result<_>>()?;
        let path = uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "/".into());
        Ok(Client {
            https,
            host,
            port,
            path,
            addr,
            tls,
            headers,
            body: Bytes::from(t.body.clone()),
        })
    }

    async fn connect(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        if let Some(tls) = &self.tls {
            let name = rustls::pki_types::ServerName::try_from(self.host.clone())?;
            let s = tls.connect(name, tcp).await?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
            tokio::spawn(conn);
            Ok(sender)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            Ok(sender)
        }
    }

    fn request(&self) -> Request<Full<Bytes>> {
        let authority = if (self.https && self.port == 443) || (!self.https && self.port == 80) {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let mut req = Request::post(self.path.as_str())
            .header("host", authority)
            .header("content-type", "application/json")
            .body(Full::new(self.body.clone()))
            .expect("valid request");
        // Given headers replace defaults (a second Host header is a 400).
        for (k, v) in &self.headers {
            if let (Ok(name), Ok(value)) = (
                hyper::header::HeaderName::from_bytes(k.as_bytes()),
                hyper::header::HeaderValue::from_str(v),
            ) {
                req.headers_mut().insert(name, value);
            }
        }
        req
    }

    /// One request; Ok(true) on a 2xx answer read to the end.
    async fn once(&self, sender: &mut SendRequest<Full<Bytes>>) -> anyhow::Result<bool> {
        sender.ready().await?;
        let resp = sender.send_request(self.request()).await?;
        let ok = resp.status().is_success();
        resp.into_body().collect().await?;
        Ok(ok)
    }
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn latency_json(h: &Histogram<u64>) -> serde_json::Value {
    serde_json::json!({
        "p50_us": h.value_at_quantile(0.5),
        "p90_us": h.value_at_quantile(0.9),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
        "count": h.len(),
    })
}

async fn rate(
    t: Target,
    rate: u32,
    seconds: f64,
    connections: usize,
    warmup: f64,
) -> anyhow::Result<serde_json::Value> {
    let client = Arc::new(Client::new(&t).await?);
    let interval = Duration::from_secs_f64(connections as f64 / rate as f64);
    let start = Instant::now() + Duration::from_millis(200);
    let measure_from = start + Duration::from_secs_f64(warmup);
    let end = measure_from + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for c in 0..connections {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = hist();
            let (mut errors, mut sent) = (0u64, 0u64);
            let mut sender = client.connect().await?;
            // Spread the connections' schedules evenly.
            let mut next = start + interval.mul_f64(c as f64 / connections as f64);
            while next < end {
                tokio::time::sleep_until(next.into()).await;
                let ok = match client.once(&mut sender).await {
                    Ok(ok) => ok,
                    Err(_) => {
                        sender = client.connect().await?;
                        false
                    }
                };
                sent += 1;
                if next >= measure_from {
                    if ok {
                        h.record(next.elapsed().as_micros().max(1) as u64)?;
                    } else {
                        errors += 1;
                    }
                }
                next += interval;
            }
            Ok::<_, anyhow::Error>((h, errors, sent))
        }));
    }
    let mut all = hist();
    let (mut errors, mut sent) = (0, 0);
    for t in tasks {
        let (h, e, s) = t.await??;
        all.add(h)?;
        errors += e;
        sent += s;
    }
    let mut v = latency_json(&all);
    v["errors"] = errors.into();
    // Warm-up included: what a process's CPU over the whole run served.
    v["sent"] = sent.into();
    v["achieved_rps"] = (all.len() as f64 / seconds).into();
    Ok(v)
}

async fn saturate(t: Target, connections: usize, seconds: f64) -> anyhow::Result<serde_json::Value> {
    let client = Arc::new(Client::new(&t).await?);
    // Warm up every connection (TLS handshakes) before the clock starts.
    let mut senders = Vec::new();
    for _ in 0..connections {
        let mut s = client.connect().await?;
        client.once(&mut s).await?;
        senders.push(s);
    }
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut sender in senders {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut errors) = (0u64, 0u64);
            while Instant::now() < end {
                match client.once(&mut sender).await {
                    Ok(true) => ok += 1,
                    Ok(false) => errors += 1,
                    Err(_) => {
                        errors += 1;
                        sender = client.connect().await?;
                    }
                }
            }
            Ok::<_, anyhow::Error>((ok, errors))
        }));
    }
    let (mut ok, mut errors) = (0, 0);
    for t in tasks {
        let (o, e) = t.await??;
        ok += o;
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(
        serde_json::json!({"rps": ok as f64 / elapsed, "requests": ok, "errors": errors, "connections": connections}),
    )
}

async fn newconn(t: Target, concurrency: usize, seconds: f64) -> anyhow::Result<serde_json::Value> {
    let client = Arc::new(Client::new(&t).await?);
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut errors) = (0u64, 0u64);
            let mut h = hist();
            while Instant::now() < end {
                let t0 = Instant::now();
                let r = async {
                    let mut s = client.connect().await?;
                    client.once(&mut s).await
                }
                .await;
                match r {
                    Ok(true) => {
                        ok += 1;
                        h.record(t0.elapsed().as_micros().max(1) as u64)?;
                    }
                    _ => errors += 1,
                }
            }
            Ok::<_, anyhow::Error>((ok, errors, h))
        }));
    }
    let (mut ok, mut errors, mut all) = (0, 0, hist());
    for t in tasks {
        let (o, e, h) = t.await??;
        ok += o;
        errors += e;
        all.add(h)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(
        serde_json::json!({"rps": ok as f64 / elapsed, "requests": ok, "errors": errors, "latency": latency_json(&all)}),
    )
}

async fn stream(t: Target, count: usize) -> anyhow::Result<serde_json::Value> {
    let client = Client::new(&t).await?;
    let mut sender = client.connect().await?;
    client.once(&mut sender).await?; // warm-up
    let (mut ttfb, mut gaps, mut total) = (hist(), hist(), hist());
    let mut chunks = 0u64;
    for _ in 0..count {
        sender.ready().await?;
        let t0 = Instant::now();
        let resp = sender.send_request(client.request()).await?;
        if !resp.status().is_success() {
            bail!("stream request answered {}", resp.status());
        }
        let mut body = resp.into_body();
        let mut last: Option<Instant> = None;
        while let Some(frame) = body.frame().await {
            if frame?.data_ref().is_some() {
                let now = Instant::now();
                match last {
                    None => ttfb.record(t0.elapsed().as_micros().max(1) as u64)?,
                    Some(l) => gaps.record(now.duration_since(l).as_micros().max(1) as u64)?,
                }
                chunks += 1;
                last = Some(now);
            }
        }
        total.record(t0.elapsed().as_micros().max(1) as u64)?;
    }
    Ok(
        serde_json::json!({"ttfb": latency_json(&ttfb), "gap": latency_json(&gaps), "total": latency_json(&total), "frames": chunks}),
    )
}

async fn hold(addr: SocketAddr, count: usize, seconds: f64) -> anyhow::Result<serde_json::Value> {
    let mut conns = Vec::with_capacity(count);
    let mut failed = 0;
    for _ in 0..count {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(c) => conns.push(c),
            Err(_) => failed += 1,
        }
    }
    println!(
        "{}",
        serde_json::json!({"holding": conns.len(), "failed": failed})
    );
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    Ok(serde_json::json!({"held": conns.len(), "failed": failed}))
}

fn connect_bench(addr: SocketAddr, count: usize) -> anyhow::Result<serde_json::Value> {
    let mut h = hist();
    let mut errors = 0;
    for _ in 0..count {
        // Non-blocking connect: the syscall returns once the hook ran and
        // the SYN is queued, so this times connect() itself, not the RTT.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) };
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        let SocketAddr::V4(v4) = addr else {
            bail!("IPv4 only")
        };
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let t0 = Instant::now();
        let rc = unsafe {
            libc::connect(
                fd,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        let elapsed = t0.elapsed();
        let err = std::io::Error::last_os_error().raw_os_error();
        unsafe { libc::close(fd) };
        if rc == 0 || err == Some(libc::EINPROGRESS) {
            h.record((elapsed.as_nanos() as u64).max(1))?;
        } else {
            errors += 1;
        }
    }
    Ok(
        serde_json::json!({"p50_ns": h.value_at_quantile(0.5), "p90_ns": h.value_at_quantile(0.9), "p99_ns": h.value_at_quantile(0.99), "count": h.len(), "errors": errors}),
    )
}

/// Lifts the soft open-files limit to the hard one: `hold` opens thousands.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out pointer; setrlimit only with values getrlimit gave.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

// One thread: pinned to one CPU, a second thread would only add wake-ups.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    raise_nofile();
    let out = match Cli::parse().mode {
        Mode::Rate {
            target,
            rate: r,
            seconds,
            connections,
            warmup,
        } => rate(target, r, seconds, connections, warmup).await?,
        Mode::Saturate {
            target,
            connections,
            seconds,
        } => saturate(target, connections, seconds).await?,
        Mode::Newconn {
            target,
            concurrency,
            seconds,
        } => newconn(target, concurrency, seconds).await?,
        Mode::Stream { target, count } => stream(target, count).await?,
        Mode::Hold { addr, count, seconds } => hold(addr, count, seconds).await?,
        Mode::Connect { addr, count } => connect_bench(addr, count)?,
    };
    println!("{out}");
    Ok(())
}

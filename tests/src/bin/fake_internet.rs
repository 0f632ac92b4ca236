//! A small HTTP server for the "internet" namespace of the end-to-end tests.
//! Every answer says who answered and whom it saw, so a test can tell a
//! captured connection (peer = the node) from a direct one (peer = the pod).
//! Each request is also appended as one JSON line to `--log`.

use std::{convert::Infallible, io::Write, net::SocketAddr, path::PathBuf, sync::Arc, sync::Mutex};

use clap::Parser;
use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;

#[derive(Parser)]
#[command(about = "Test HTTP server that reports the addresses it saw")]
struct Args {
    /// Address to listen on (repeatable).
    #[arg(long = "listen", required = true)]
    listen: Vec<SocketAddr>,
    /// Name put in every answer.
    #[arg(long, default_value = "internet")]
    name: String,
    /// File that gets one JSON line per request.
    #[arg(long)]
    log: Option<PathBuf>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let log = match &args.log {
        Some(p) => Some(Arc::new(Mutex::new(
            std::fs::OpenOptions::new().create(true).append(true).open(p)?,
        ))),
        None => None,
    };
    let name: Arc<str> = args.name.into();
    let mut tasks = Vec::new();
    for addr in args.listen {
        let socket = if addr.is_ipv6() {
            tokio::net::TcpSocket::new_v6()?
        } else {
            tokio::net::TcpSocket::new_v4()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(1024)?;
        let (name, log) = (name.clone(), log.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                // A dual-stack [::] socket reports IPv4 peers as ::ffff:a.b.c.d.
                let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
                let local = canonical(stream.local_addr().unwrap_or(addr));
                let peer = canonical(peer);
                let (name, log) = (name.clone(), log.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let body = serde_json::json!({
                            "server": &*name,
                            "local": local.to_string(),
                            "peer": peer.to_string(),
                            "method": req.method().as_str(),
                            "path": req.uri().path(),
                            "host": req.headers().get("host").and_then(|h| h.to_str().ok()),
                        });
                        if let Some(log) = &log {
                            if let Ok(mut f) = log.lock() {
                                let _ = writeln!(f, "{body}");
                            }
                        }
                        async move {
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(format!("{body}\n"))))
                                    .expect("static response parts"),
                            )
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }));
    }
    println!("listening");
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

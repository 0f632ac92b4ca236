//! An external authorizer speaking Envoy's HTTP authorization protocol,
//! as Istio's `ext-authz` sample does: a check carrying
//! `x-ext-authz: allow` is allowed (200, `x-ext-authz-check-result:
//! allowed`); any other is denied (403, `x-ext-authz-check-result: denied`,
//! and a body saying why). Each check is logged as one JSON line (method,
//! path, headers), so tests count calls and see what the gateway sent.

use std::{convert::Infallible, io::Write, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::{server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

#[derive(Parser)]
#[command(about = "Envoy HTTP ext_authz test authorizer (Istio's ext-authz sample semantics)")]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// File that gets one JSON line per check.
    #[arg(long)]
    log: PathBuf,
    /// Answer each check this late, in milliseconds (to test timeouts).
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let log = Arc::new(std::sync::Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&args.log)?,
    ));
    let delay = Duration::from_millis(args.delay_ms);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("listening");
    loop {
        let (tcp, _) = listener.accept().await?;
        let log = log.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let log = log.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    let mut headers = serde_json::Map::new();
                    for (k, v) in &parts.headers {
                        headers.insert(k.to_string(), v.to_str().unwrap_or("?").into());
                    }
                    let record = serde_json::json!({
                        "method": parts.method.as_str(),
                        "path": parts.uri.to_string(),
                        "headers": headers,
                        "bodyBytes": body.len(),
                    });
                    if let Ok(mut f) = log.lock() {
                        let _ = writeln!(f, "{record}");
                    }
                    tokio::time::sleep(delay).await;
                    let allow = parts.headers.get("x-ext-authz").is_some_and(|v| v == "allow");
                    let resp = if allow {
                        Response::builder()
                            .status(StatusCode::OK)
                            .header("x-ext-authz-check-result", "allowed")
                            .header("x-ext-authz-audit", "checked")
                            .body(Full::new(Bytes::new()))
                    } else {
                        Response::builder()
                            .status(StatusCode::FORBIDDEN)
                            .header("x-ext-authz-check-result", "denied")
                            .header("x-ext-authz-audit", "checked")
                            .header("content-type", "text/plain")
                            .body(Full::new(Bytes::from_static(
                                b"denied by ext_authz for not found header `x-ext-authz: allow` in the request",
                            )))
                    };
                    Ok::<_, Infallible>(resp.unwrap_or_default())
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

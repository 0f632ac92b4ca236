//! An external authorizer speaking Envoy's HTTP authorization protocol and
//! its gRPC one (`envoy.service.auth.v3.Authorization/Check`, with
//! `--grpc-listen`), as Istio's `ext-authz` sample does: a check carrying
//! `x-ext-authz: allow` is allowed (200, `x-ext-authz-check-result:
//! allowed`); any other is denied (403, `x-ext-authz-check-result: denied`,
//! and a body saying why). A check whose body (`includeRequestBodyInCheck`)
//! contains `forbidden` is denied too, as a content filter would. Each
//! check is logged as one JSON line (method, path, headers, body), so tests
//! count calls and see what the gateway sent.

use std::{convert::Infallible, io::Write, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use clap::Parser;
use envoy_types::ext_authz::v3::pb;
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
    /// Also answer Envoy's gRPC Check here.
    #[arg(long)]
    grpc_listen: Option<SocketAddr>,
}

type Log = Arc<std::sync::Mutex<std::fs::File>>;

/// A word no request body may carry.
const FORBIDDEN: &str = "forbidden";

fn record(log: &Log, value: serde_json::Value) {
    if let Ok(mut f) = log.lock() {
        let _ = writeln!(f, "{value}");
    }
}

struct GrpcAuthorizer {
    log: Log,
    delay: Duration,
}

fn header(key: &str, value: &str) -> pb::HeaderValueOption {
    pb::HeaderValueOption {
        header: Some(pb::HeaderValue {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl pb::Authorization for GrpcAuthorizer {
    async fn check(
        &self,
        request: tonic::Request<pb::CheckRequest>,
    ) -> Result<tonic::Response<pb::CheckResponse>, tonic::Status> {
        let check = request.into_inner();
        let attributes = check.attributes.unwrap_or_default();
        let http = attributes.request.and_then(|r| r.http).unwrap_or_default();
        let principal = attributes.source.map(|s| s.principal).unwrap_or_default();
        record(
            &self.log,
            serde_json::json!({
                "protocol": "grpc",
                "method": http.method,
                "path": http.path,
                "host": http.host,
                "headers": http.headers,
                "principal": principal,
                "body": http.body,
                "rawBody": String::from_utf8_lossy(&http.raw_body),
                "size": http.size,
            }),
        );
        tokio::time::sleep(self.delay).await;
        let allow = http.headers.get("x-ext-authz").is_some_and(|v| v == "allow")
            && !http.body.contains(FORBIDDEN)
            && !String::from_utf8_lossy(&http.raw_body).contains(FORBIDDEN);
        let response = if allow {
            pb::CheckResponse {
                status: Some(envoy_types::pb::google::rpc::Status {
                    code: 0,
                    ..Default::default()
                }),
                http_response: Some(pb::HttpResponse::OkResponse(pb::OkHttpResponse {
                    headers: vec![header("x-ext-authz-check-result", "allowed")],
                    response_headers_to_add: vec![header("x-ext-authz-audit", "checked")],
                    ..Default::default()
                })),
                ..Default::default()
            }
        } else {
            pb::CheckResponse {
                // PERMISSION_DENIED
                status: Some(envoy_types::pb::google::rpc::Status {
                    code: 7,
                    ..Default::default()
                }),
                http_response: Some(pb::HttpResponse::DeniedResponse(pb::DeniedHttpResponse {
                    status: Some(pb::HttpStatus {
                        code: pb::HttpStatusCode::Forbidden as i32,
                    }),
                    headers: vec![header("x-ext-authz-check-result", "denied")],
                    body: "denied by ext_authz for not found header `x-ext-authz: allow` in the request"
                        .into(),
                })),
                ..Default::default()
            }
        };
        Ok(tonic::Response::new(response))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let log: Log = Arc::new(std::sync::Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&args.log)?,
    ));
    let delay = Duration::from_millis(args.delay_ms);
    if let Some(addr) = args.grpc_listen {
        let service = pb::AuthorizationServer::new(GrpcAuthorizer {
            log: log.clone(),
            delay,
        });
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
    }
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
                        "body": String::from_utf8_lossy(&body),
                    });
                    crate::record(&log, record);
                    tokio::time::sleep(delay).await;
                    let allow = parts.headers.get("x-ext-authz").is_some_and(|v| v == "allow")
                        && !String::from_utf8_lossy(&body).contains(FORBIDDEN);
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

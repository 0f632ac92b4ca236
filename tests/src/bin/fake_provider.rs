//! An OpenAI-compatible HTTPS provider for tests and the demo. It answers
//! chat completions (JSON, or SSE when `stream` is true) only when the
//! request carries `Authorization: Bearer <--key>`, and appends one JSON
//! line per request to `--log`: what it saw, with the key checked, never
//! written.

use std::{
    convert::Infallible, io::Write, net::SocketAddr, path::PathBuf, sync::Arc, sync::Mutex, time::Duration,
};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::{body::Frame, server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

#[derive(Parser)]
#[command(about = "OpenAI-compatible test provider over HTTPS")]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Server certificate (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// Server key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// The API key requests must carry; read from this environment variable.
    #[arg(long, default_value = "PROVIDER_API_KEY")]
    key_env: String,
    /// File that gets one JSON line per request.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Number of SSE chunks in a streamed answer.
    #[arg(long, default_value_t = 5)]
    chunks: usize,
    /// Delay between SSE chunks, in milliseconds.
    #[arg(long, default_value_t = 200)]
    chunk_delay_ms: u64,
    /// Pad the answer's content to this many bytes (0: the seed's answer).
    #[arg(long, default_value_t = 0)]
    answer_bytes: usize,
}

const ANSWER: &str = "I am a large language model from Alibaba Cloud, and my name is Qwen.";

fn json_response(
    status: StatusCode,
    v: serde_json::Value,
) -> Response<http_body_util::combinators::BoxBody<Bytes, Infallible>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .expect("static response parts")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let expected = std::env::var(&args.key_env)
        .map_err(|_| anyhow::anyhow!("set {} to the expected API key", args.key_env))?;
    let certs = llm_egress_mesh::tls::load_certs(&args.cert)?;
    let key = llm_egress_mesh::tls::load_key(&args.key)?;
    let mut cfg =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let log = match &args.log {
        Some(p) => Some(Arc::new(Mutex::new(
            std::fs::OpenOptions::new().create(true).append(true).open(p)?,
        ))),
        None => None,
    };
    let expected: Arc<str> = expected.into();
    let (chunks, delay) = (args.chunks, Duration::from_millis(args.chunk_delay_ms));
    let answer: Arc<str> = if args.answer_bytes > ANSWER.len() {
        format!("{ANSWER}{}", " ".repeat(args.answer_bytes - ANSWER.len())).into()
    } else {
        ANSWER.into()
    };
    println!("listening");
    loop {
        let (tcp, _) = listener.accept().await?;
        let (acceptor, log, expected, answer) =
            (acceptor.clone(), log.clone(), expected.clone(), answer.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (log, expected, answer) = (log.clone(), expected.clone(), answer.clone());
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
                    let auth = parts
                        .headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    let authorized = auth == format!("Bearer {expected}");
                    let mut headers = serde_json::Map::new();
                    for (k, v) in &parts.headers {
                        if k != "authorization" {
                            headers.insert(k.to_string(), v.to_str().unwrap_or("?").into());
                        }
                    }
                    let record = serde_json::json!({
                        "method": parts.method.as_str(),
                        "path": parts.uri.path(),
                        "authorized": authorized,
                        "authorizationCount": parts.headers.get_all("authorization").iter().count(),
                        "headers": headers,
                        "body": json,
                    });
                    if let Some(log) = &log {
                        if let Ok(mut f) = log.lock() {
                            let _ = writeln!(f, "{record}");
                        }
                    }
                    if !authorized {
                        return Ok::<_, Infallible>(json_response(
                            StatusCode::UNAUTHORIZED,
                            serde_json::json!({"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}),
                        ));
                    }
                    let Some(req) = json else {
                        return Ok(json_response(
                            StatusCode::BAD_REQUEST,
                            serde_json::json!({"error": {"message": "body is not JSON"}}),
                        ));
                    };
                    let model = req["model"].as_str().unwrap_or("unknown").to_string();
                    if req["stream"].as_bool() == Some(true) {
                        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
                        tokio::spawn(async move {
                            for i in 0..chunks {
                                let chunk = serde_json::json!({"object": "chat.completion.chunk", "model": model, "choices": [{"index": 0, "delta": {"content": format!("part{i} ")}}]});
                                if tx
                                    .send(Ok(Frame::data(Bytes::from(format!("data: {chunk}\n\n")))))
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                                tokio::time::sleep(delay).await;
                            }
                            let last = serde_json::json!({"object": "chat.completion.chunk", "model": model, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": chunks, "total_tokens": 3 + chunks}});
                            let _ = tx
                                .send(Ok(Frame::data(Bytes::from(format!(
                                    "data: {last}\n\ndata: [DONE]\n\n"
                                )))))
                                .await;
                        });
                        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
                        let resp = Response::builder()
                            .header("content-type", "text/event-stream")
                            .body(StreamBody::new(stream).boxed())
                            .expect("static response parts");
                        return Ok(resp);
                    }
                    Ok(json_response(
                        StatusCode::OK,
                        serde_json::json!({
                            "choices": [{"message": {"role": "assistant", "content": &*answer}, "finish_reason": "stop", "index": 0, "logprobs": null}],
                            "object": "chat.completion",
                            "usage": {"prompt_tokens": 3, "completion_tokens": 72, "total_tokens": 75},
                            "created": 1720680044,
                            "system_fingerprint": null,
                            "model": model,
                            "id": "chatcmpl-test"
                        }),
                    ))
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

//! An OpenAI-compatible HTTPS provider for tests and the demo, as strict
//! as a real one: it serves only the paths an OpenAI-compatible provider
//! serves, under `/compatible-mode/v1` (DashScope's base) and `/v1` — chat
//! completions, completions, embeddings, responses (JSON, or SSE when
//! `stream` is true), models — and answers `404` to anything else. Streams
//! carry a usage chunk only when `stream_options.include_usage` asks for
//! it. Completions stop at the request's `max_tokens`
//! (`max_completion_tokens`, `max_output_tokens`) as a real provider's do.
//! It answers only requests carrying `Authorization: Bearer <key>`,
//! and appends one JSON line per request to `--log`: what it saw, with the
//! key checked, never written.

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
    /// Answer every request with this HTTP status (503, 429...), as a failing provider does.
    #[arg(long)]
    fail_status: Option<u16>,
    /// With --fail-status: send Retry-After with this many seconds.
    #[arg(long)]
    retry_after: Option<u64>,
    /// End streamed answers after this many events, without [DONE].
    #[arg(long)]
    break_stream_after: Option<usize>,
    /// Also serve the API over plain HTTP here (a provider's port 80).
    #[arg(long)]
    plain_listen: Option<SocketAddr>,
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
    /// Keep no request log, even with --log (the benchmark's fast provider).
    #[arg(long)]
    no_log: bool,
    /// Runtime worker threads (default: one per CPU).
    #[arg(long)]
    workers: Option<usize>,
    /// Number of SSE chunks in a streamed answer.
    #[arg(long, default_value_t = 5)]
    chunks: usize,
    /// Delay between SSE chunks, in milliseconds.
    #[arg(long, default_value_t = 200)]
    chunk_delay_ms: u64,
    /// Delay before a streamed answer's first chunk, in milliseconds (time to first token).
    #[arg(long, default_value_t = 0)]
    first_chunk_delay_ms: u64,
    /// Pad the answer's content to this many bytes (0: the seed's answer).
    #[arg(long, default_value_t = 0)]
    answer_bytes: usize,
    /// Generate past the request's max_tokens, as a misbehaving provider would.
    #[arg(long)]
    ignore_max_tokens: bool,
}

type Resp = Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>;

/// What every answer needs from the command line.
struct Served {
    /// Answer every request with this status (a failing provider).
    fail_status: Option<StatusCode>,
    retry_after: Option<u64>,
    /// End a streamed answer after this many events (a provider dying mid-answer).
    break_stream_after: Option<usize>,
    chunks: usize,
    delay: Duration,
    first_delay: Duration,
    answer: Arc<str>,
    ignore_max_tokens: bool,
}

/// The usage a provider reports for this answer.
const PROMPT_TOKENS: u64 = 3;

/// Completion tokens of an answer: one per streamed chunk (72 for a JSON
/// chat answer, 9 for a response), capped by the request's limit as a real
/// provider caps it (unless told to ignore it); and whether it was capped.
fn completion_tokens(req: &serde_json::Value, natural: u64, s: &Served) -> (u64, bool) {
    let cap = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
        .iter()
        .filter_map(|f| req[*f].as_u64())
        .min()
        .filter(|_| !s.ignore_max_tokens);
    match cap {
        Some(c) if c < natural => (c, true),
        _ => (natural, false),
    }
}

/// What an answer to `req` at `rel` reports as total tokens, if it reports usage.
fn reported_tokens(rel: &str, req: &serde_json::Value, s: &Served) -> Option<u64> {
    let streamed = req["stream"].as_bool() == Some(true);
    let natural = match rel {
        _ if streamed => s.chunks as u64,
        "/chat/completions" | "/completions" => 72,
        "/responses" => 9,
        _ => return None,
    };
    Some(PROMPT_TOKENS + completion_tokens(req, natural, s).0)
}

/// The events a provider that breaks off mid-answer gets out.
fn truncated(mut events: Vec<String>, s: &Served) -> Vec<String> {
    if let Some(n) = s.break_stream_after {
        events.truncate(n);
    }
    events
}

fn sse(events: Vec<String>, first_delay: Duration, delay: Duration) -> Resp {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    tokio::spawn(async move {
        tokio::time::sleep(first_delay).await;
        let n = events.len();
        for (i, e) in events.into_iter().enumerate() {
            if tx.send(Ok(Frame::data(Bytes::from(e)))).await.is_err() {
                return;
            }
            if i + 1 < n {
                tokio::time::sleep(delay).await;
            }
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed())
        .expect("static response parts")
}

fn not_found(method: &str, path: &str) -> Resp {
    json_response(
        StatusCode::NOT_FOUND,
        serde_json::json!({"error": {"message": format!("Unknown request URL: {method} {path}. Please check the URL for typos, or see the docs at https://platform.openai.com/docs/api-reference/."), "type": "invalid_request_error", "param": null, "code": "unknown_url"}}),
    )
}

/// Chat completions and text completions, JSON or streamed.
fn completion(req: &serde_json::Value, chat: bool, s: &Served) -> Resp {
    let model = req["model"].as_str().unwrap_or("unknown").to_string();
    if req["stream"].as_bool() == Some(true) {
        let (chunks, capped) = completion_tokens(req, s.chunks as u64, s);
        let usage_asked = req["stream_options"]["include_usage"].as_bool() == Some(true);
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut events: Vec<String> = (0..chunks)
            .map(|i| {
                let finish = (capped && i + 1 == chunks).then_some("length");
                let choice = if chat {
                    serde_json::json!({"index": 0, "delta": {"content": format!("part{i} ")}, "finish_reason": finish})
                } else {
                    serde_json::json!({"index": 0, "text": format!("part{i} "), "finish_reason": finish})
                };
                let mut c = serde_json::json!({"id": "cmpl-test", "object": object, "created": 1720680044, "model": model, "choices": [choice]});
                if usage_asked {
                    c["usage"] = serde_json::Value::Null;
                }
                format!("data: {c}\n\n")
            })
            .collect();
        if usage_asked {
            let last = serde_json::json!({"id": "cmpl-test", "object": object, "created": 1720680044, "model": model, "choices": [], "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": chunks, "total_tokens": PROMPT_TOKENS + chunks}});
            events.push(format!("data: {last}\n\n"));
        }
        events.push("data: [DONE]\n\n".into());
        return sse(truncated(events, s), s.first_delay, s.delay);
    }
    let (completion, _) = completion_tokens(req, 72, s);
    let usage = serde_json::json!({"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion, "total_tokens": PROMPT_TOKENS + completion});
    if chat {
        json_response(
            StatusCode::OK,
            serde_json::json!({
                "choices": [{"message": {"role": "assistant", "content": &*s.answer}, "finish_reason": "stop", "index": 0, "logprobs": null}],
                "object": "chat.completion",
                "usage": usage,
                "created": 1720680044,
                "system_fingerprint": null,
                "model": model,
                "id": "chatcmpl-test"
            }),
        )
    } else {
        json_response(
            StatusCode::OK,
            serde_json::json!({"id": "cmpl-test", "object": "text_completion", "created": 1720680044, "model": model, "choices": [{"text": &*s.answer, "index": 0, "logprobs": null, "finish_reason": "stop"}], "usage": usage}),
        )
    }
}

fn embeddings(req: &serde_json::Value) -> Resp {
    let inputs = match &req["input"] {
        serde_json::Value::Array(a) => a.len(),
        _ => 1,
    };
    let data: Vec<serde_json::Value> = (0..inputs)
        .map(|i| serde_json::json!({"object": "embedding", "index": i, "embedding": [0.1, -0.2, 0.3, 0.05]}))
        .collect();
    let tokens = 2 * inputs as u64;
    json_response(
        StatusCode::OK,
        serde_json::json!({"object": "list", "data": data, "model": req["model"], "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
    )
}

const MODELS: [&str; 2] = ["qwen1.5-72b-chat", "text-embedding-v3"];

fn model(id: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "object": "model", "created": 1720680044, "owned_by": "system"})
}

fn response_object(model: &str, text: &str, status: &str, output_tokens: u64) -> serde_json::Value {
    let output = if status == "completed" {
        serde_json::json!([{"type": "message", "id": "msg_test", "status": "completed", "role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": []}]}])
    } else {
        serde_json::json!([])
    };
    let usage = if status == "completed" {
        serde_json::json!({"input_tokens": PROMPT_TOKENS, "input_tokens_details": {"cached_tokens": 1}, "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": PROMPT_TOKENS + output_tokens})
    } else {
        serde_json::Value::Null
    };
    serde_json::json!({"id": "resp_test", "object": "response", "created_at": 1720680044, "status": status, "model": model, "output": output, "parallel_tool_calls": true, "tool_choice": "auto", "tools": [], "usage": usage})
}

/// The Responses API, JSON or streamed (its own event types).
fn responses(req: &serde_json::Value, s: &Served) -> Resp {
    let model = req["model"].as_str().unwrap_or("unknown").to_string();
    if req["stream"].as_bool() != Some(true) {
        let (output, _) = completion_tokens(req, 9, s);
        return json_response(
            StatusCode::OK,
            response_object(&model, &s.answer, "completed", output),
        );
    }
    let (chunks, _) = completion_tokens(req, s.chunks as u64, s);
    let mut seq = 0;
    let mut event = |kind: &str, mut v: serde_json::Value| {
        v["type"] = kind.into();
        v["sequence_number"] = seq.into();
        seq += 1;
        format!("event: {kind}\ndata: {v}\n\n")
    };
    let mut events = vec![event(
        "response.created",
        serde_json::json!({"response": response_object(&model, "", "in_progress", 0)}),
    )];
    let mut text = String::new();
    for i in 0..chunks {
        let delta = format!("part{i} ");
        text.push_str(&delta);
        events.push(event(
            "response.output_text.delta",
            serde_json::json!({"item_id": "msg_test", "output_index": 0, "content_index": 0, "delta": delta, "logprobs": []}),
        ));
    }
    events.push(event(
        "response.completed",
        serde_json::json!({"response": response_object(&model, &text, "completed", chunks)}),
    ));
    sse(truncated(events, s), s.first_delay, s.delay)
}

/// Routes a request as an OpenAI-compatible provider would.
fn answer(
    method: &str,
    path: &str,
    content_type: &str,
    body: Option<&serde_json::Value>,
    raw_len: usize,
    s: &Served,
) -> Resp {
    let Some(rel) = path
        .strip_prefix("/compatible-mode/v1")
        .or_else(|| path.strip_prefix("/v1"))
    else {
        return not_found(method, path);
    };
    let need_body = |f: &dyn Fn(&serde_json::Value) -> Resp| match body {
        Some(b) if b.is_object() => f(b),
        _ => json_response(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": {"message": "We could not parse the JSON body of your request.", "type": "invalid_request_error", "param": null, "code": null}}),
        ),
    };
    match (method, rel) {
        ("POST", "/chat/completions") => need_body(&|b| completion(b, true, s)),
        ("POST", "/completions") => need_body(&|b| completion(b, false, s)),
        ("POST", "/embeddings") => need_body(&embeddings),
        ("POST", "/responses") => need_body(&|b| responses(b, s)),
        // Multipart uploads: a transcription of whatever was sent.
        ("POST", "/audio/transcriptions" | "/audio/translations") => {
            if !content_type.starts_with("multipart/form-data") {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": {"message": "expected multipart/form-data", "type": "invalid_request_error"}}),
                );
            }
            json_response(
                StatusCode::OK,
                serde_json::json!({"text": format!("{raw_len} bytes heard")}),
            )
        }
        ("GET", "/models") => json_response(
            StatusCode::OK,
            serde_json::json!({"object": "list", "data": MODELS.iter().map(|m| model(m)).collect::<Vec<_>>()}),
        ),
        ("GET", m) if m.strip_prefix("/models/").is_some_and(|id| MODELS.contains(&id)) => {
            json_response(StatusCode::OK, model(&m["/models/".len()..]))
        }
        _ => not_found(method, path),
    }
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

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.workers.filter(|n| *n > 0) {
        runtime.worker_threads(n);
    }
    runtime.enable_all().build()?.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let expected = std::env::var(&args.key_env)
        .map_err(|_| anyhow::anyhow!("set {} to the expected API key", args.key_env))?;
    let acceptor = llm_egress_tests::gateway_lab::tls_acceptor(&args.cert, &args.key)?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let log = match args.log.as_ref().filter(|_| !args.no_log) {
        Some(p) => Some(Arc::new(Mutex::new(
            std::fs::OpenOptions::new().create(true).append(true).open(p)?,
        ))),
        None => None,
    };
    let expected: Arc<str> = expected.into();
    let served = Arc::new(Served {
        fail_status: args.fail_status.map(StatusCode::from_u16).transpose()?,
        retry_after: args.retry_after,
        break_stream_after: args.break_stream_after,
        chunks: args.chunks,
        delay: Duration::from_millis(args.chunk_delay_ms),
        first_delay: Duration::from_millis(args.first_chunk_delay_ms),
        answer: if args.answer_bytes > ANSWER.len() {
            format!("{ANSWER}{}", " ".repeat(args.answer_bytes - ANSWER.len())).into()
        } else {
            ANSWER.into()
        },
        ignore_max_tokens: args.ignore_max_tokens,
    });
    if let Some(plain) = args.plain_listen {
        // Port 80 of a real provider: the same API over plain HTTP, so a
        // connection that bypasses the gateway is seen for what it is (no key).
        let listener = tokio::net::TcpListener::bind(plain).await?;
        let (log, expected, served) = (log.clone(), expected.clone(), served.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let svc = service(log.clone(), expected.clone(), served.clone());
                tokio::spawn(async move {
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
    }
    println!("listening");
    loop {
        let (tcp, _) = listener.accept().await?;
        let svc = service(log.clone(), expected.clone(), served.clone());
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

type RequestLog = Option<Arc<Mutex<std::fs::File>>>;

/// One connection's request handler: checks the key, logs, answers.
fn service(
    log: RequestLog,
    expected: Arc<str>,
    served: Arc<Served>,
) -> impl hyper::service::Service<
    Request<hyper::body::Incoming>,
    Response = Resp,
    Error = Infallible,
    Future: Send,
> + Clone
       + Send {
    service_fn(move |req: Request<hyper::body::Incoming>| {
        let (log, expected, served) = (log.clone(), expected.clone(), served.clone());
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
            if let Some(log) = &log {
                let mut headers = serde_json::Map::new();
                for (k, v) in &parts.headers {
                    if k != "authorization" {
                        headers.insert(k.to_string(), v.to_str().unwrap_or("?").into());
                    }
                }
                let record = serde_json::json!({
                    "method": parts.method.as_str(),
                    "path": parts.uri.path(),
                    "query": parts.uri.query(),
                    "authorized": authorized,
                    "authorizationCount": parts.headers.get_all("authorization").iter().count(),
                    "headers": headers,
                    "bodyBytes": body.len(),
                    // What the answer will report as usage (prompt + completion).
                    "reportedTokens": json.as_ref().filter(|_| authorized && served.fail_status.is_none()).and_then(|j| {
                        let rel = parts.uri.path().strip_prefix("/compatible-mode/v1").or_else(|| parts.uri.path().strip_prefix("/v1"))?;
                        reported_tokens(rel, j, &served)
                    }),
                    "body": json,
                });
                if let Ok(mut f) = log.lock() {
                    let _ = writeln!(f, "{record}");
                }
            }
            if let Some(status) = served.fail_status {
                // The error bodies OpenAI-compatible providers send.
                let (kind, message) = if status == StatusCode::TOO_MANY_REQUESTS {
                    ("rate_limit_exceeded", "Rate limit reached for requests")
                } else {
                    (
                        "server_error",
                        "The server had an error while processing your request.",
                    )
                };
                let mut resp = json_response(
                    status,
                    serde_json::json!({"error": {"message": message, "type": kind, "code": kind}}),
                );
                if let Some(secs) = served.retry_after {
                    resp.headers_mut().insert("retry-after", secs.into());
                }
                return Ok::<_, Infallible>(resp);
            }
            if !authorized {
                return Ok::<_, Infallible>(json_response(
                    StatusCode::UNAUTHORIZED,
                    serde_json::json!({"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}),
                ));
            }
            let content_type = parts
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            Ok(answer(
                parts.method.as_str(),
                parts.uri.path(),
                content_type,
                json.as_ref(),
                body.len(),
                &served,
            ))
        }
    })
}

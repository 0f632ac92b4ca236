//! The OpenAI API as clients use it, through the tunnel to a real gateway
//! and a strict OpenAI-compatible provider (404 for any path a real one
//! does not serve, usage in streams only when asked): every endpoint goes
//! to its own path under the provider's base, streamed usage is always
//! counted and never shown unasked. Needs root (the provider listens on 443).

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, StatusCode};
use llm_egress_tests::gateway_lab::*;
use serde_json::Value;

/// One request through the tunnel as `default/sleep`: (status, body).
async fn call(lab: &GatewayLab, method: Method, path: &str, body: Option<Value>) -> (StatusCode, String) {
    let client = lab.tunnel_client("agent");
    let stream = client
        .connect(&format!("{}:80", lab.ip), &identity("default", "sleep"))
        .await
        .expect("tunnel stream");
    let mut http = http_over(stream).await;
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", PROVIDER_HOST)
        // What an SDK with a placeholder key sends.
        .header("authorization", "Bearer placeholder");
    let body = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            Bytes::from(b.to_string())
        }
        None => Bytes::new(),
    };
    let resp = http
        .send_request(req.body(Full::new(body)).unwrap())
        .await
        .expect("response");
    let status = resp.status();
    (status, body_text(resp).await)
}

/// The JSON objects of an SSE body's `data:` lines (not `[DONE]`).
fn sse_events(body: &str) -> Vec<Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("JSON event"))
        .collect()
}

fn last_request(lab: &GatewayLab) -> Value {
    lab.provider_requests()
        .last()
        .cloned()
        .expect("the provider saw a request")
}

#[tokio::test(flavor = "multi_thread")]
async fn every_endpoint_reaches_its_own_provider_path_with_the_key() {
    let lab = GatewayLab::new();
    let base = "/compatible-mode/v1";
    let chat = serde_json::json!({"model": "qwen-max", "messages": [{"role": "user", "content": "hi"}]});
    for (method, client_path, body, provider_path, check) in [
        (
            Method::POST,
            format!("{base}/chat/completions"),
            Some(chat.clone()),
            "/chat/completions",
            "choices",
        ),
        (
            Method::POST,
            "/v1/chat/completions".to_string(),
            Some(chat.clone()),
            "/chat/completions",
            "choices",
        ),
        (
            Method::POST,
            format!("{base}/completions"),
            Some(serde_json::json!({"model": "qwen-max", "prompt": "hi"})),
            "/completions",
            "text_completion",
        ),
        (
            Method::POST,
            format!("{base}/embeddings"),
            Some(serde_json::json!({"model": "text-embedding-v3", "input": ["a", "b"]})),
            "/embeddings",
            "embedding",
        ),
        (
            Method::POST,
            format!("{base}/responses"),
            Some(serde_json::json!({"model": "qwen-max", "input": "hi"})),
            "/responses",
            "output_text",
        ),
        (
            Method::GET,
            format!("{base}/models"),
            None,
            "/models",
            "qwen1.5-72b-chat",
        ),
        (
            Method::GET,
            "/v1/models/text-embedding-v3".to_string(),
            None,
            "/models/text-embedding-v3",
            "\"model\"",
        ),
    ] {
        let (status, answer) = call(&lab, method.clone(), &client_path, body).await;
        assert_eq!(status, StatusCode::OK, "{method} {client_path}: {answer}");
        assert!(answer.contains(check), "{method} {client_path}: {answer}");
        let seen = last_request(&lab);
        assert_eq!(
            seen["path"],
            format!("{base}{provider_path}"),
            "{method} {client_path}"
        );
        assert_eq!(seen["method"], method.as_str());
        assert_eq!(seen["authorized"], true, "{client_path}: the gateway's key");
        assert_eq!(
            seen["authorizationCount"], 1,
            "{client_path}: one key, the client's dropped"
        );
    }
    // The chat model is the client's; the provider's fills in only where
    // the body has none (chat), and is never forced on other endpoints.
    let seen: Vec<Value> = lab.provider_requests();
    assert_eq!(seen[0]["body"]["model"], "qwen-max");
    let (_, _) = call(&lab, Method::POST, "/", Some(serde_json::json!({"messages": []}))).await;
    assert_eq!(last_request(&lab)["body"]["model"], "qwen1.5-72b-chat");
    let (_, _) = call(
        &lab,
        Method::POST,
        &format!("{base}/embeddings"),
        Some(serde_json::json!({"input": "x"})),
    )
    .await;
    assert!(last_request(&lab)["body"].get("model").is_none());

    // A query string reaches the provider.
    let (status, _) = call(
        &lab,
        Method::GET,
        &format!("{base}/models?limit=1&order=asc"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(last_request(&lab)["query"], "limit=1&order=asc");

    // An unknown path: 404 in OpenAI's error shape, naming what is served;
    // the provider never sees it.
    let before = lab.provider_requests().len();
    let (status, answer) = call(
        &lab,
        Method::POST,
        &format!("{base}/fine_tuning/jobs"),
        Some(serde_json::json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    let err: Value = serde_json::from_str(&answer).expect("a JSON error");
    let message = err["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("POST /embeddings") && message.contains("GET /models"),
        "{message}"
    );
    let (status, _) = call(&lab, Method::GET, &format!("{base}/embeddings"), None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(lab.provider_requests().len(), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_usage_is_always_counted_and_shown_only_when_asked() {
    let mut lab = GatewayLab::new();
    // A provider that takes 300 ms to its first streamed token.
    lab.stop_provider();
    lab.provider_args = vec!["--first-chunk-delay-ms".into(), "300".into()];
    lab.start_provider();
    // Token usage summed over operations, as GenAI histograms report it.
    let tokens = |m: &str, kind: &str| -> u64 {
        let kind = if kind == "prompt" { "input" } else { "output" };
        m.lines()
            .filter(|l| {
                l.starts_with("gen_ai_client_token_usage_sum{")
                    && l.contains("principal=\"cluster.local/ns/default/sa/sleep\"")
                    && l.contains("gen_ai_request_model=\"qwen-max\"")
                    && l.contains(&format!("gen_ai_token_type=\"{kind}\""))
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    // Not asked: the provider is asked, the client sees no usage chunk.
    let (status, body) = call(
        &lab,
        Method::POST,
        "/compatible-mode/v1/chat/completions",
        Some(serde_json::json!({"model": "qwen-max", "stream": true, "messages": [{"role": "user", "content": "count"}]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let seen = last_request(&lab);
    assert_eq!(seen["body"]["stream_options"]["include_usage"], true);
    let events = sse_events(&body);
    assert_eq!(events.len(), 5, "{body}");
    assert!(
        events
            .iter()
            .all(|e| !e["choices"].as_array().unwrap().is_empty()),
        "a usage-only chunk reached a client that did not ask: {body}"
    );
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    let m = lab.admin_get("/metrics").await;
    assert_eq!((tokens(&m, "prompt"), tokens(&m, "completion")), (3, 5), "{m}");

    // Asked: the usage chunk arrives unchanged, and is counted once more.
    let (_, body) = call(
        &lab,
        Method::POST,
        "/v1/chat/completions",
        Some(serde_json::json!({"model": "qwen-max", "stream": true, "stream_options": {"include_usage": true}, "messages": []})),
    )
    .await;
    let events = sse_events(&body);
    let last = events.last().unwrap();
    assert_eq!(last["choices"], serde_json::json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 5);
    let m = lab.admin_get("/metrics").await;
    assert_eq!((tokens(&m, "prompt"), tokens(&m, "completion")), (6, 10));

    // Text completions stream usage the same way; the Responses API's
    // usage (input/output tokens) is counted from its final event.
    let (_, body) = call(
        &lab,
        Method::POST,
        "/v1/completions",
        Some(serde_json::json!({"model": "qwen-max", "prompt": "x", "stream": true})),
    )
    .await;
    assert!(
        sse_events(&body)
            .iter()
            .all(|e| e.get("usage").is_none_or(|u| u.is_null())),
        "{body}"
    );
    let (_, body) = call(
        &lab,
        Method::POST,
        "/v1/responses",
        Some(serde_json::json!({"model": "qwen-max", "input": "x", "stream": true})),
    )
    .await;
    assert!(body.contains("response.completed"), "{body}");
    let m = lab.admin_get("/metrics").await;
    assert_eq!(
        (tokens(&m, "prompt"), tokens(&m, "completion")),
        (12, 20),
        "completions (3 + 5) and responses (3 + 5) counted: {m}"
    );

    // GenAI telemetry, per operation, model and principal: two chat
    // streams with 5 output tokens each; time to first token at least the
    // provider's 300 ms (no observation in the 0.25 s bucket).
    let chat = [
        ("gen_ai_operation_name", "chat"),
        ("gen_ai_request_model", "qwen-max"),
        ("gen_ai_response_model", "qwen-max"),
        ("principal", "cluster.local/ns/default/sa/sleep"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| -> Vec<(&str, &str)> {
        chat.iter().copied().chain(extra.iter().copied()).collect()
    };
    for (series, extra, want) in [
        (
            "gen_ai_client_token_usage_count",
            &[("gen_ai_token_type", "output")][..],
            2.0,
        ),
        (
            "gen_ai_client_token_usage_sum",
            &[("gen_ai_token_type", "output")][..],
            10.0,
        ),
        (
            "gen_ai_client_token_usage_sum",
            &[("gen_ai_token_type", "input")][..],
            6.0,
        ),
        ("gen_ai_server_time_to_first_token_seconds_count", &[][..], 2.0),
        (
            "gen_ai_server_time_to_first_token_seconds_bucket",
            &[("le", "0.25")][..],
            0.0,
        ),
        ("gen_ai_server_time_per_output_token_seconds_count", &[][..], 2.0),
        (
            "gen_ai_server_request_duration_seconds_count",
            &[("error_type", "")][..],
            2.0,
        ),
    ] {
        assert_eq!(
            series_value(&m, series, &with(extra)),
            Some(want),
            "{series} {extra:?}: {m}"
        );
    }
    assert!(series_value(&m, "gen_ai_server_time_to_first_token_seconds_sum", &chat).unwrap() >= 0.6);
    let responses = [
        ("gen_ai_operation_name", "generate_content"),
        ("gen_ai_token_type", "output"),
    ];
    assert_eq!(
        series_value(&m, "gen_ai_client_token_usage_sum", &responses),
        Some(5.0),
        "{m}"
    );
    // The access log carries the operation and the time to first token.
    let logs = lab.gateway_logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("\"operation\":\"chat\"") && l.contains("\"ttft_ms\":")),
        "{logs}"
    );
}

/// Uploads (multipart: audio, files) stream through to the provider's
/// endpoint, beyond the JSON body limit and without the gateway holding
/// them whole.
#[tokio::test(flavor = "multi_thread")]
async fn uploads_stream_through_unbuffered() {
    let lab = GatewayLab::new();
    let client = lab.tunnel_client("agent");
    let stream = client
        .connect(&format!("{}:80", lab.ip), &identity("default", "sleep"))
        .await
        .expect("tunnel stream");
    let mut http = http_over(stream).await;
    let boundary = "llm-egress-test-boundary";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n"
    )
    .into_bytes();
    body.extend(std::iter::repeat_n(0x55u8, 48 << 20));
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let len = body.len();
    let baseline = lab.gateway_rss_kib();
    let req = Request::post("/v1/audio/transcriptions")
        .header("host", PROVIDER_HOST)
        .header("authorization", "Bearer placeholder")
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = http.send_request(req).await.expect("response");
    let status = resp.status();
    let answer = body_text(resp).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer, format!("{{\"text\":\"{len} bytes heard\"}}"));
    let seen = last_request(&lab);
    assert_eq!(seen["path"], "/compatible-mode/v1/audio/transcriptions");
    assert_eq!(seen["bodyBytes"], len);
    assert_eq!(seen["authorized"], true);
    assert!(seen["headers"]["content-type"]
        .as_str()
        .unwrap()
        .starts_with("multipart/form-data; boundary="));
    let grown = lab.gateway_rss_kib().saturating_sub(baseline);
    assert!(
        grown < 24 * 1024,
        "the gateway grew by {grown} KiB for a 48 MiB upload: buffered"
    );
}

//! The egress gateway as a real process with real mTLS on loopback, in
//! front of a local OpenAI-compatible HTTPS provider that checks the key it
//! receives. Clients speak the agent's tunnel protocol (HTTP/2 CONNECT) or
//! the direct mTLS entry. Needs root (the provider listens on port 443).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use llm_egress_tests::gateway_lab::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ALLOW_ONLY_SLEEP: &str = "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: allow-sleep, namespace: istio-system}\nspec:\n  selector: {matchLabels: {istio: egressgateway}}\n  action: ALLOW\n  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/default/sa/sleep]}\n";

#[tokio::test(flavor = "multi_thread")]
async fn seed_request_through_the_tunnel_reaches_the_provider_adapted() {
    let lab = GatewayLab::new();
    let (status, body) = lab.seed_call("agent", &identity("default", "sleep")).await;
    assert_eq!(status, StatusCode::OK, "{body}\n{}", lab.gateway_logs());
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON completion");
    assert!(answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("Qwen"));
    assert_eq!(answer["model"], "qwen1.5-72b-chat");

    let seen = lab.provider_requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let r = &seen[0];
    assert_eq!(r["path"], "/compatible-mode/v1/chat/completions");
    assert_eq!(
        r["authorized"], true,
        "the provider did not get the gateway's key"
    );
    assert_eq!(r["authorizationCount"], 1);
    assert_eq!(r["body"]["model"], "qwen1.5-72b-chat");
    assert_eq!(r["body"]["stream"], false);
    assert_eq!(r["body"]["messages"][0]["content"], "Tell me about yourself");
    assert_eq!(r["headers"]["host"], PROVIDER_HOST);
    assert!(r["headers"].get("x-llm-egress-workload").is_none());

    let metrics = lab.admin_get("/metrics").await;
    assert!(
        metrics.contains("llm_egress_gateway_requests_total{principal=\"cluster.local/ns/default/sa/sleep\",host=\"dashscope.aliyuncs.com\",provider=\"istio-system/dashscope-qwen\",model=\"qwen1.5-72b-chat\",code=\"200\"} 1"),
        "{metrics}"
    );
    assert_eq!(
        series_value(
            &metrics,
            "gen_ai_client_token_usage_sum",
            &[
                ("principal", "cluster.local/ns/default/sa/sleep"),
                ("gen_ai_request_model", "qwen1.5-72b-chat"),
                ("gen_ai_token_type", "output")
            ]
        ),
        Some(72.0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn direct_mtls_entry_uses_the_certificate_identity() {
    let lab = GatewayLab::new();
    let files = lab.tls_files("workload-default-sleep");
    let cfg = llm_egress_mesh::tls::client_config(&files, &[b"http/1.1"]).unwrap();
    let tcp = tokio::net::TcpStream::connect(lab.direct_addr()).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (mut http, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = http.send_request(seed_request(SEED_BODY)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let metrics = lab.admin_get("/metrics").await;
    assert!(
        metrics.contains("principal=\"cluster.local/ns/default/sa/sleep\""),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn deny_policy_applied_while_running_answers_rbac_access_denied() {
    let lab = GatewayLab::new();
    let who = identity("default", "sleep");
    assert_eq!(lab.seed_call("agent", &who).await.0, StatusCode::OK);

    lab.apply(
        "authpolicy.yaml",
        &std::fs::read_to_string(examples_dir().join("authpolicy.yaml")).unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        let (s, b) = lab.seed_call("agent", &who).await;
        if s != StatusCode::OK || Instant::now() > deadline {
            break (s, b);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body, "RBAC: access denied");
    let before = lab.provider_requests().len();
    // Another service account is not matched by the seed's policy.
    assert_eq!(
        lab.seed_call("agent", &identity("default", "other")).await.0,
        StatusCode::OK
    );
    assert_eq!(lab.provider_requests().len(), before + 1);

    lab.remove("authpolicy.yaml");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, _) = lab.seed_call("agent", &who).await;
        if s == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "policy removal not applied");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = lab.admin_get("/metrics").await;
    assert!(
        metrics.contains("llm_egress_gateway_config_reloads_total{result=\"success\"} 2"),
        "{metrics}"
    );
    // Each reload's duration is recorded: two observations, each under
    // the 10 s bucket and above zero.
    assert!(
        metrics.contains("llm_egress_gateway_config_reload_duration_seconds_count 2"),
        "{metrics}"
    );
    let total: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("llm_egress_gateway_config_reload_duration_seconds_sum "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(total > 0.0 && total < 10.0, "reload time {total} s\n{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn identity_headers_count_only_from_agents_and_a_client_certificate_is_required() {
    let lab = GatewayLab::new();
    lab.apply("allow.yaml", ALLOW_ONLY_SLEEP);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sleep = identity("default", "sleep");
    // The agent may speak for default/sleep.
    assert_eq!(lab.seed_call("agent", &sleep).await.0, StatusCode::OK);
    // A workload certificate (default/other) claiming to be sleep is still other.
    let (status, body) = lab.seed_call("workload-default-other", &sleep).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::FORBIDDEN, "RBAC: access denied")
    );
    // The genuine sleep certificate, without headers, is sleep.
    assert_eq!(
        lab.seed_call("workload-default-sleep", &sleep).await.0,
        StatusCode::OK
    );

    // No client certificate: the handshake is refused.
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(llm_egress_mesh::tls::load_roots(&lab.certs().join("ca.pem")).unwrap())
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(lab.tunnel_addr()).await.unwrap();
    let refused = match tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
    {
        Err(_) => true,
        Ok(mut tls) => {
            let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            let mut buf = [0u8; 64];
            !matches!(tls.read(&mut buf).await, Ok(n) if n > 0)
        }
    };
    assert!(refused, "a connection without a client certificate was served");
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_completion_arrives_chunk_by_chunk() {
    let lab = GatewayLab::new();
    let started = Instant::now();
    let resp = stream_call(&lab).await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            arrivals.push(started.elapsed());
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    // The provider sends 5 chunks 200 ms apart: chunks must arrive as they
    // are sent, not all at once at the end.
    assert!(arrivals.len() >= 4, "{} frames: {text}", arrivals.len());
    let spread = *arrivals.last().unwrap() - arrivals[0];
    assert!(
        spread >= Duration::from_millis(600),
        "frames arrived together (spread {spread:?}): buffered"
    );
    assert!(text.contains("part0") && text.contains("part4") && text.contains("[DONE]"));
    // Usage from the final SSE chunk (asked for by the gateway), once the
    // access record is written.
    llm_egress_tests::process::eventually(
        "the stream's 5 output tokens counted",
        Duration::from_secs(5),
        || async {
            let metrics = lab.admin_get("/metrics").await;
            let output = series_value(
                &metrics,
                "gen_ai_client_token_usage_sum",
                &[("gen_ai_operation_name", "chat"), ("gen_ai_token_type", "output")],
            );
            if output == Some(5.0) {
                Ok(())
            } else {
                Err(metrics)
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_key_never_appears_in_logs_responses_or_metrics() {
    let mut lab = GatewayLab::new();
    let who = identity("default", "sleep");
    let mut responses = String::new();
    // Success, a client that sends its own key, a bad body, no route, denied, provider down.
    responses.push_str(&lab.seed_call("agent", &who).await.1);
    let client = lab.tunnel_client("agent");
    let mut http = http_over(client.connect(&format!("{}:80", lab.ip), &who).await.unwrap()).await;
    for (host, body, auth) in [
        (PROVIDER_HOST, SEED_BODY, "Bearer sk-pod-own-key"),
        (PROVIDER_HOST, "not json", ""),
        ("api.openai.com", SEED_BODY, ""),
    ] {
        let mut req = hyper::Request::post("/v1/chat/completions").header("host", host);
        if !auth.is_empty() {
            req = req.header("authorization", auth);
        }
        http.ready()
            .await
            .unwrap_or_else(|e| panic!("connection closed before {host} {body:?}: {e}"));
        let resp = http
            .send_request(req.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .unwrap();
        responses.push_str(&format!("{:?}", resp.headers()));
        responses.push_str(&body_text(resp).await);
    }
    let seen = lab.provider_requests();
    assert!(
        seen.iter().all(|r| r["authorized"] == true),
        "the pod's own key reached the provider: {seen:?}"
    );
    lab.apply(
        "authpolicy.yaml",
        &std::fs::read_to_string(examples_dir().join("authpolicy.yaml")).unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    responses.push_str(&lab.seed_call("agent", &who).await.1);
    lab.remove("authpolicy.yaml");
    lab.stop_provider();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) = lab.seed_call("agent", &who).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    responses.push_str(&body);
    let metrics = lab.admin_get("/metrics").await;
    let readyz = lab.admin_get("/readyz").await;
    assert!(
        metrics.contains("llm_egress_gateway_upstream_errors_total"),
        "{metrics}"
    );

    let logs = lab.gateway_logs();
    assert!(
        logs.contains("\"status\":403") && logs.contains("\"status\":503"),
        "access log incomplete:\n{logs}"
    );
    for (what, text) in [
        ("gateway log", &logs),
        ("responses", &responses),
        ("metrics", &metrics),
        ("readyz", &readyz),
        ("files", &read_all(lab.dir.path())),
    ] {
        assert!(!text.contains(&lab.api_key), "the API key appears in the {what}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_is_passed_through_by_sni_and_denied_by_an_l4_policy() {
    let lab = GatewayLab::new();
    let roots = llm_egress_mesh::tls::load_roots(&lab.certs().join("ca.pem")).unwrap();
    let tls_cfg = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let who = identity("default", "sleep");
    let https_call = || async {
        let client = lab.tunnel_client("agent");
        let stream = client.connect(&format!("{}:443", lab.ip), &who).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(tls_cfg.clone())
            .connect(PROVIDER_HOST.try_into().unwrap(), stream)
            .await?;
        let (mut http, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        let resp = http
            .send_request(seed_request(SEED_BODY))
            .await
            .map_err(std::io::Error::other)?;
        Ok::<_, std::io::Error>(resp.status())
    };
    // End-to-end TLS with the provider itself: the gateway cannot add the
    // key, so the provider refuses; what matters is that it was reached.
    assert_eq!(https_call().await.unwrap(), StatusCode::UNAUTHORIZED);
    assert_eq!(lab.provider_requests().len(), 1);

    lab.apply(
        "authpolicy.yaml",
        &std::fs::read_to_string(examples_dir().join("authpolicy.yaml")).unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        https_call().await.is_err(),
        "TLS to a denied host was passed through"
    );
    assert_eq!(lab.provider_requests().len(), 1);
    let metrics = lab.admin_get("/metrics").await;
    assert!(metrics.contains("llm_egress_gateway_passthrough_connections_total{principal=\"cluster.local/ns/default/sa/sleep\",sni=\"dashscope.aliyuncs.com\",decision=\"denied\"} 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_and_bad_config_changes_get_clear_answers() {
    let lab = GatewayLab::new();
    let who = identity("default", "sleep");
    let client = lab.tunnel_client("agent");
    let call = |host: &'static str, method: &'static str, body: Vec<u8>| {
        let client = &client;
        let who = &who;
        let ip = lab.ip;
        async move {
            let stream = client.connect(&format!("{ip}:80"), who).await.unwrap();
            let mut http = http_over(stream).await;
            let req = hyper::Request::builder()
                .method(method)
                .uri("/")
                .header("host", host)
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let resp = http.send_request(req).await.unwrap();
            let status = resp.status();
            (status, body_text(resp).await)
        }
    };
    let (s, b) = call(PROVIDER_HOST, "POST", b"not json".to_vec()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(b.contains("not JSON"), "{b}");
    let (s, b) = call(PROVIDER_HOST, "POST", b"[1]".to_vec()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(b.contains("JSON object"), "{b}");
    let (s, b) = call(PROVIDER_HOST, "POST", vec![b' '; 2 << 20]).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(b.contains("--max-request-body"), "{b}");
    let (s, b) = call(PROVIDER_HOST, "GET", vec![]).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert!(b.contains("POST"), "{b}");
    let (s, b) = call("api.openai.com", "POST", SEED_BODY.as_bytes().to_vec()).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(b.contains("no LLMRoute for host \"api.openai.com\""), "{b}");
    assert!(
        lab.provider_requests().is_empty(),
        "a bad request reached the provider"
    );

    // An invalid change is reported and the last good configuration serves.
    lab.apply("broken.yaml", "apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata: {name: broken}\nspec:\n  rules: []\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    let readyz = loop {
        let r = lab.admin_get("/readyz").await;
        if r.contains("last reload rejected") || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        readyz.contains("broken.yaml") && readyz.contains("LLMRoute default/broken"),
        "{readyz}"
    );
    let metrics = lab.admin_get("/metrics").await;
    assert!(
        metrics.contains("llm_egress_gateway_config_reloads_total{result=\"failure\"} 1"),
        "{metrics}"
    );
    let (s, _) = call(PROVIDER_HOST, "POST", SEED_BODY.as_bytes().to_vec()).await;
    assert_eq!(s, StatusCode::OK, "the last good configuration stopped serving");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_does_not_drop_a_request_in_flight() {
    let lab = GatewayLab::new();
    let resp = stream_call(&lab).await;
    // Mid-stream, a policy that denies this very principal arrives.
    lab.apply(
        "authpolicy.yaml",
        &std::fs::read_to_string(examples_dir().join("authpolicy.yaml")).unwrap(),
    );
    let text = body_text(resp).await;
    assert!(
        text.contains("part4") && text.contains("[DONE]"),
        "the stream was cut by the reload: {text}"
    );
    // New requests see the new policy.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) = lab.seed_call("agent", &identity("default", "sleep")).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::FORBIDDEN, "RBAC: access denied")
    );
}

#[test]
fn validate_checks_custom_policies_against_the_mesh_config() {
    let gateway = llm_egress_tests::env::gateway_bin();
    let example = examples_dir().join("ext-authz");
    let validate = |mesh: &std::path::Path| {
        let out = std::process::Command::new(&gateway)
            .arg("validate")
            .arg(example.join("policy"))
            .arg("--mesh-config")
            .arg(mesh)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, text) = validate(&example.join("mesh.yaml"));
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("1 policy(ies)"), "{text}");
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("mesh.yaml");
    std::fs::write(
        &other,
        "extensionProviders:\n- name: another\n  envoyExtAuthzHttp: {service: a.b, port: 80}\n",
    )
    .unwrap();
    let (code, text) = validate(&other);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("\"sample-ext-authz-http\" is not an extensionProviders entry"),
        "{text}"
    );
    // The failover example, beside the seed's provider and Gateway.
    let failover = tempfile::tempdir().unwrap();
    for f in [
        "dashscope-qwen.yaml",
        "egress-gw.yaml",
        "failover/route-with-fallback.yaml",
    ] {
        let from = examples_dir().join(f);
        std::fs::copy(&from, failover.path().join(from.file_name().unwrap())).unwrap();
    }
    let out = std::process::Command::new(&gateway)
        .arg("validate")
        .arg(failover.path())
        .env("API_KEY", "k")
        .env("OPENAI_API_KEY", "k")
        .output()
        .unwrap();
    let failover_text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && failover_text.contains("1 route(s), 2 provider(s)"),
        "{failover_text}"
    );
    // The budget example, and a broken budget named by its field.
    let budgets = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(examples_dir().join("budget/team-budgets.yaml")).unwrap();
    for (text, ok) in [
        (example.clone(), true),
        (example.replace("window: 1h", "window: 1 hour"), false),
    ] {
        std::fs::write(budgets.path().join("b.yaml"), text).unwrap();
        let out = std::process::Command::new(&gateway)
            .arg("validate")
            .arg(budgets.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if ok {
            assert!(
                out.status.success() && text.contains("2 token budget(s)"),
                "{text}"
            );
        } else {
            assert!(
                !out.status.success() && text.contains("LLMTokenBudget istio-system/team-a: spec.window"),
                "{text}"
            );
        }
    }
    std::fs::write(
        &other,
        "extensionProviders:\n- name: x\n  envoyExtAuthzHttp: {service: a.b, port: 0}\n",
    )
    .unwrap();
    let (code, text) = validate(&other);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("port must be a number"), "{text}");
}

#[test]
fn validate_prints_every_problem_and_exits_1() {
    let gateway = llm_egress_tests::env::gateway_bin();
    let out = std::process::Command::new(&gateway)
        .args(["validate"])
        .arg(examples_dir())
        .env("API_KEY", "k")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("ok: 1 gateway(s) select this gateway, 1 route(s), 1 provider(s), 1 policy(ies)"),
        "{text}"
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata: {name: r}\nspec:\n  host: ''\n  rules: []\n---\napiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: istio-system}\nspec:\n  action: BLOCK\n---\nkind: Widget\napiVersion: v1\nmetadata: {name: w}\n",
    )
    .unwrap();
    let out = std::process::Command::new(&gateway)
        .args(["validate"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("error: ")
            && text.contains("bad.yaml: LLMRoute default/r: spec.host: must not be empty"),
        "{text}"
    );
    assert!(
        text.contains("AuthorizationPolicy istio-system/p: spec.action"),
        "{text}"
    );
    assert!(
        text.contains("warning: ") && text.contains("unknown kind \"Widget\""),
        "{text}"
    );
    // Without the key in the environment the provider is an error too, naming the variable.
    let out = std::process::Command::new(&gateway)
        .args(["validate"])
        .arg(examples_dir())
        .env_remove("API_KEY")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("apiKey") && text.contains("API_KEY"), "{text}");
}

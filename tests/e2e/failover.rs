//! Failover between an LLMRoute's backends: a primary provider that answers
//! 503, refuses connections or answers 429 with Retry-After is replaced by
//! the fallback (priority 1) for that request; a failing primary is ejected
//! and comes back; an answer already streaming to the client is never
//! retried. Real gateway, two real providers on their own addresses.

use std::{path::PathBuf, time::Duration};

use hyper::StatusCode;
use llm_egress_mesh::{certs, identity::SpiffeId};
use llm_egress_tests::{
    env,
    gateway_lab::*,
    process::{eventually, Daemon, Place},
};

const FALLBACK: &str = "fallback.test";

const FALLBACK_PROVIDER: &str = r#"apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: fallback, namespace: istio-system}
spec:
  workloadSelector: {labels: {istio: egressgateway}}
  host: fallback.test
  path: /v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig: {model: fallback-model, stream: false, apiKey: "${API_KEY}"}
"#;

/// The seed's route with a fallback backend (priority 1).
fn route() -> String {
    std::fs::read_to_string(examples_dir().join("dashscope-route.yaml"))
        .unwrap()
        .replace(
            "    - providerHost: dashscope.aliyuncs.com",
            "    - providerHost: dashscope.aliyuncs.com\n    - providerHost: fallback.test\n      priority: 1",
        )
}

struct Fallback {
    _daemon: Daemon,
    dir: PathBuf,
}

impl Fallback {
    fn start(lab: &GatewayLab, ip: std::net::Ipv4Addr) -> Fallback {
        let dir = lab.dir.path().join("fallback");
        std::fs::create_dir_all(&dir).unwrap();
        let ca = certs::Pem {
            cert: std::fs::read_to_string(lab.certs().join("ca.pem")).unwrap(),
            key: std::fs::read_to_string(lab.certs().join("ca-key.pem")).unwrap(),
        };
        let pem = certs::issue(
            &ca,
            &SpiffeId::parse("spiffe://provider.test/fallback").unwrap(),
            &[FALLBACK.into()],
        )
        .unwrap();
        certs::write(&dir, "provider", &pem).unwrap();
        let daemon = spawn_provider(
            &Place::default(),
            &format!("{ip}:443"),
            &dir,
            &dir,
            &lab.api_key,
            &[],
        );
        Fallback { _daemon: daemon, dir }
    }

    fn requests(&self) -> usize {
        provider_requests(&self.dir).len()
    }
}

fn lab() -> (GatewayLab, Fallback) {
    let mut lab = GatewayLab::new();
    let ip = env::loopback_ip();
    let fallback = Fallback::start(&lab, ip);
    lab.extra_args.extend([
        "--resolve".into(),
        format!("{FALLBACK}={ip}"),
        "--outlier-failures".into(),
        "2".into(),
        "--outlier-ejection".into(),
        "3".into(),
    ]);
    lab.restart_gateway();
    // One file, one reload: the fallback provider and the route naming it.
    lab.apply(
        "dashscope-route.yaml",
        &format!("{FALLBACK_PROVIDER}---\n{}", route()),
    );
    (lab, fallback)
}

/// Waits until the route with its fallback is in force (a reload).
async fn until_route_applies(lab: &GatewayLab) {
    eventually(
        "the route with its fallback to load",
        Duration::from_secs(15),
        || async {
            let metrics = lab.admin_get("/metrics").await;
            let reloads = series_value(
                &metrics,
                "llm_egress_gateway_config_reloads_total",
                &[("result", "success")],
            );
            (reloads.unwrap_or(0.0) >= 1.0)
                .then_some(())
                .ok_or(format!("reloads: {reloads:?}"))
        },
    )
    .await;
}

fn restart_primary(lab: &mut GatewayLab, args: &[&str]) {
    lab.stop_provider();
    lab.provider_args = args.iter().map(|s| s.to_string()).collect();
    lab.start_provider();
}

async fn seed(lab: &GatewayLab) -> (StatusCode, String) {
    lab.seed_call("agent", &identity("default", "sleep")).await
}

/// Waits until the route with its fallback is in force.
async fn until_fallback_serves(lab: &GatewayLab, fallback: &Fallback) {
    eventually("the fallback to serve", Duration::from_secs(15), || async {
        let before = fallback.requests();
        let (s, b) = seed(lab).await;
        (s == StatusCode::OK && fallback.requests() > before)
            .then_some(())
            .ok_or(format!("{s} {b}"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_primary_is_replaced_by_the_fallback_ejected_and_restored() {
    let (mut lab, fallback) = lab();
    // 503 from the primary: the fallback answers that very request.
    restart_primary(&mut lab, &["--fail-status", "503"]);
    until_fallback_serves(&lab, &fallback).await;
    let (status, body) = seed(&lab).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("fallback-model"), "served by the fallback: {body}");

    // After two failures in a row the primary is ejected: not even tried.
    let primary_before = lab.provider_requests().len();
    for _ in 0..3 {
        assert_eq!(seed(&lab).await.0, StatusCode::OK);
    }
    assert_eq!(
        lab.provider_requests().len(),
        primary_before,
        "an ejected provider was tried"
    );
    let metrics = lab.admin_get("/metrics").await;
    assert!(
        series_value(
            &metrics,
            "llm_egress_gateway_backend_ejections_total",
            &[("provider", "istio-system/dashscope-qwen")]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{metrics}"
    );

    // Healthy again: it serves once its ejection is over.
    restart_primary(&mut lab, &[]);
    eventually(
        "the primary restored after its ejection",
        Duration::from_secs(15),
        || async {
            let (s, b) = seed(&lab).await;
            (s == StatusCode::OK && b.contains("qwen1.5-72b-chat"))
                .then_some(())
                .ok_or(format!("{s} {b}"))
        },
    )
    .await;

    // Refusing connections: the fallback answers.
    lab.stop_provider();
    let (status, body) = seed(&lab).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("fallback-model"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_429_with_retry_after_moves_to_the_fallback_for_that_long() {
    let (mut lab, fallback) = lab();
    restart_primary(&mut lab, &["--fail-status", "429", "--retry-after", "60"]);
    until_fallback_serves(&lab, &fallback).await;
    // Ejected at once for Retry-After (60 s), whatever --outlier-failures says.
    let primary_before = lab.provider_requests().len();
    for _ in 0..3 {
        let (s, b) = seed(&lab).await;
        assert_eq!(s, StatusCode::OK, "{b}");
    }
    assert_eq!(
        lab.provider_requests().len(),
        primary_before,
        "the primary was tried within its Retry-After"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_that_breaks_after_its_first_bytes_is_not_retried() {
    let (mut lab, fallback) = lab();
    until_route_applies(&lab).await;
    restart_primary(&mut lab, &["--break-stream-after", "1", "--chunk-delay-ms", "10"]);
    // The primary serving again (whole non-streamed answers).
    eventually("the primary to serve", Duration::from_secs(15), || async {
        let (s, b) = seed(&lab).await;
        (s == StatusCode::OK && b.contains("qwen1.5-72b-chat"))
            .then_some(())
            .ok_or(format!("{s} {b}"))
    })
    .await;
    let before = fallback.requests();
    let resp = stream_call(&lab).await;
    let body = body_text(resp).await;
    assert!(
        body.contains("part0") && !body.contains("[DONE]"),
        "the broken answer as it came: {body}"
    );
    assert_eq!(
        fallback.requests(),
        before,
        "bytes had reached the client: no retry"
    );
}

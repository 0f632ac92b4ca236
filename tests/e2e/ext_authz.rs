//! CUSTOM authorization with Istio's shapes: an `AuthorizationPolicy` with
//! `action: CUSTOM` names an `envoyExtAuthzHttp` provider of the mesh
//! config, and a real HTTP authorizer (Envoy's protocol, Istio's sample
//! semantics) decides. Real gateway, real tunnel, real provider.

use std::{path::PathBuf, time::Duration};

use hyper::{HeaderMap, StatusCode};
use llm_egress_tests::{
    env,
    gateway_lab::*,
    kube_lab::{install_basics, lax_crds, ApiServer, User},
    process::{eventually, Daemon, Place},
};
use serde_json::Value;

const AUTHZ_HOST: &str = "ext-authz.foo.svc.cluster.local";
const AUTHZ_PORT: u16 = 8000;
const AUTHZ_GRPC_PORT: u16 = 9000;

/// The policy of Istio's ext-authz task, for the seed's workload only.
const CUSTOM_POLICY: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: istio-system}
spec:
  selector:
    matchLabels: {istio: egressgateway}
  action: CUSTOM
  provider: {name: sample-ext-authz-http}
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/default/sa/sleep"]}
"#;

fn mesh_config(fail_open: bool, timeout: &str) -> String {
    format!(
        r#"extensionProviders:
- name: sample-ext-authz-http
  envoyExtAuthzHttp:
    service: foo/{AUTHZ_HOST}
    port: "{AUTHZ_PORT}"
    timeout: {timeout}
    pathPrefix: /check
    failOpen: {fail_open}
    statusOnError: "503"
    includeRequestHeadersInCheck: ["x-ext-authz"]
    headersToUpstreamOnAllow: ["x-ext-authz-check-result"]
    headersToDownstreamOnDeny: ["x-ext-authz-check-result", "content-type"]
    headersToDownstreamOnAllow: ["x-ext-authz-audit"]
"#
    )
}

struct Authorizer {
    daemon: Option<Daemon>,
    log: PathBuf,
}

impl Authorizer {
    fn start(lab: &GatewayLab, delay_ms: u64) -> Authorizer {
        let log = lab.dir.path().join("authz.jsonl");
        let grpc = format!("{}:{AUTHZ_GRPC_PORT}", lab.ip);
        let daemon = Daemon::start(
            "authorizer",
            &Place::default(),
            &env::tests_bin("llm-egress-test-authorizer"),
            &[
                "--listen".into(),
                format!("{}:{AUTHZ_PORT}", lab.ip),
                "--log".into(),
                log.display().to_string(),
                "--delay-ms".into(),
                delay_ms.to_string(),
                "--grpc-listen".into(),
                grpc,
            ],
            lab.dir.path(),
        );
        Authorizer {
            daemon: Some(daemon),
            log,
        }
    }

    fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop();
        }
    }

    fn checks(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// The seed's request as `sa`, with extra headers; status, headers, body.
async fn call(lab: &GatewayLab, sa: &str, extra: &[(&str, &str)]) -> (StatusCode, HeaderMap, String) {
    call_as(lab, sa, "/", extra).await
}

/// Every `result` was counted at least once for the HTTP provider.
async fn assert_checks_counted(lab: &GatewayLab, results: &[&str]) {
    let metrics = lab.admin_get("/metrics").await;
    for result in results {
        let n = series_value(
            &metrics,
            "llm_egress_gateway_ext_authz_checks_total",
            &[("provider", "sample-ext-authz-http"), ("result", result)],
        );
        assert!(n.unwrap_or(0.0) >= 1.0, "{result}: {metrics}");
    }
}

fn lab_with_authorizer(mesh: &str) -> GatewayLab {
    lab_with_policy(mesh, CUSTOM_POLICY)
}

fn lab_with_policy(mesh: &str, policy: &str) -> GatewayLab {
    let mut lab = GatewayLab::new();
    let file = lab.dir.path().join("mesh.yaml");
    write_atomically(&file, mesh);
    lab.extra_args.extend([
        "--mesh-config".into(),
        file.display().to_string(),
        "--resolve".into(),
        format!("{AUTHZ_HOST}={}", lab.ip),
    ]);
    lab.restart_gateway();
    lab.apply("custom.yaml", policy);
    lab
}

/// Waits until the CUSTOM policy is in force (the authorizer denies).
async fn until_custom_applies(lab: &GatewayLab) {
    eventually("the CUSTOM policy to apply", Duration::from_secs(10), || async {
        let (s, _, b) = call(lab, "sleep", &[]).await;
        (s == StatusCode::FORBIDDEN)
            .then_some(())
            .ok_or(format!("{s} {b}"))
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn custom_policy_asks_the_http_authorizer_and_passes_its_answers_through() {
    let lab = lab_with_authorizer(&mesh_config(false, "2s"));
    let authorizer = Authorizer::start(&lab, 0);
    until_custom_applies(&lab).await;

    // Deny: the authorizer's status, body and selected headers reach the client.
    let (status, headers, body) = call(&lab, "sleep", &[("x-ext-authz", "deny")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        body,
        "denied by ext_authz for not found header `x-ext-authz: allow` in the request"
    );
    assert_eq!(headers["x-ext-authz-check-result"], "denied");
    assert!(
        headers.get("x-ext-authz-audit").is_none(),
        "not in headersToDownstreamOnDeny"
    );
    let provider_before = lab.provider_requests().len();

    // Allow: the completion, with the authorizer's headers upstream and downstream.
    let (status, headers, body) = call(&lab, "sleep", &[("x-ext-authz", "allow")]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("\"choices\""), "{body}");
    assert_eq!(headers["x-ext-authz-audit"], "checked");
    let provider = lab.provider_requests();
    assert_eq!(
        provider.len(),
        provider_before + 1,
        "denied requests never reach the provider"
    );
    let last = provider.last().unwrap();
    assert_eq!(last["headers"]["x-ext-authz-check-result"], "allowed");
    assert_eq!(
        last["authorized"], true,
        "the provider key still replaces the client's credentials"
    );

    // The check: the original method and path under pathPrefix, the selected
    // header, and the workload's identity — never the client's claim of one.
    let checks = authorizer.checks();
    let check = checks.last().unwrap();
    assert_eq!(check["method"], "POST");
    assert_eq!(check["path"], "/check/");
    assert_eq!(check["headers"]["x-ext-authz"], "allow");
    assert_eq!(
        check["headers"]["x-forwarded-client-cert"],
        "URI=spiffe://cluster.local/ns/default/sa/sleep"
    );
    assert_eq!(check["bodyBytes"], 0);

    // Not matched by the CUSTOM rule: the authorizer is not asked.
    let before = authorizer.checks().len();
    let (status, _, _) = call(&lab, "other", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        authorizer.checks().len(),
        before,
        "the authorizer was asked about a request the rule does not match"
    );

    // DENY still wins after a CUSTOM allow.
    lab.apply(
        "authpolicy.yaml",
        &std::fs::read_to_string(examples_dir().join("authpolicy.yaml")).unwrap(),
    );
    eventually(
        "the DENY policy after the CUSTOM allow",
        Duration::from_secs(10),
        || async {
            let (s, _, b) = call(&lab, "sleep", &[("x-ext-authz", "allow")]).await;
            (b == "RBAC: access denied")
                .then_some(())
                .ok_or(format!("{s} {b}"))
        },
    )
    .await;
    // With the DENY in force, the authorizer is still asked first.
    let before = authorizer.checks().len();
    let (_, _, body) = call(&lab, "sleep", &[("x-ext-authz", "allow")]).await;
    assert_eq!(body, "RBAC: access denied");
    assert_eq!(
        authorizer.checks().len(),
        before + 1,
        "CUSTOM is asked before DENY"
    );
    assert_checks_counted(&lab, &["allow", "deny"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_authorizer_that_is_down_or_late_fails_closed_unless_fail_open() {
    let lab = lab_with_authorizer(&mesh_config(false, "300ms"));
    // Late: answers after the timeout.
    let mut authorizer = Authorizer::start(&lab, 2000);
    eventually(
        "a late authorizer to give statusOnError",
        Duration::from_secs(10),
        || async {
            let (s, _, b) = call(&lab, "sleep", &[("x-ext-authz", "allow")]).await;
            (s == StatusCode::SERVICE_UNAVAILABLE)
                .then_some(())
                .ok_or(format!("{s} {b}"))
        },
    )
    .await;
    assert!(!authorizer.checks().is_empty(), "the late authorizer was asked");
    authorizer.stop();
    // Down: statusOnError, and nothing reaches the provider.
    let provider_before = lab.provider_requests().len();
    let (status, _, body) = call(&lab, "sleep", &[("x-ext-authz", "allow")]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(lab.provider_requests().len(), provider_before);

    // failOpen: the mesh config changes while running; down lets requests through.
    write_atomically(&lab.dir.path().join("mesh.yaml"), &mesh_config(true, "300ms"));
    eventually("failOpen to apply", Duration::from_secs(10), || async {
        let (s, _, b) = call(&lab, "sleep", &[]).await;
        (s == StatusCode::OK).then_some(()).ok_or(format!("{s} {b}"))
    })
    .await;
    assert_checks_counted(&lab, &["error", "error_fail_open"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_custom_policy_naming_an_unknown_provider_denies_what_it_matches() {
    let lab = lab_with_authorizer("extensionProviders: []\n");
    until_custom_applies(&lab).await;
    let (status, _, _) = call(&lab, "sleep", &[("x-ext-authz", "allow")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = call(&lab, "other", &[]).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "only what the CUSTOM rule matches is denied"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn custom_policy_asks_a_grpc_authorizer_with_envoys_check_api() {
    let mesh = format!(
        "extensionProviders:\n- name: sample-ext-authz-grpc\n  envoyExtAuthzGrpc:\n    service: {AUTHZ_HOST}\n    port: \"{AUTHZ_GRPC_PORT}\"\n    timeout: 2s\n    statusOnError: \"502\"\n"
    );
    let lab = lab_with_policy(
        &mesh,
        &CUSTOM_POLICY.replace("sample-ext-authz-http", "sample-ext-authz-grpc"),
    );
    let mut authorizer = Authorizer::start(&lab, 0);
    until_custom_applies(&lab).await;

    let (status, headers, body) = call(&lab, "sleep", &[("x-ext-authz", "deny")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        body,
        "denied by ext_authz for not found header `x-ext-authz: allow` in the request"
    );
    assert_eq!(headers["x-ext-authz-check-result"], "denied");

    let (status, headers, body) = call(&lab, "sleep", &[("x-ext-authz", "allow")]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["x-ext-authz-audit"], "checked");
    let last = lab.provider_requests().pop().unwrap();
    assert_eq!(last["headers"]["x-ext-authz-check-result"], "allowed");
    assert_eq!(last["authorized"], true);

    let checks = authorizer.checks();
    let check = checks.last().unwrap();
    assert_eq!(check["protocol"], "grpc");
    assert_eq!(check["method"], "POST");
    assert_eq!(check["path"], "/");
    assert_eq!(check["host"], "dashscope.aliyuncs.com");
    assert_eq!(check["principal"], "spiffe://cluster.local/ns/default/sa/sleep");
    assert!(check["headers"].get("x-forwarded-client-cert").is_none());

    let before = authorizer.checks().len();
    assert_eq!(call(&lab, "other", &[]).await.0, StatusCode::OK);
    assert_eq!(
        authorizer.checks().len(),
        before,
        "not asked when the rule does not match"
    );

    authorizer.stop();
    let (status, _, _) = call(&lab, "sleep", &[("x-ext-authz", "allow")]).await;
    assert_eq!(
        status,
        StatusCode::BAD_GATEWAY,
        "statusOnError when the gRPC authorizer is down"
    );
}

/// On Kubernetes the providers come from where Istio keeps them: the
/// `istio` ConfigMap's `mesh` key in the root namespace, read with the
/// chart's RBAC, and followed when it changes.
#[tokio::test(flavor = "multi_thread")]
async fn on_kubernetes_the_providers_come_from_istios_configmap() {
    let host = Place::default();
    let api = ApiServer::start(&host);
    install_basics(&api, &host, &lax_crds());
    let mut lab = GatewayLab::with_kubernetes(api.kubeconfig(User::Gateway));
    api.apply_seed_with_key(&host, &lab.api_key);
    let configmap = |mesh: &str| {
        let indented: String = mesh.lines().map(|l| format!("    {l}\n")).collect();
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |\n{indented}")
    };
    api.apply_ok(&host, &configmap(&mesh_config(false, "1s")));
    lab.extra_args
        .extend(["--resolve".into(), format!("{AUTHZ_HOST}={}", lab.ip)]);
    lab.restart_gateway();
    api.apply_ok(&host, CUSTOM_POLICY);
    let mut authorizer = Authorizer::start(&lab, 0);
    eventually(
        "the CUSTOM policy from the API, with the ConfigMap's provider",
        Duration::from_secs(30),
        || async {
            let (s, h, b) = call(&lab, "sleep", &[("x-ext-authz", "deny")]).await;
            (s == StatusCode::FORBIDDEN && h.get("x-ext-authz-check-result").is_some())
                .then_some(())
                .ok_or(format!("{s} {b}"))
        },
    )
    .await;
    assert_eq!(
        call(&lab, "sleep", &[("x-ext-authz", "allow")]).await.0,
        StatusCode::OK
    );
    assert!(!authorizer.checks().is_empty());

    // The ConfigMap changes: failOpen, and the authorizer goes away.
    authorizer.stop();
    api.apply_ok(&host, &configmap(&mesh_config(true, "1s")));
    eventually(
        "failOpen from the changed ConfigMap",
        Duration::from_secs(30),
        || async {
            let (s, _, b) = call(&lab, "sleep", &[]).await;
            (s == StatusCode::OK).then_some(()).ok_or(format!("{s} {b}"))
        },
    )
    .await;
}

/// `includeRequestBodyInCheck`: the body goes to the authorizers that ask
/// for it (a content filter), cut to their `maxRequestBytes`, flagged
/// partial as Envoy flags it, or refused with 413 when partial messages
/// are not allowed; the provider still gets the whole body.
#[tokio::test(flavor = "multi_thread")]
async fn the_request_body_goes_to_authorizers_that_ask_for_it() {
    let mesh = format!(
        r#"extensionProviders:
- name: body-http
  envoyExtAuthzHttp:
    service: {AUTHZ_HOST}
    port: "{AUTHZ_PORT}"
    timeout: 2s
    includeRequestHeadersInCheck: ["x-ext-authz"]
    headersToDownstreamOnDeny: ["x-ext-authz-check-result"]
    includeRequestBodyInCheck: {{maxRequestBytes: 4096, allowPartialMessage: false}}
- name: body-grpc
  envoyExtAuthzGrpc:
    service: {AUTHZ_HOST}
    port: "{AUTHZ_GRPC_PORT}"
    timeout: 2s
    includeRequestBodyInCheck: {{maxRequestBytes: 16, allowPartialMessage: true, packAsBytes: true}}
"#
    );
    let policy = |name: &str, provider: &str, sa: &str| {
        CUSTOM_POLICY
            .replace("name: ext-authz,", &format!("name: {name},"))
            .replace("sample-ext-authz-http", provider)
            .replace("sa/sleep", &format!("sa/{sa}"))
    };
    let lab = lab_with_policy(
        &mesh,
        &format!(
            "{}---\n{}",
            policy("body-http", "body-http", "sleep"),
            policy("body-grpc", "body-grpc", "other")
        ),
    );
    let authorizer = Authorizer::start(&lab, 0);
    until_custom_applies(&lab).await;
    let send = |sa: &'static str, body: String| {
        let lab = &lab;
        async move {
            let mut req = seed_request(&body);
            req.headers_mut().insert("x-ext-authz", "allow".parse().unwrap());
            let resp = send_as(lab, lab.tunnel_addr(), sa, req).await;
            (resp.status(), body_text(resp).await)
        }
    };
    let clean = SEED_BODY.to_string();
    // HTTP: the whole body is checked, and the provider gets all of it.
    let (status, text) = send("sleep", clean.clone()).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let check = authorizer.checks().pop().unwrap();
    assert_eq!(check["body"], clean.as_str());
    assert_eq!(check["headers"]["x-envoy-auth-partial-body"], "false");
    let seen = lab.provider_requests().pop().unwrap();
    assert_eq!(seen["body"]["messages"][0]["content"], "Tell me about yourself");
    // A body the authorizer refuses never reaches the provider.
    let before = lab.provider_requests().len();
    let (status, text) = send(
        "sleep",
        clean.replace("Tell me about yourself", "something forbidden"),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
    assert_eq!(lab.provider_requests().len(), before);
    // Larger than maxRequestBytes, partial messages not allowed: 413, and
    // the authorizer is not asked.
    let checks = authorizer.checks().len();
    let big = clean.replace("Tell me about yourself", &"x".repeat(5000));
    let (status, _) = send("sleep", big.clone()).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(authorizer.checks().len(), checks);
    // gRPC, 16 bytes, partial allowed, as bytes: the start of the body is
    // checked, flagged partial; the provider gets the whole body.
    let (status, text) = send("other", big.clone()).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let check = authorizer.checks().pop().unwrap();
    assert_eq!(check["protocol"], "grpc");
    assert_eq!(check["rawBody"], &big[..16]);
    assert_eq!(check["body"], "");
    assert_eq!(check["headers"]["x-envoy-auth-partial-body"], "true");
    let seen = lab.provider_requests().pop().unwrap();
    assert_eq!(seen["body"]["messages"][0]["content"], "x".repeat(5000));
    let metrics = lab.admin_get("/metrics").await;
    assert_eq!(
        series_value(
            &metrics,
            "llm_egress_gateway_ext_authz_checks_total",
            &[("provider", "body-http"), ("result", "body_too_large")]
        ),
        Some(1.0)
    );
}

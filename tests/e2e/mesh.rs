//! The whole path, end to end: a pod with no key and no sidecar calls its
//! provider over plain HTTP; eBPF captures the connection, the agent tunnels
//! it over HTTP/2 mTLS with the pod's identity, the gateway applies policy,
//! adds the key and calls the HTTPS provider. Real processes, real eBPF,
//! namespaces with no route out. Needs root.

use std::time::{Duration, Instant};

use llm_egress_tests::{
    process::{wait_for, Place},
    topology::*,
};

fn seed_policy() -> String {
    std::fs::read_to_string(llm_egress_tests::gateway_lab::examples_dir().join("authpolicy.yaml")).unwrap()
}

/// Retries the seed curl until `want(stdout)` holds (config reloads are
/// asynchronous), returning the last result.
fn seed_until(lab: &CaptureLab, cgroup: &std::path::Path, want: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, out, _) = lab.seed_curl(cgroup, &[]);
        if want(&out) || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A streamed completion requested with curl from the sleep pod, with extra curl arguments.
fn stream_curl(lab: &CaptureLab, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "-sS",
        "-N",
        "http://dashscope.aliyuncs.com/",
        "--header",
        "Content-Type: application/json",
        "--data",
        r#"{"stream": true, "messages": [{"role": "user", "content": "count"}]}"#,
    ];
    args.extend_from_slice(extra);
    lab.curl_in(&lab.pod, Some(&lab.sleep_cgroup), &args)
}

fn completion(out: &str) -> bool {
    out.contains("\"chat.completion\"") && out.contains("Qwen")
}

#[test]
fn seed_scenario_completion_then_rbac_access_denied_then_completion() {
    let mut lab = CaptureLab::new();
    lab.start_mesh();

    let (code, out, err) = lab.seed_curl(&lab.sleep_cgroup, &[]);
    assert_eq!(
        code,
        Some(0),
        "{err}\nagent:\n{}\ngateway:\n{}",
        lab.agent_logs(),
        lab.gateway_logs()
    );
    assert!(completion(&out), "{out}");
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["model"], "qwen1.5-72b-chat");
    let seen = lab.provider_requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["path"], "/compatible-mode/v1/chat/completions");
    assert_eq!(seen[0]["authorized"], true);
    assert_eq!(seen[0]["body"]["stream"], false);

    lab.apply("authpolicy.yaml", &seed_policy());
    let out = seed_until(&lab, &lab.sleep_cgroup, |o| o == "RBAC: access denied");
    assert_eq!(out, "RBAC: access denied");
    // Requests before the reload took effect were served; a denied one is not.
    let served = lab.provider_requests().len();
    let (code, out, _) = lab.seed_curl(&lab.sleep_cgroup, &[]);
    assert_eq!((code, out.as_str()), (Some(0), "RBAC: access denied"));
    assert_eq!(
        lab.provider_requests().len(),
        served,
        "a denied request reached the provider"
    );

    lab.remove("authpolicy.yaml");
    let out = seed_until(&lab, &lab.sleep_cgroup, completion);
    assert!(completion(&out), "{out}");

    // The pod never had the key.
    let status = lab.status();
    assert!(status["recent"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["principal"] == "cluster.local/ns/default/sa/sleep"));
    assert!(!lab.agent_logs().contains(&lab.api_key));
    assert!(!lab.gateway_logs().contains(&lab.api_key));
}

#[test]
fn allow_policy_admits_one_service_account_and_denies_another() {
    let mut lab = CaptureLab::new();
    lab.write_workloads(&[
        ("default", "sleep", "sleep", "pod-sleep"),
        ("default", "other", "other", "pod-other"),
    ]);
    lab.start_mesh();
    lab.apply(
        "allow.yaml",
        "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: allow-sleep, namespace: istio-system}\nspec:\n  selector: {matchLabels: {istio: egressgateway}}\n  action: ALLOW\n  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/default/sa/sleep]}\n",
    );
    let out = seed_until(&lab, &lab.other_cgroup, |o| o == "RBAC: access denied");
    assert_eq!(out, "RBAC: access denied");
    let (code, out, err) = lab.seed_curl(&lab.sleep_cgroup, &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(completion(&out), "{out}");
}

#[test]
fn a_pod_cannot_choose_its_identity_or_key() {
    let mut lab = CaptureLab::new();
    lab.start_mesh();
    lab.apply("authpolicy.yaml", &seed_policy());
    seed_until(&lab, &lab.sleep_cgroup, |o| o == "RBAC: access denied");
    // Claiming another identity in HTTP headers changes nothing.
    let (_, out, _) = lab.seed_curl(
        &lab.sleep_cgroup,
        &[
            "--header",
            "x-llm-egress-workload: spiffe://cluster.local/ns/default/sa/other",
            "--header",
            "x-llm-egress-service-account: other",
            "--header",
            "Authorization: Bearer sk-pod-own-key",
        ],
    );
    assert_eq!(out, "RBAC: access denied");
    lab.remove("authpolicy.yaml");
    let out = seed_until(&lab, &lab.sleep_cgroup, completion);
    assert!(completion(&out));
    // Its own Authorization never reaches the provider: the gateway's key does.
    let (_, out, _) = lab.seed_curl(
        &lab.sleep_cgroup,
        &["--header", "Authorization: Bearer sk-pod-own-key"],
    );
    assert!(completion(&out), "{out}");
    let seen = lab.provider_requests();
    assert!(
        seen.iter()
            .all(|r| r["authorized"] == true && r["authorizationCount"] == 1),
        "{seen:?}"
    );
    assert!(seen
        .iter()
        .all(|r| r["headers"].get("x-llm-egress-workload").is_none()));
}

#[test]
fn https_from_the_pod_is_passed_through_by_sni_and_an_l4_deny_refuses_it() {
    let mut lab = CaptureLab::new();
    lab.start_mesh();
    let ca = lab.certs().join("ca.pem").display().to_string();
    let https = |lab: &CaptureLab| {
        lab.curl_in(
            &lab.pod,
            Some(&lab.sleep_cgroup),
            &[
                "-sS",
                "--cacert",
                &ca,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("https://{SEED_HOST}/compatible-mode/v1/chat/completions"),
                "--data",
                "{}",
            ],
        )
    };
    // TLS end to end with the provider: it answers 401 (the pod has no key),
    // which proves the bytes reached it through the tunnel.
    let out = https(&lab);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "401",
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        lab.gateway_logs()
    );
    let conn = lab.last_connection();
    assert_eq!(conn["originalDestination"], format!("{LLM_V4}:443"));

    lab.apply("authpolicy.yaml", &seed_policy());
    std::thread::sleep(Duration::from_millis(1500));
    let before = lab.provider_requests().len();
    let out = https(&lab);
    assert!(!out.status.success(), "TLS to a denied host went through");
    assert_eq!(lab.provider_requests().len(), before);
    assert!(lab.gateway_logs().contains("TLS passthrough denied"));
}

#[test]
fn a_streamed_completion_reaches_the_pod_chunk_by_chunk() {
    let mut lab = CaptureLab::new();
    lab.start_mesh();
    let out = stream_curl(&lab, &["-w", "\n%{time_starttransfer} %{time_total}"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("part0") && text.contains("part4") && text.contains("[DONE]"),
        "{text}"
    );
    let times: Vec<f64> = text
        .lines()
        .last()
        .unwrap()
        .split(' ')
        .map(|t| t.parse().unwrap())
        .collect();
    // 5 chunks 200 ms apart: the first byte must come long before the end.
    assert!(
        times[1] - times[0] >= 0.6,
        "first byte {}s, total {}s: buffered",
        times[0],
        times[1]
    );
}

#[test]
fn gateway_down_fails_fast_and_recovers_without_restarting_the_agent() {
    let mut lab = CaptureLab::new();
    lab.start_mesh();
    assert!(completion(&lab.seed_curl(&lab.sleep_cgroup, &[]).1));
    lab.stop_gateway();
    let before = lab.provider_requests().len();
    let started = Instant::now();
    let (code, _, _) = lab.seed_curl(&lab.sleep_cgroup, &[]);
    assert_ne!(code, Some(0), "a request succeeded with the gateway down");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "failing took {:?}",
        started.elapsed()
    );
    // Nothing went to the provider directly.
    assert_eq!(lab.provider_requests().len(), before);
    let metrics = lab.metrics();
    assert!(metrics.contains("reason=\"gateway_unavailable\""), "{metrics}");
    // Failed connections are not left counted as open (drain waits on it).
    assert!(
        metrics.contains("llm_egress_agent_active_connections 0"),
        "{metrics}"
    );

    lab.start_gateway();
    let out = seed_until(&lab, &lab.sleep_cgroup, completion);
    assert!(completion(&out), "no recovery: {out}");
}

#[test]
fn keep_alive_requests_and_fifty_concurrent_pods_all_succeed() {
    let mut lab = CaptureLab::new();
    let pods: Vec<String> = (0..50).map(|i| format!("pod-{i}")).collect();
    let mut workloads: Vec<(String, String, String, String)> = pods
        .iter()
        .map(|p| ("default".to_string(), format!("sa-{p}"), p.clone(), p.clone()))
        .collect();
    workloads.push((
        "default".into(),
        "sleep".into(),
        "sleep".into(),
        "pod-sleep".into(),
    ));
    let refs: Vec<(&str, &str, &str, &str)> = workloads
        .iter()
        .map(|(a, b, c, d)| (a.as_str(), b.as_str(), c.as_str(), d.as_str()))
        .collect();
    let cgroups: Vec<_> = pods.iter().map(|p| lab.cgroups.child(p)).collect();
    lab.write_workloads(&refs);
    lab.start_mesh();
    wait_for("51 workloads enrolled", Duration::from_secs(10), || {
        (lab.status()["workloads"]["enrolled"].as_array()?.len() == 51).then_some(())
    });

    // One curl, three requests on one kept-alive connection.
    let url = "http://dashscope.aliyuncs.com/";
    let captured_before = lab.counter("captured");
    let out = lab.curl_in(
        &lab.pod,
        Some(&lab.sleep_cgroup),
        &[
            "-sS",
            "-H",
            "Content-Type: application/json",
            "--data",
            llm_egress_tests::gateway_lab::SEED_BODY,
            url,
            url,
            url,
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.matches("chat.completion").count(), 3, "{text}");
    assert_eq!(
        lab.counter("captured") - captured_before,
        1,
        "curl did not reuse its connection"
    );

    // Fifty pods at once.
    let provider_before = lab.provider_requests().len();
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = cgroups
            .iter()
            .map(|cg| s.spawn(|| lab.seed_curl(cg, &[])))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (code, out, err)) in results.iter().enumerate() {
        assert_eq!(*code, Some(0), "pod {i}: {err}");
        assert!(completion(out), "pod {i}: {out}");
    }
    assert_eq!(lab.provider_requests().len() - provider_before, 50);
    let principals: std::collections::BTreeSet<String> = lab.status()["recent"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["principal"].as_str().unwrap().to_string())
        .collect();
    assert!(principals.len() >= 40, "identities were mixed up: {principals:?}");
}

#[test]
fn agent_shutdown_lets_an_open_stream_finish() {
    let mut lab = CaptureLab::new();
    lab.start_mesh();
    let result = std::thread::scope(|s| {
        let stream = s.spawn(|| stream_curl(&lab, &[]));
        // SIGTERM while the completion is streaming (5 chunks, 200 ms apart).
        std::thread::sleep(Duration::from_millis(400));
        let agent_pid = lab
            .agent
            .as_ref()
            .and_then(|a| a.child.as_ref())
            .map(|c| c.id() as i32)
            .unwrap();
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(agent_pid, libc::SIGTERM) };
        stream.join().unwrap()
    });
    let text = String::from_utf8_lossy(&result.stdout);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(
        text.contains("part4") && text.contains("[DONE]"),
        "the stream was cut by the shutdown: {text}"
    );
    // And new connections are refused once it is gone (fail closed).
    wait_for("the agent to exit", Duration::from_secs(15), || {
        lab.agent
            .as_mut()
            .and_then(|a| a.child.as_mut())
            .and_then(|c| c.try_wait().ok().flatten())
            .map(|_| ())
    });
    let (code, _, _) = lab.seed_curl(&lab.sleep_cgroup, &[]);
    assert_eq!(
        code,
        Some(7),
        "a captured connection was not refused after shutdown"
    );
}

#[test]
fn an_ipv6_connection_is_tunnelled_too() {
    let mut lab = CaptureLab::new();
    lab.start_mesh();
    let (code, out, err) = lab.seed_curl(&lab.sleep_cgroup, &["-6"]);
    assert_eq!(code, Some(0), "{err}\n{}", lab.gateway_logs());
    assert!(completion(&out), "{out}");
    let conn = lab.last_connection();
    assert_eq!(conn["originalDestination"], format!("[{LLM_V6}]:80"));
    assert_eq!(lab.provider_requests().last().unwrap()["authorized"], true);
}

/// One pod opening captured connections in a loop, up to its cap and past
/// it, does not stop another pod's request on the same node: the agent
/// closes the greedy pod's connections beyond `--max-connections-per-workload`
/// and counts them.
#[test]
fn a_pod_at_its_connection_cap_does_not_starve_another_pod() {
    let mut lab = CaptureLab::new();
    lab.write_workloads(&[
        ("default", "sleep", "sleep", "pod-sleep"),
        ("default", "greedy", "greedy", "pod-other"),
    ]);
    lab.agent_extra = vec!["--max-connections-per-workload".into(), "8".into()];
    lab.start_mesh();
    seed_until(&lab, &lab.sleep_cgroup, completion);
    // Each connection starts a request and holds it open.
    let script = format!(
        "trap '' PIPE; for i in $(seq 1 40); do exec {{fd}}<>/dev/tcp/{LLM_V4}/80 && printf 'POST / HTTP/1.1\\r\\nHost: {SEED_HOST}\\r\\n' >&$fd; echo opened $i; done; sleep 60"
    );
    let mut greedy = llm_egress_tests::process::Daemon::start(
        "greedy",
        &Place {
            netns: Some(&lab.pod),
            cgroup: Some(&lab.other_cgroup),
        },
        std::path::Path::new("/bin/bash"),
        &["-c".to_string(), script],
        lab.workdir.path(),
    );
    wait_for("the greedy pod to pass its cap", Duration::from_secs(30), || {
        greedy.assert_running();
        (lab.metrics()
            .lines()
            .find_map(|l| {
                l.strip_prefix("llm_egress_agent_rejected_connections_total{reason=\"workload_limit\"} ")
            })
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
            >= 30)
            .then_some(())
    });
    // Meanwhile the other pod's request goes through.
    let (code, out, err) = lab.seed_curl(&lab.sleep_cgroup, &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(completion(&out), "{out}");
    assert!(
        lab.agent_logs().contains("--max-connections-per-workload"),
        "the limit was not logged"
    );
    greedy.stop();
}

/// The agent checks the gateway's SPIFFE ID, not only its DNS name: a
/// certificate of the same CA for the same name but another identity (as
/// anyone who can get one issued could present) gets no traffic.
#[test]
fn the_agent_refuses_a_gateway_with_another_identity() {
    let mut lab = CaptureLab::new();
    lab.start_mesh();
    assert!(completion(&lab.seed_curl(&lab.sleep_cgroup, &[]).1));
    lab.stop_agent();
    lab.agent_extra = vec![
        "--gateway-identity".into(),
        "spiffe://cluster.local/ns/istio-system/sa/someone-else".into(),
    ];
    lab.start_agent();
    let before = lab.provider_requests().len();
    let (code, _, _) = lab.seed_curl(&lab.sleep_cgroup, &[]);
    assert_ne!(
        code,
        Some(0),
        "the agent tunnelled to a gateway it should not trust"
    );
    assert_eq!(lab.provider_requests().len(), before);
    wait_for("the refusal in the agent log", Duration::from_secs(10), || {
        lab.agent_logs().contains("not the expected").then_some(())
    });
}

/// The official OpenAI Python SDK in the enrolled pod, with a placeholder
/// key and only `base_url` pointing at the provider: every call works, the
/// provider sees its own paths and the gateway's key, a stream the client
/// did not ask usage for shows none (but is counted), one that asked gets it.
#[test]
fn the_official_openai_sdk_works_unchanged_from_an_enrolled_pod() {
    let mut lab = CaptureLab::new();
    lab.start_mesh();
    seed_until(&lab, &lab.sleep_cgroup, completion);
    let before = lab.provider_requests().len();
    let python = llm_egress_tests::env::openai_python();
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sdk/openai_client.py");
    let out = llm_egress_tests::process::run(
        &Place {
            netns: Some(&lab.pod),
            cgroup: Some(&lab.sleep_cgroup),
        },
        python.to_str().unwrap(),
        &[
            script.to_str().unwrap(),
            "http://dashscope.aliyuncs.com/compatible-mode/v1",
            "qwen-max",
            "text-embedding-v3",
        ],
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "the SDK failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        lab.gateway_logs()
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the script's JSON");
    assert!(got["chat"].as_str().unwrap().contains("Qwen"), "{got}");
    assert_eq!(got["chat_usage"], 72);
    assert_eq!(got["stream_text"], "part0 part1 part2 part3 part4 ");
    assert_eq!(got["stream_last_has_choices"], true, "{got}");
    assert_eq!(got["stream_usage_seen"], false, "{got}");
    assert_eq!(got["asked_usage"], 5, "{got}");
    assert_eq!(got["embeddings"], serde_json::json!([4, 4]));
    assert_eq!(
        got["models"],
        serde_json::json!(["qwen1.5-72b-chat", "text-embedding-v3"])
    );
    assert!(got["responses"].as_str().unwrap().contains("Qwen"), "{got}");
    assert_eq!(got["responses_stream"], "part0 part1 part2 part3 part4 ");
    assert!(got["completions"].as_str().unwrap().contains("Qwen"), "{got}");

    let seen: Vec<serde_json::Value> = lab.provider_requests().into_iter().skip(before).collect();
    let paths: Vec<&str> = seen.iter().map(|r| r["path"].as_str().unwrap()).collect();
    let base = "/compatible-mode/v1";
    assert_eq!(
        paths,
        [
            "/chat/completions",
            "/chat/completions",
            "/chat/completions",
            "/embeddings",
            "/models",
            "/responses",
            "/responses",
            "/completions"
        ]
        .map(|p| format!("{base}{p}")),
    );
    for r in &seen {
        assert_eq!(r["authorized"], true, "{r}");
        assert_eq!(r["authorizationCount"], 1, "{r}");
    }
    assert_eq!(seen[0]["body"]["model"], "qwen-max");
    assert_eq!(seen[1]["body"]["stream_options"]["include_usage"], true);
    let metrics = lab.gateway_metrics();
    // Chat 72 + stream 5 + asked stream 5 output tokens, counted per operation.
    assert_eq!(
        llm_egress_tests::gateway_lab::series_value(
            &metrics,
            "gen_ai_client_token_usage_sum",
            &[
                ("principal", "cluster.local/ns/default/sa/sleep"),
                ("gen_ai_operation_name", "chat"),
                ("gen_ai_request_model", "qwen-max"),
                ("gen_ai_token_type", "output")
            ]
        ),
        Some(82.0),
        "{metrics}"
    );
}

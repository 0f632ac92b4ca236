//! End-to-end capture tests: real eBPF programs attached to a cgroup the
//! test creates, a real agent process, curl in a "pod" network namespace,
//! and an "internet" namespace holding TEST-NET addresses. Needs root.

use std::time::Duration;

use llm_egress_tests::{
    netns::sh,
    process::{run, wait_for, Place},
    topology::*,
};

fn peer_ip(answer: &serde_json::Value) -> String {
    let peer: std::net::SocketAddr = answer["peer"]
        .as_str()
        .expect("peer in answer")
        .parse()
        .expect("peer address");
    peer.ip().to_string()
}

/// Programs attached to a cgroup, by attach type, as the kernel lists them.
fn attached(cgroup: &std::path::Path) -> Vec<(String, String)> {
    let out = sh(&format!("bpftool -j cgroup show {}", cgroup.display()));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or(serde_json::Value::Array(vec![]));
    v.as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["attach_type"].as_str().unwrap_or("").to_string(),
                p["name"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn enrolled_pod_is_captured_with_original_destination_and_identity() {
    let mut lab = CaptureLab::new();
    lab.start_agent();

    let answer = lab.fetch_from(&lab.sleep_cgroup, &["-4", &format!("http://{LLM_HOST}/v1/hello")]);
    // The internet host answered, on the original address, and saw the
    // node (the agent) as its peer, not the pod: the connection was captured.
    assert_eq!(answer["local"], format!("{LLM_V4}:80"));
    assert_eq!(answer["path"], "/v1/hello");
    assert_eq!(peer_ip(&answer), NODE_INET_V4, "not captured: {answer}");

    let status = lab.status();
    let recent = status["recent"].as_array().expect("recent connections");
    let conn = recent.last().expect("one captured connection");
    assert_eq!(conn["originalDestination"], format!("{LLM_V4}:80"));
    assert_eq!(conn["host"], LLM_HOST);
    assert_eq!(conn["namespace"], "default");
    assert_eq!(conn["serviceAccount"], "sleep");
    assert_eq!(conn["workload"], "sleep");
    assert_eq!(conn["principal"], "cluster.local/ns/default/sa/sleep");
    assert!(conn["peer"].as_str().unwrap().contains(POD_V4), "{conn}");
    assert_eq!(status["counters"]["captured"], 1);
    assert_eq!(status["counters"]["established"], 1);
    assert_eq!(status["counters"]["errors"], 0);

    let metrics = lab.metrics();
    assert!(
        metrics.contains(&format!(
            "llm_egress_agent_captured_connections_total{{namespace=\"default\",workload=\"sleep\",service_account=\"sleep\",destination=\"{LLM_HOST}:80\"}} 1"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("llm_egress_agent_ebpf_events_total{event=\"captured\"} 1"),
        "{metrics}"
    );
}

#[test]
fn non_targets_and_unenrolled_workloads_are_not_captured() {
    let mut lab = CaptureLab::new();
    lab.start_agent();

    // An enrolled pod to an address that is not a target: straight through.
    let answer = lab.fetch_from(&lab.sleep_cgroup, &[&format!("http://{OTHER_V4}/")]);
    assert_eq!(answer["local"], format!("{OTHER_V4}:80"));
    assert_eq!(peer_ip(&answer), POD_V4, "a non-target was captured: {answer}");

    // A workload that is not enrolled, to a target: straight through too.
    let answer = lab.fetch_from(&lab.other_cgroup, &["-4", &format!("http://{LLM_HOST}/")]);
    assert_eq!(answer["local"], format!("{LLM_V4}:80"));
    assert_eq!(
        peer_ip(&answer),
        POD_V4,
        "an unenrolled workload was captured: {answer}"
    );

    let status = lab.status();
    assert_eq!(status["counters"]["captured"], 0, "{status}");
    assert_eq!(status["counters"]["established"], 0, "{status}");
    // The unenrolled connect to a target is counted as passed.
    assert_eq!(status["counters"]["passed"], 1, "{status}");
    assert!(status["recent"].as_array().unwrap().is_empty(), "{status}");
}

#[test]
fn child_cgroup_of_enrolled_workload_is_captured() {
    let mut lab = CaptureLab::new();
    lab.start_agent();
    // Like a container's cgroup under its pod's cgroup.
    let container = lab.cgroups.child("pod-sleep/container-1");

    let answer = lab.fetch_from(&container, &["-4", &format!("http://{LLM_HOST}/")]);
    assert_eq!(
        peer_ip(&answer),
        NODE_INET_V4,
        "child cgroup not captured: {answer}"
    );
    let conn = lab.last_connection();
    assert_eq!(conn["workload"], "sleep");
    assert_eq!(conn["principal"], "cluster.local/ns/default/sa/sleep");
}

#[test]
fn agent_down_fails_closed_and_restart_reuses_the_attachment() {
    let mut lab = CaptureLab::new();
    lab.start_agent();
    let answer = lab.fetch_from(&lab.sleep_cgroup, &["-4", &format!("http://{LLM_HOST}/")]);
    assert_eq!(peer_ip(&answer), NODE_INET_V4);
    let before = attached(&lab.cgroups.path);
    assert_eq!(before.len(), 3, "{before:?}");

    lab.stop_agent();
    let requests_before = lab.internet_requests().len();
    let out = lab.curl_in(
        &lab.pod,
        Some(&lab.sleep_cgroup),
        &["-sS", "-4", &format!("http://{LLM_HOST}/")],
    );
    // curl exit 7: could not connect. The programs stayed attached (pinned)
    // and pointed the connect at a proxy that is not there.
    assert_eq!(
        out.status.code(),
        Some(7),
        "expected connection refused, got {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        lab.internet_requests().len(),
        requests_before,
        "the internet host was reached while the agent was down"
    );
    assert_eq!(
        attached(&lab.cgroups.path),
        before,
        "programs detached while the agent was down"
    );

    lab.start_agent();
    let status = lab.status();
    assert_eq!(status["attachment"], "reused", "{status}");
    let after = attached(&lab.cgroups.path);
    assert_eq!(after, before, "restart attached a second time");
    for kind in ["cgroup_inet4_connect", "cgroup_inet6_connect", "cgroup_sock_ops"] {
        assert_eq!(after.iter().filter(|(t, _)| t == kind).count(), 1, "{after:?}");
    }
    let answer = lab.fetch_from(&lab.sleep_cgroup, &["-4", &format!("http://{LLM_HOST}/")]);
    assert_eq!(
        peer_ip(&answer),
        NODE_INET_V4,
        "not captured after restart: {answer}"
    );

    // Uninstall detaches everything: the pod then reaches the host directly.
    lab.stop_agent();
    let out = run(
        &Place {
            netns: Some(&lab.node),
            cgroup: None,
        },
        llm_egress_tests::env::agent_bin().to_str().unwrap(),
        &["uninstall", "--bpffs", &lab.bpffs.pins().display().to_string()],
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(attached(&lab.cgroups.path).is_empty());
    let answer = lab.fetch_from(&lab.sleep_cgroup, &["-4", &format!("http://{LLM_HOST}/")]);
    assert_eq!(peer_ip(&answer), POD_V4);
}

#[test]
fn ipv6_is_captured_through_connect6() {
    let mut lab = CaptureLab::new();
    lab.start_agent();
    let answer = lab.fetch_from(&lab.sleep_cgroup, &["-6", &format!("http://{LLM_HOST}/v6")]);
    assert_eq!(answer["local"], format!("[{LLM_V6}]:80"));
    assert_eq!(peer_ip(&answer), NODE_INET_V6, "IPv6 not captured: {answer}");
    let conn = lab.last_connection();
    assert_eq!(conn["originalDestination"], format!("[{LLM_V6}]:80"));
    assert_eq!(conn["principal"], "cluster.local/ns/default/sa/sleep");
}

#[test]
fn workload_file_changes_are_applied_while_running() {
    let mut lab = CaptureLab::new();
    lab.start_agent();
    let answer = lab.fetch_from(&lab.other_cgroup, &["-4", &format!("http://{LLM_HOST}/")]);
    assert_eq!(peer_ip(&answer), POD_V4);

    lab.write_workloads(&[
        ("default", "sleep", "sleep", "pod-sleep"),
        ("team-b", "agent", "other", "pod-other"),
    ]);
    wait_for("pod-other to be enrolled", Duration::from_secs(10), || {
        (lab.status()["workloads"]["enrolled"].as_array()?.len() == 2).then_some(())
    });
    let answer = lab.fetch_from(&lab.other_cgroup, &["-4", &format!("http://{LLM_HOST}/")]);
    assert_eq!(
        peer_ip(&answer),
        NODE_INET_V4,
        "newly enrolled workload not captured"
    );
    let conn = lab.last_connection();
    assert_eq!(conn["principal"], "cluster.local/ns/team-b/sa/agent");

    // A broken edit keeps the last good list and is reported.
    std::fs::write(lab.workloads_file(), "workloads: [{namespace: x}]\n").unwrap();
    wait_for("the source error to be reported", Duration::from_secs(10), || {
        lab.status()["workloads"]["sourceError"].as_str().map(|_| ())
    });
    assert_eq!(lab.status()["workloads"]["enrolled"].as_array().unwrap().len(), 2);

    lab.write_workloads(&[]);
    wait_for("workloads to be unenrolled", Duration::from_secs(10), || {
        lab.status()["workloads"]["enrolled"]
            .as_array()?
            .is_empty()
            .then_some(())
    });
    let answer = lab.fetch_from(&lab.sleep_cgroup, &["-4", &format!("http://{LLM_HOST}/")]);
    assert_eq!(peer_ip(&answer), POD_V4, "unenrolled workload still captured");
}

#[test]
fn a_connection_without_capture_record_is_closed_not_forwarded() {
    let mut lab = CaptureLab::new();
    lab.start_agent();
    let before = lab.internet_requests().len();
    // Straight to the proxy port from the pod, not through connect4's rewrite.
    let out = lab.curl_in(
        &lab.pod,
        Some(&lab.other_cgroup),
        &[
            "-sS",
            "-H",
            &format!("Host: {LLM_HOST}"),
            &format!("http://{NODE_POD_V4}:15001/"),
        ],
    );
    assert!(
        !out.status.success(),
        "the proxy answered a connection it has no record for"
    );
    assert_eq!(lab.internet_requests().len(), before);
    wait_for("the rejection to be counted", Duration::from_secs(5), || {
        lab.metrics()
            .contains("llm_egress_agent_rejected_connections_total{reason=\"no_record\"} 1")
            .then_some(())
    });
}

#[test]
fn a_host_that_does_not_resolve_is_retried_and_reported() {
    let mut lab = CaptureLab::new();
    lab.agent_extra = vec!["--host".into(), "missing.example.invalid".into()];
    lab.start_agent();
    let status = lab.status();
    let missing = status["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["host"] == "missing.example.invalid")
        .cloned()
        .unwrap();
    assert!(missing["addresses"].as_array().unwrap().is_empty());
    assert!(
        missing["error"]
            .as_str()
            .is_some_and(|e| e.contains("missing.example.invalid")),
        "{missing}"
    );
    // Still retried in the background.
    let first = missing["attempts"].as_u64().unwrap();
    wait_for("another resolution attempt", Duration::from_secs(10), || {
        let s = lab.status();
        let t = s["targets"]
            .as_array()?
            .iter()
            .find(|t| t["host"] == "missing.example.invalid")?
            .clone();
        (t["attempts"].as_u64()? > first).then_some(())
    });
    let out = lab.curl_in(&lab.node, None, &["-s", &format!("http://{ADMIN}/readyz")]);
    let readyz = String::from_utf8_lossy(&out.stdout);
    assert!(
        readyz.starts_with("ready") && readyz.contains("warning: target missing.example.invalid"),
        "{readyz}"
    );
    // The other host is captured as usual.
    let answer = lab.fetch_from(&lab.sleep_cgroup, &["-4", &format!("http://{LLM_HOST}/")]);
    assert_eq!(peer_ip(&answer), NODE_INET_V4);
}

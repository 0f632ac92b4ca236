//! The Kubernetes code paths against a real API server (kube-apiserver
//! v1.20 + etcd started by the test, RBAC enforced with the chart's roles):
//! the agent's Pod watcher with real eBPF capture, the gateway's resources
//! and key Secret from the API, status reporting of bad resources, and the
//! generated CRDs' admission checks. Needs root.

use std::time::Duration;

use hyper::StatusCode;
use llm_egress_tests::{
    gateway_lab::*,
    kube_lab::*,
    process::{wait_for, Place},
    topology::*,
};

const HOST: Place = Place {
    netns: None,
    cgroup: None,
};

fn enrolled(lab: &CaptureLab) -> Vec<String> {
    lab.status()["workloads"]["enrolled"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|w| {
                    format!(
                        "{}/{}/{}",
                        w["spec"]["namespace"].as_str().unwrap_or(""),
                        w["spec"]["name"].as_str().unwrap_or(""),
                        w["spec"]["serviceAccount"].as_str().unwrap_or("")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn pod_yaml(ns: &str, name: &str, node: &str, sa: &str, label: Option<&str>) -> String {
    let labels = label
        .map(|l| format!("  labels: {{llm-egress.io/capture: {l}}}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n{labels}spec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n  containers: [{{name: app, image: sleep}}]\n"
    )
}

/// The kubelet's systemd-driver cgroup of a BestEffort pod, under the lab's root.
fn make_pod_cgroup(lab: &CaptureLab, uid: &str) -> std::path::PathBuf {
    let dir = lab
        .cgroups
        .path
        .join("kubepods.slice/kubepods-besteffort.slice")
        .join(format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_")));
    std::fs::create_dir_all(dir.join("container-app")).expect("pod cgroup");
    dir.join("container-app")
}

#[test]
fn agent_enrolls_labelled_pods_of_its_node_and_follows_them_across_api_server_restarts() {
    let mut lab = CaptureLab::new();
    let node = Place {
        netns: Some(&lab.node),
        cgroup: None,
    };
    let mut api = ApiServer::start(&node);
    install_basics(&api, &node, &crds());
    api.apply_ok(
        &node,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: team-a, labels: {llm-egress.io/capture: enabled}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: team-b}\n",
    );
    // A pod of another node, labelled: never this agent's business.
    api.apply_ok(&node, &pod_yaml("team-a", "elsewhere", "node-2", "sleep", None));

    // Direct mode: the test checks capture and identity, not the tunnel.
    lab.agent_extra = vec![
        "--kubernetes".into(),
        "--kubeconfig".into(),
        api.kubeconfig(User::Agent).display().to_string(),
        "--node-name".into(),
        "node-1".into(),
    ];
    // The static workload file is replaced by the Pod watcher.
    let mut args = lab.agent_args();
    let i = args.iter().position(|a| a == "--workloads").unwrap();
    args.drain(i..i + 2);
    let mut agent = llm_egress_tests::process::Daemon::start(
        "agent",
        &node,
        &llm_egress_tests::env::agent_bin(),
        &args,
        lab.workdir.path(),
    );
    wait_for("the agent to watch the API", Duration::from_secs(30), || {
        agent.assert_running();
        agent.logs().contains("enrolling this node's Pods").then_some(())
    });
    lab.agent = Some(agent);

    // A pod enrolled through its namespace's label.
    api.apply_ok(&node, &pod_yaml("team-a", "sleep", "node-1", "sleep", None));
    let uid = api.kubectl_ok(
        &node,
        &[
            "-n",
            "team-a",
            "get",
            "pod",
            "sleep",
            "-o",
            "jsonpath={.metadata.uid}",
        ],
    );
    let cgroup = make_pod_cgroup(&lab, &uid);
    // As a kubelet does once the containers run: a status update (an event).
    let started = std::time::Instant::now();
    api.kubectl_ok(
        &node,
        &[
            "-n",
            "team-a",
            "patch",
            "pod",
            "sleep",
            "--subresource=status",
            "-p",
            r#"{"status": {"phase": "Running"}}"#,
        ],
    );
    wait_for("team-a/sleep enrolled", Duration::from_secs(15), || {
        enrolled(&lab)
            .contains(&"team-a/sleep/sleep".to_string())
            .then_some(())
    });
    // Informational (not asserted): how long the event took to reach the kernel map.
    eprintln!("enrolled {:?} after the pod's status update", started.elapsed());
    let answer = lab.fetch_from(&cgroup, &["-4", &format!("http://{LLM_HOST}/k8s")]);
    assert!(
        answer["peer"].as_str().unwrap().starts_with(NODE_INET_V4),
        "not captured: {answer}"
    );
    let conn = lab.last_connection();
    assert_eq!(conn["principal"], "cluster.local/ns/team-a/sa/sleep");
    assert_eq!(conn["workload"], "sleep");
    assert_eq!(
        enrolled(&lab),
        ["team-a/sleep/sleep"],
        "the other node's pod must not be enrolled"
    );

    // A pod of an unlabelled namespace, enrolled by its own label; another opted out.
    api.apply_ok(
        &node,
        &pod_yaml("team-b", "solo", "node-1", "solo", Some("enabled")),
    );
    api.apply_ok(
        &node,
        &pod_yaml("team-a", "optout", "node-1", "sleep", Some("disabled")),
    );
    for (ns, pod) in [("team-b", "solo"), ("team-a", "optout")] {
        let uid = api.kubectl_ok(
            &node,
            &["-n", ns, "get", "pod", pod, "-o", "jsonpath={.metadata.uid}"],
        );
        make_pod_cgroup(&lab, &uid);
    }
    wait_for(
        "team-b/solo enrolled, optout not",
        Duration::from_secs(15),
        || (enrolled(&lab) == ["team-a/sleep/sleep", "team-b/solo/solo"]).then_some(()),
    );

    // Opting the first pod out by label unenrolls it: its connections go straight out.
    api.kubectl_ok(
        &node,
        &[
            "-n",
            "team-a",
            "label",
            "pod",
            "sleep",
            "llm-egress.io/capture=disabled",
        ],
    );
    wait_for("team-a/sleep unenrolled", Duration::from_secs(15), || {
        (enrolled(&lab) == ["team-b/solo/solo"]).then_some(())
    });
    let answer = lab.fetch_from(&cgroup, &["-4", &format!("http://{LLM_HOST}/direct")]);
    assert!(
        answer["peer"].as_str().unwrap().starts_with(POD_V4),
        "still captured: {answer}"
    );

    // The API server goes away: the enrolled set stays; the agent reports it.
    api.stop_apiserver();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(enrolled(&lab), ["team-b/solo/solo"]);
    // Back: the watch resumes, and changes made now are followed.
    api.restart_apiserver(&node);
    // No kubelet here to finish a graceful deletion: delete at once.
    api.kubectl_ok(
        &node,
        &[
            "-n",
            "team-b",
            "delete",
            "pod",
            "solo",
            "--grace-period=0",
            "--force",
        ],
    );
    api.kubectl_ok(
        &node,
        &["-n", "team-a", "label", "pod", "sleep", "llm-egress.io/capture-"],
    );
    wait_for(
        "the changes after the restart followed",
        Duration::from_secs(20),
        || (enrolled(&lab) == ["team-a/sleep/sleep"]).then_some(()),
    );
    let logs = lab.agent_logs();
    assert!(
        logs.contains("Kubernetes watch failed"),
        "the outage was not reported:\n{logs}"
    );
    assert!(logs.contains("watching the Kubernetes API again"), "{logs}");

    // LLMRoutes from the API add capture targets: a tenant's route for a
    // host no trusted provider serves is never captured, a platform
    // (trusted namespace) route is.
    api.apply_ok(
        &node,
        "apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata: {name: grab, namespace: team-a}\nspec:\n  host: grab.example.test\n  rules: [{backendRefs: [{providerHost: gw.example.test}]}]\n",
    );
    api.apply_ok(
        &node,
        "apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata: {name: extra, namespace: istio-system}\nspec:\n  host: extra.example.test\n  rules: [{backendRefs: [{providerHost: gw.example.test}]}]\n",
    );
    let has_target = |host: &str| {
        lab.status()["targets"]
            .as_array()
            .is_some_and(|a| a.iter().any(|t| t["host"] == host))
    };
    wait_for(
        "the route's host to become a target",
        Duration::from_secs(30),
        || has_target("extra.example.test").then_some(()),
    );
    assert!(
        !has_target("grab.example.test"),
        "a tenant's route captured a host no trusted provider serves"
    );
    assert!(
        lab.agent_logs().contains("LLMRoute team-a/grab"),
        "the refused route was not logged:\n{}",
        lab.agent_logs()
    );
}

async fn wait_status(lab: &GatewayLab, want: StatusCode, what: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = lab.seed_call("agent", &identity("default", "sleep")).await;
        if status == want {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: still {status} {body}\n{}",
            lab.gateway_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_follows_resources_and_key_secret_from_the_api_and_reports_bad_ones() {
    let mut api = ApiServer::start(&HOST);
    install_basics(&api, &HOST, &lax_crds());
    let mut lab = GatewayLab::with_kubernetes(api.kubeconfig(User::Gateway));
    // Not ready without resources and key; then the seed's resources and the Secret.
    api.apply_seed_with_key(&HOST, &lab.api_key);
    let body = wait_status(
        &lab,
        StatusCode::OK,
        "the seed's completion with the key from the Secret",
    )
    .await;
    assert!(body.contains("choices"), "{body}");
    assert_eq!(
        lab.provider_requests().last().unwrap()["authorized"],
        true,
        "the provider did not get the key from the Secret"
    );
    wait_for("the route's status", Duration::from_secs(30), || {
        (accepted(&api, "llmroute", "default", "dashscope-route").0 == "True").then_some(())
    });
    // Writing status is no change of configuration: a new resource is one
    // reload, not a second one for the status the gateway writes on it.
    let reloads = |m: String| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix("llm_egress_gateway_config_reloads_total{result=\"success\"} "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = reloads(lab.admin_get("/metrics").await);
    api.apply_ok(
        &HOST,
        "apiVersion: networking.istio.io/v1beta1\nkind: Gateway\nmetadata: {name: other-gw, namespace: istio-system}\nspec:\n  selector: {istio: ingressgateway}\n  servers: [{hosts: ['*'], port: {number: 80, name: http, protocol: HTTP}}]\n",
    );
    wait_for("the new Gateway's status", Duration::from_secs(30), || {
        (accepted(&api, "gateway", "istio-system", "other-gw").0 == "True").then_some(())
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        reloads(lab.admin_get("/metrics").await),
        before + 1,
        "status writes caused reloads"
    );

    // The seed's DENY applies within moments.
    let deny = std::fs::read_to_string(examples_dir().join("authpolicy.yaml")).unwrap();
    api.apply_ok(&HOST, &deny);
    let body = wait_status(&lab, StatusCode::FORBIDDEN, "the seed's DENY").await;
    assert_eq!(body, "RBAC: access denied");

    // A policy with an unknown action and a route without host: reported on
    // the resource and in the log; the configuration in force stays.
    api.apply_ok(
        &HOST,
        "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: typo, namespace: istio-system}\nspec: {action: MAYBE}\n---\napiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata: {name: hostless, namespace: default}\nspec:\n  rules: [{backendRefs: [{providerHost: x.example}]}]\n",
    );
    let (status, message) = wait_for("the bad policy's status", Duration::from_secs(30), || {
        let a = accepted(&api, "authorizationpolicy", "istio-system", "typo");
        (!a.0.is_empty()).then_some(a)
    });
    assert_eq!(status, "False");
    assert!(message.contains("spec.action"), "{message}");
    let (status, message) = wait_for("the bad route's status", Duration::from_secs(30), || {
        let a = accepted(&api, "llmroute", "default", "hostless");
        (!a.0.is_empty()).then_some(a)
    });
    assert_eq!(status, "False");
    assert!(message.contains("host"), "{message}");
    assert!(
        lab.gateway_logs()
            .contains("AuthorizationPolicy istio-system/typo"),
        "{}",
        lab.gateway_logs()
    );
    assert_eq!(
        lab.seed_call("agent", &identity("default", "sleep")).await.0,
        StatusCode::FORBIDDEN
    );

    // Breaking the DENY itself keeps its last good version in force.
    api.apply_ok(
        &HOST,
        &deny.replace("principals:", "ipBlocks: [10.0.0.0/8]\n        principals:"),
    );
    wait_for("the broken DENY reported", Duration::from_secs(30), || {
        (accepted(&api, "authorizationpolicy", "istio-system", "test").0 == "False").then_some(())
    });
    assert_eq!(
        lab.seed_call("agent", &identity("default", "sleep")).await.0,
        StatusCode::FORBIDDEN,
        "a bad update must not lift the DENY"
    );

    // The API server restarts; changes made afterwards are followed.
    api.restart_apiserver(&HOST);
    api.kubectl_ok(
        &HOST,
        &["-n", "istio-system", "delete", "authorizationpolicy", "test"],
    );
    wait_status(
        &lab,
        StatusCode::OK,
        "the DENY deleted after the API server restart",
    )
    .await;

    // The key Secret is watched: a rotated key is used without a restart.
    let set_key = |key: &str| {
        let patch = format!(r#"{{"stringData": {{"API_KEY": "{key}"}}}}"#);
        api.kubectl_ok(
            &HOST,
            &[
                "-n",
                "istio-system",
                "patch",
                "secret",
                "llm-egress-provider-keys",
                "-p",
                &patch,
            ],
        );
    };
    set_key("sk-rotated-but-wrong");
    wait_status(
        &lab,
        StatusCode::UNAUTHORIZED,
        "the provider refusing the rotated (wrong) key",
    )
    .await;
    set_key(&lab.api_key.clone());
    wait_status(&lab, StatusCode::OK, "the right key back").await;

    // A restarted gateway finds the statuses already written: it rewrites none.
    let version = || {
        api.kubectl_ok(
            &HOST,
            &[
                "-n",
                "default",
                "get",
                "llmroute",
                "dashscope-route",
                "-o",
                "jsonpath={.metadata.resourceVersion}",
            ],
        )
    };
    let before = version();
    if let Some(mut g) = lab.gateway.take() {
        g.stop();
    }
    lab.start_gateway();
    wait_status(&lab, StatusCode::OK, "the restarted gateway").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        version(),
        before,
        "the restarted gateway rewrote a status it found in place"
    );

    let logs = lab.gateway_logs();
    assert!(
        !logs.contains(&lab.api_key),
        "the key leaked into the gateway log"
    );
    assert!(
        !logs.contains("sk-rotated-but-wrong"),
        "the key leaked into the gateway log"
    );
    lab.stop_provider();
}

/// `kubectl auth can-i`; `what` may be `TYPE/NAME` or `TYPE/status`.
fn can_i(api: &ApiServer, who: &str, verb: &str, what: &str, ns: &str) -> bool {
    let mut args = vec!["auth", "can-i", verb, "-n", ns, "--as", who];
    match what.strip_suffix("/status") {
        Some(kind) => args.extend([kind, "--subresource=status"]),
        None => args.push(what),
    }
    let out = api.kubectl(&HOST, &args);
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

#[test]
fn chart_rbac_grants_the_agent_and_gateway_only_what_they_use() {
    let api = ApiServer::start(&HOST);
    install_basics(&api, &HOST, &crds());
    let agent = "system:serviceaccount:llm-egress:llm-egress-agent";
    let gateway = "system:serviceaccount:istio-system:istio-egressgateway-service-account";
    for (who, verb, what, ns, allowed) in [
        (agent, "watch", "pods", "default", true),
        (agent, "list", "namespaces", "default", true),
        (
            agent,
            "watch",
            "llmroutes.istio.alibabacloud.com",
            "default",
            true,
        ),
        (agent, "get", "secrets", "istio-system", false),
        (
            agent,
            "list",
            "llmproviders.istio.alibabacloud.com",
            "istio-system",
            true,
        ),
        (
            agent,
            "create",
            "tokenreviews.authentication.k8s.io",
            "default",
            false,
        ),
        (agent, "patch", "pods", "default", false),
        // The mesh config (CUSTOM providers), by name, in the root namespace only.
        (gateway, "watch", "configmaps/istio", "istio-system", true),
        (gateway, "get", "configmaps/other", "istio-system", false),
        (gateway, "get", "configmaps", "default", false),
        (
            gateway,
            "watch",
            "llmproviders.istio.alibabacloud.com",
            "default",
            true,
        ),
        (
            gateway,
            "watch",
            "authorizationpolicies.security.istio.io",
            "default",
            true,
        ),
        (gateway, "watch", "gateways.networking.istio.io", "default", true),
        (
            gateway,
            "patch",
            "llmroutes.istio.alibabacloud.com/status",
            "default",
            true,
        ),
        (
            gateway,
            "patch",
            "llmroutes.istio.alibabacloud.com",
            "default",
            false,
        ),
        (
            gateway,
            "get",
            "secrets/llm-egress-provider-keys",
            "istio-system",
            true,
        ),
        (gateway, "get", "secrets/other", "istio-system", false),
        (gateway, "list", "secrets", "default", false),
        // Node binding: the pod index and token reviews, nothing more on pods.
        (gateway, "watch", "pods", "default", true),
        (gateway, "patch", "pods", "default", false),
        (
            gateway,
            "create",
            "tokenreviews.authentication.k8s.io",
            "default",
            true,
        ),
        (gateway, "get", "secrets/llm-egress-ca", "istio-system", false),
    ] {
        assert_eq!(
            can_i(&api, who, verb, what, ns),
            allowed,
            "{who} {verb} {what} in {ns}"
        );
    }
}

#[test]
fn generated_crds_make_the_api_server_reject_what_validation_rejects() {
    let api = ApiServer::start(&HOST);
    install_basics(&api, &HOST, &crds());
    for f in SEED_FILES.iter().chain(&["authpolicy.yaml"]) {
        api.apply_ok(&HOST, &std::fs::read_to_string(examples_dir().join(f)).unwrap());
    }
    for (bad, field) in [
        (
            "apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata: {name: hostless}\nspec:\n  rules: [{backendRefs: [{providerHost: x}]}]\n",
            "spec.host",
        ),
        (
            "apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata: {name: ruleless}\nspec: {host: a.example, rules: []}\n",
            "spec.rules",
        ),
        (
            "apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMProvider\nmetadata: {name: keyless}\nspec:\n  host: a.example\n  configs: {defaultConfig: {openAIConfig: {apiKey: ''}}}\n",
            "apiKey",
        ),
        (
            "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: typo}\nspec: {action: MAYBE}\n",
            "spec.action",
        ),
    ] {
        let out = api.apply(&HOST, bad);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted:\n{bad}");
        assert!(err.contains(field), "{field} not named: {err}");
    }
}

#[test]
fn helm_install_creates_the_release_and_leaves_an_existing_istio_system_alone() {
    let api = ApiServer::start(&HOST);
    // Istio was here first.
    api.kubectl_ok(&HOST, &["create", "namespace", "istio-system"]);
    let kubeconfig = api.kubeconfig(User::Admin);
    let helm = |verb: &str| {
        let out = std::process::Command::new(tool("helm"))
            .args([verb, "llm-egress"])
            .arg(chart_dir())
            .args(["--set", "certificates.mode=existingSecrets", "--kubeconfig"])
            .arg(&kubeconfig)
            .output()
            .expect("helm");
        assert!(
            out.status.success(),
            "helm {verb}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    helm("install");
    let get = |args: &[&str]| api.kubectl_ok(&HOST, args);
    assert!(get(&["get", "crd", "llmroutes.istio.alibabacloud.com", "-o", "name"]).contains("llmroutes"));
    assert!(get(&[
        "-n",
        "llm-egress",
        "get",
        "daemonset",
        "llm-egress-agent",
        "-o",
        "name"
    ])
    .contains("daemonset"));
    assert!(get(&[
        "-n",
        "istio-system",
        "get",
        "deployment,service,pdb",
        "-o",
        "name"
    ])
    .contains("istio-egressgateway"));
    // The existing namespace was not adopted (uninstalling must not touch it).
    let ns = get(&[
        "get",
        "namespace",
        "istio-system",
        "-o",
        "jsonpath={.metadata.annotations}",
    ]);
    assert!(!ns.contains("meta.helm.sh/release-name"), "{ns}");
    let ns = get(&[
        "get",
        "namespace",
        "llm-egress",
        "-o",
        "jsonpath={.metadata.labels}",
    ]);
    assert!(ns.contains("llm-egress.io/capture"), "{ns}");
    // An upgrade keeps the namespace it created.
    helm("upgrade");
    assert!(get(&["get", "namespace", "llm-egress", "-o", "name"]).contains("llm-egress"));
}

/// A tenant who administers its own namespace (its Secrets and pods, and
/// cert-manager Certificates and Issuers, as cert-manager's aggregated roles
/// give a namespace admin; there is no controller-manager here to
/// aggregate the built-in `admin` role), cannot obtain an agent or gateway identity: the chart's
/// CA Secrets and Issuers live only in the release namespaces, where the
/// tenant can neither read Secrets nor create Certificates, and there is no
/// ClusterIssuer (cert-manager resolves `kind: Issuer` in the Certificate's
/// own namespace).
#[test]
fn a_tenant_cannot_obtain_an_agent_or_gateway_certificate_from_the_chart_ca() {
    let api = ApiServer::start(&HOST);
    install_basics(&api, &HOST, &crds());
    let rendered = render_chart(&[]);
    assert!(
        !rendered.contains("kind: ClusterIssuer"),
        "the chart renders a ClusterIssuer"
    );
    // The CA Secrets exactly as rendered.
    let ca_secrets: String = rendered
        .split("\n---")
        .filter(|d| d.contains("kind: Secret") && d.contains("name: llm-egress-ca"))
        .map(|d| format!("---{}\n", d.trim_start_matches('-')))
        .collect();
    api.apply_ok(&HOST, &ca_secrets);
    // cert-manager's kinds, so that discovery knows them (schemas do not matter here).
    let crd = |kind: &str, plural: &str, scope: &str| {
        format!(
            "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {{name: {plural}.cert-manager.io}}\nspec:\n  group: cert-manager.io\n  scope: {scope}\n  names: {{kind: {kind}, plural: {plural}, singular: {}}}\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema: {{openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}}}\n---\n",
            kind.to_lowercase()
        )
    };
    api.apply_ok(
        &HOST,
        &[
            crd("Certificate", "certificates", "Namespaced"),
            crd("CertificateRequest", "certificaterequests", "Namespaced"),
            crd("Issuer", "issuers", "Namespaced"),
            crd("ClusterIssuer", "clusterissuers", "Cluster"),
        ]
        .concat(),
    );
    wait_for(
        "cert-manager's kinds to be served",
        Duration::from_secs(30),
        || {
            api.kubectl(&HOST, &["get", "certificates", "-A"])
                .status
                .success()
                .then_some(())
        },
    );
    api.apply_ok(
        &HOST,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: team-a}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: cert-manager-namespace-admin}\nrules:\n- apiGroups: [cert-manager.io]\n  resources: [certificates, issuers, certificaterequests]\n  verbs: ['*']\n- apiGroups: ['']\n  resources: [secrets, pods, configmaps, serviceaccounts]\n  verbs: ['*']\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: dev-certs, namespace: team-a}\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cert-manager-namespace-admin}\nsubjects: [{kind: ServiceAccount, name: dev, namespace: team-a}]\n",
    );
    let tenant = "system:serviceaccount:team-a:dev";
    // The tenant really is an admin of its namespace...
    for (verb, what) in [
        ("create", "certificates.cert-manager.io"),
        ("create", "issuers.cert-manager.io"),
        ("get", "secrets"),
    ] {
        wait_for(
            &format!("the tenant may {verb} {what} in team-a (RBAC cache)"),
            Duration::from_secs(20),
            || can_i(&api, tenant, verb, what, "team-a").then_some(()),
        );
    }
    // ...and nothing more where the CA lives.
    for ns in ["llm-egress", "istio-system"] {
        for (verb, what) in [
            ("create", "certificates.cert-manager.io"),
            ("create", "certificaterequests.cert-manager.io"),
            ("get", "secrets/llm-egress-ca"),
            ("list", "secrets"),
            ("create", "pods"),
        ] {
            assert!(
                !can_i(&api, tenant, verb, what, ns),
                "the tenant may {verb} {what} in {ns}"
            );
        }
    }
    assert!(!can_i(
        &api,
        tenant,
        "create",
        "clusterissuers.cert-manager.io",
        "default"
    ));
    // Neither component can read the CA key either.
    for who in [
        "system:serviceaccount:llm-egress:llm-egress-agent",
        "system:serviceaccount:istio-system:istio-egressgateway-service-account",
    ] {
        for ns in ["llm-egress", "istio-system"] {
            assert!(
                !can_i(&api, who, "get", "secrets/llm-egress-ca", ns),
                "{who} reads the CA in {ns}"
            );
        }
    }
}

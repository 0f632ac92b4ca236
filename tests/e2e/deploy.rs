//! The Helm chart and what is generated from it: `helm lint`, offline
//! schema validation of the rendered manifests and CRDs, the agent's
//! security context, mounts and probes, and the checked-in CRDs and plain
//! manifests matching what the code and chart generate now.

use std::process::Command;

use llm_egress_tests::{env, kube_lab::*};
use serde_json::Value;

fn rendered_docs(set: &[&str]) -> Vec<Value> {
    render_chart(set)
        .split("\n---")
        .filter_map(|d| serde_yaml_ng::from_str::<Value>(d).ok())
        .filter(|v| v.is_object())
        .collect()
}

/// A container's `args` as strings.
fn args_of(container: &Value) -> Vec<&str> {
    container["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(|a| a.as_str())
        .collect()
}

/// Every flag the chart passes (after the subcommand) is one `binary run` has.
fn assert_flags_accepted(binary: &std::path::Path, args: &[&str]) {
    let out = Command::new(binary)
        .args(["run", "--help"])
        .output()
        .expect("run --help");
    let help = String::from_utf8_lossy(&out.stdout);
    for a in &args[1..] {
        let flag = a.split('=').next().unwrap_or(a);
        assert!(help.contains(flag), "{} has no flag {flag}", binary.display());
    }
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind} {name} not rendered"))
}

#[test]
fn chart_passes_helm_lint() {
    let out = Command::new(tool("helm"))
        .args(["lint", "--strict"])
        .arg(chart_dir())
        .output()
        .expect("helm");
    assert!(
        out.status.success(),
        "helm lint: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn rendered_manifests_and_crds_validate_offline() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (name, set) in [
        ("default.yaml", vec![]),
        (
            "existing-secrets.yaml",
            vec!["certificates.mode=existingSecrets", "namespace.create=false"],
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, render_chart(&set)).unwrap();
        files.push(path);
    }
    files.push(chart_dir().join("crds/crds.yaml"));
    files.push(repo_dir().join("deploy/manifests/llm-egress.yaml"));
    for version in ["1.25.0", "1.37.0"] {
        let out = Command::new("kubernetes-validate")
            .args(["--strict", "-k", version])
            .args(&files)
            .output()
            .expect("kubernetes-validate (installed by `cargo xtask setup`)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "kubernetes {version}:\n{text}");
        assert!(
            !text.contains("INVALID") && !text.to_lowercase().contains("error"),
            "{text}"
        );
        // The built-in kinds were really checked, not skipped.
        assert!(text.contains("DaemonSet") || text.contains("daemonset"), "{text}");
    }
}

#[test]
fn agent_daemonset_is_privileged_on_the_host_network_with_bpffs_cgroup_and_probes() {
    let docs = rendered_docs(&[]);
    let ds = find(&docs, "DaemonSet", "llm-egress-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(
        pod["tolerations"][0]["operator"], "Exists",
        "must run on every node"
    );
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["privileged"], true);
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(
        c["resources"]["requests"]["memory"].is_string() && c["resources"]["limits"]["memory"].is_string()
    );
    let mounts: Vec<(&str, &str)> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap(), m["mountPath"].as_str().unwrap()))
        .collect();
    assert!(mounts.contains(&("bpffs", "/sys/fs/bpf")), "{mounts:?}");
    assert!(mounts.contains(&("cgroup", "/host/sys/fs/cgroup")), "{mounts:?}");
    let bpffs_mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "bpffs")
        .unwrap();
    assert_eq!(
        bpffs_mount["mountPropagation"], "Bidirectional",
        "pins must outlive the container"
    );
    let volumes = pod["volumes"].as_array().unwrap();
    let host = |name: &str| volumes.iter().find(|v| v["name"] == name).unwrap()["hostPath"]["path"].clone();
    assert_eq!(host("bpffs"), "/sys/fs/bpf");
    assert_eq!(host("cgroup"), "/sys/fs/cgroup");
    let args = args_of(c);
    assert!(args.contains(&"--kubernetes"), "{args:?}");
    assert!(args.contains(&"--cgroup-root=/host/sys/fs/cgroup"), "{args:?}");
    assert!(args.contains(&"--proxy-advertise=$(NODE_IP):15001"), "{args:?}");
    let env: Vec<(&str, &str)> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?,
                e["valueFrom"]["fieldRef"]["fieldPath"].as_str()?,
            ))
        })
        .collect();
    assert!(env.contains(&("NODE_IP", "status.hostIP")) && env.contains(&("NODE_NAME", "spec.nodeName")));
    // The agent's flags as rendered are flags the agent accepts.
    assert_flags_accepted(&env::agent_bin(), &args);

    // /status and /metrics name the node's workloads: loopback only; the
    // kubelet probes a port that reveals nothing.
    assert!(args.contains(&"--admin=127.0.0.1:15021"), "{args:?}");
    assert!(args.contains(&"--health-listen=0.0.0.0:15022"), "{args:?}");
    assert!(!args.contains(&"--health-metrics"), "{args:?}");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], 15022);
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], 15022);
    assert!(
        ds["spec"]["template"]["metadata"]["annotations"].is_null(),
        "metrics are not exposed by default"
    );
    // A pod-bound token for the gateway's audience binds the agent to its node.
    assert!(
        args.contains(&"--node-token-file=/var/run/secrets/llm-egress/node-token"),
        "{args:?}"
    );
    assert!(
        args.contains(&"--gateway-identity=spiffe://cluster.local/ns/istio-system/sa/istio-egressgateway-service-account"),
        "{args:?}"
    );
    let token = volumes.iter().find(|v| v["name"] == "node-token").unwrap();
    let projected = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(projected["audience"], "llm-egress-gateway");
    assert_eq!(projected["path"], "node-token");
}

#[test]
fn the_chart_ca_is_private_to_the_release_namespaces() {
    let docs = rendered_docs(&[]);
    assert!(
        docs.iter().all(|d| d["kind"] != "ClusterIssuer"),
        "a ClusterIssuer lets anyone who can create a Certificate anywhere mint an agent identity"
    );
    let release_namespaces = ["llm-egress", "istio-system"];
    let issuers: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Issuer").collect();
    assert_eq!(issuers.len(), 2);
    for i in &issuers {
        let ns = i["metadata"]["namespace"].as_str().unwrap();
        assert!(release_namespaces.contains(&ns), "Issuer in {ns}");
        assert_eq!(i["spec"]["ca"]["secretName"], "llm-egress-ca");
    }
    for d in docs.iter().filter(|d| d["kind"] == "Certificate") {
        assert_eq!(d["spec"]["issuerRef"]["kind"], "Issuer", "{d}");
        assert!(release_namespaces.contains(&d["metadata"]["namespace"].as_str().unwrap()));
    }
    // The CA key exists only in the two release namespaces, and the same CA
    // signs both ends (each trusts the other through its own ca.crt).
    let cas: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "Secret" && d["metadata"]["name"] == "llm-egress-ca")
        .collect();
    assert_eq!(cas.len(), 2);
    assert_eq!(cas[0]["data"]["tls.crt"], cas[1]["data"]["tls.crt"]);
    assert_eq!(cas[0]["data"]["ca.crt"], cas[0]["data"]["tls.crt"]);
    // Each render is a new CA: nothing is shared between installations.
    let again = rendered_docs(&[]);
    let ca_again = again
        .iter()
        .find(|d| d["kind"] == "Secret" && d["metadata"]["name"] == "llm-egress-ca")
        .unwrap();
    assert_ne!(ca_again["data"]["tls.key"], cas[0]["data"]["tls.key"]);
}

#[test]
fn gateway_runs_non_root_behind_a_service_and_pdb_with_spiffe_certificates() {
    let docs = rendered_docs(&[]);
    let d = find(&docs, "Deployment", "llm-egress-gateway");
    assert_eq!(d["metadata"]["namespace"], "istio-system");
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        d["spec"]["template"]["metadata"]["labels"]["istio"],
        "egressgateway"
    );
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let args = args_of(c);
    assert_flags_accepted(&env::gateway_bin(), &args);
    assert_eq!(
        find(&docs, "Service", "istio-egressgateway")["spec"]["ports"][0]["port"],
        15008
    );
    assert_eq!(
        find(&docs, "PodDisruptionBudget", "llm-egress-gateway")["spec"]["minAvailable"],
        1
    );
    assert_eq!(
        find(&docs, "Certificate", "llm-egress-gateway")["spec"]["uris"][0],
        "spiffe://cluster.local/ns/istio-system/sa/istio-egressgateway-service-account"
    );
    assert_eq!(
        find(&docs, "Certificate", "llm-egress-gateway")["spec"]["dnsNames"][0],
        "istio-egressgateway.istio-system.svc.cluster.local"
    );
    assert_eq!(
        find(&docs, "Certificate", "llm-egress-agent")["spec"]["uris"][0],
        "spiffe://cluster.local/ns/llm-egress/sa/llm-egress-agent"
    );
    // Secrets: only the key Secret, by name.
    let role = find(&docs, "Role", "llm-egress-gateway-keys");
    assert_eq!(role["rules"][0]["resourceNames"][0], "llm-egress-provider-keys");
    for d in &docs {
        if d["kind"] == "ClusterRole" {
            let text = d.to_string();
            assert!(!text.contains("secrets"), "cluster-wide Secret access: {text}");
            assert!(!text.contains("\"*\""), "wildcard in {text}");
        }
    }
    // Without cert-manager: no Certificate objects.
    let docs = rendered_docs(&["certificates.mode=existingSecrets"]);
    assert!(docs.iter().all(|d| d["kind"] != "Certificate"));
    // Token budgets: by default counted per replica, failing closed; with
    // Redis, its URL (a password) comes from a Secret, never a flag.
    assert!(!c.to_string().contains("BUDGET") && !args.contains(&"--budget-fail-open"));
    let docs = rendered_docs(&[
        "gateway.budgets.redis.urlSecret.name=budget-redis",
        "gateway.budgets.failOpen=true",
    ]);
    let c = &find(&docs, "Deployment", "llm-egress-gateway")["spec"]["template"]["spec"]["containers"][0];
    let redis = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "LLM_EGRESS_BUDGET_REDIS")
        .expect("the Redis URL from its Secret");
    assert_eq!(redis["valueFrom"]["secretKeyRef"]["name"], "budget-redis");
    assert_eq!(redis["valueFrom"]["secretKeyRef"]["key"], "url");
    let args = args_of(c);
    assert!(args.contains(&"--budget-fail-open"), "{args:?}");
    assert_flags_accepted(&env::gateway_bin(), &args);
}

#[test]
fn checked_in_crds_and_manifests_are_what_the_code_and_chart_generate() {
    let out = Command::new(env::gateway_bin()).arg("crds").output().unwrap();
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    let checked_in = std::fs::read_to_string(chart_dir().join("crds/crds.yaml")).unwrap();
    assert!(
        generated == checked_in,
        "deploy/helm/llm-egress/crds/crds.yaml is stale: run `cargo xtask crds`"
    );
    let manifests = std::fs::read_to_string(repo_dir().join("deploy/manifests/llm-egress.yaml")).unwrap();
    assert!(
        !manifests.contains("tls.key: ") && !manifests.contains("name: llm-egress-ca"),
        "the shared plain manifests carry a key"
    );
    assert!(
        manifests == render_chart(&["certificates.mode=existingSecrets"]),
        "deploy/manifests/llm-egress.yaml is stale: run `cargo xtask crds`"
    );
}

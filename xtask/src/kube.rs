//! `cargo xtask crds` (CRDs from the Rust types, plain manifests from the
//! chart) and `cargo xtask kind` (a kind cluster with the images, the chart,
//! the seed's resources and the seed's test).

use std::{path::PathBuf, process::Command};

use anyhow::bail;

use crate::{cargo, output, run};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The values `deploy/manifests/llm-egress.yaml` is rendered with.
pub const PLAIN_MANIFEST_VALUES: &str = "certificates.mode=existingSecrets";

/// Writes `deploy/helm/llm-egress/crds/crds.yaml` and `deploy/manifests/llm-egress.yaml`.
pub fn crds() -> anyhow::Result<()> {
    crate::setup::kubernetes_tools_user()?;
    let crds = output(cargo().args(["run", "-q", "-p", "llm-egress-gateway", "--", "crds"]))?;
    let chart = repo().join("deploy/helm/llm-egress");
    std::fs::write(chart.join("crds/crds.yaml"), crds)?;
    let helm = llm_egress_tests::kube_lab::tool("helm");
    // Plain manifests are shared by everyone who applies them: they must
    // carry no CA key, so they expect Secrets made per cluster (see
    // deploy/README.md) instead of the chart's per-release CA.
    let manifests = output(
        Command::new(helm)
            .args(["template", "llm-egress"])
            .arg(&chart)
            .arg("--include-crds")
            .args(["--set", PLAIN_MANIFEST_VALUES]),
    )?;
    std::fs::write(repo().join("deploy/manifests/llm-egress.yaml"), manifests)?;
    println!("wrote deploy/helm/llm-egress/crds/crds.yaml and deploy/manifests/llm-egress.yaml");
    Ok(())
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

const CLUSTER: &str = "llm-egress";

/// Creates a kind cluster, builds and loads the images, installs the chart
/// (certificates from `llm-egress-gateway certs`, so cert-manager is not
/// needed), the seed's resources and a `sleep` pod, and runs the seed's test.
pub fn kind(keep: bool) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    for tool in ["docker", "kind"] {
        if !have(tool) {
            missing.push(tool);
        }
    }
    if !missing.is_empty() {
        bail!(
            "`cargo xtask kind` needs Docker (an engine that can pull images) and kind (https://kind.sigs.k8s.io); \
             missing here: {}. Install them and run it again. Everything else is tested without them by `cargo xtask test`.",
            missing.join(", ")
        );
    }
    if !Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        bail!("`docker info` fails: start the Docker engine (dockerd) first");
    }
    crate::setup::kubernetes_tools_user()?;
    let kubectl = llm_egress_tests::kube_lab::tool("kubectl");
    let helm = llm_egress_tests::kube_lab::tool("helm");
    let root = repo();
    let script = root.join("deploy/kind/run-seed-test.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .env("KUBECTL", &kubectl)
        .env("HELM", &helm)
        .env("CLUSTER", CLUSTER)
        .env("KEEP_CLUSTER", if keep { "1" } else { "0" })
        .current_dir(&root);
    run(&mut cmd)
}

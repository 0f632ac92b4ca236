//! `cargo xtask node`: a real Kubernetes node on this machine (kubelet,
//! containerd, the control plane), the project's images built here without
//! a registry, and the seed's scenario through the Helm-installed chart.

use std::{path::PathBuf, process::Command};

use anyhow::bail;
use llm_egress_tests::node_lab::{self, Node};

use crate::{cargo, run};

#[derive(clap::Subcommand)]
pub enum NodeCmd {
    /// Build the images, bring the node up and leave it running (prints the kubeconfig).
    Up,
    /// Run the seed's scenario (deploy/scenario/seed.sh) on the running node.
    Seed,
    /// Stop the node and restore the machine (sysctls, mounts, cgroups, namespaces); also tears down nodes left by killed runs.
    Down,
    /// Up, the seed's scenario, down: what `cargo xtask test` proves.
    Run,
}

/// Static builds of the agent, gateway and test provider: the same
/// binaries as the final stages of deploy/docker/*.Dockerfile.
pub fn static_binaries() -> anyhow::Result<()> {
    println!("==> static binaries for the node's images");
    run(cargo()
        .args(["build", "--target", "x86_64-unknown-linux-gnu"])
        .args([
            "-p",
            "llm-egress-agent",
            "-p",
            "llm-egress-gateway",
            "-p",
            "llm-egress-tests",
            "--bins",
        ])
        .args([
            "--config",
            r#"target.x86_64-unknown-linux-gnu.rustflags=["-C","target-feature=+crt-static"]"#,
        ]))
}

/// Everything a node needs before it starts: packages, Kubernetes
/// components (built once), static binaries and the images.
pub fn prepare() -> anyhow::Result<()> {
    crate::setup::node_tools()?;
    crate::setup::setup(crate::setup::Need::Tests)?;
    crate::build_bins()?;
    images()
}

/// The node's images, from static builds of the project's binaries.
pub fn images() -> anyhow::Result<()> {
    static_binaries()?;
    println!("==> images (umoci + skopeo, no registry)");
    let pause = llm_egress_tests::kube_lab::apiserver_dir().join("pause");
    run(Command::new("bash")
        .arg(repo().join("xtask/scripts/node-images.sh"))
        .arg(node_lab::images_dir())
        .arg(node_lab::static_bin_dir())
        .arg(pause))
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn node(cmd: NodeCmd) -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!("the node fixture needs root (namespaces, cgroups, containerd): run `sudo -E cargo xtask node ...`");
    }
    let state = node_lab::default_state_dir();
    match cmd {
        NodeCmd::Up => {
            prepare()?;
            let node = Node::up(&state)?;
            let kubeconfig = node.kubeconfig.clone();
            node.keep()?;
            println!(
                "node is up; use it with:\n  export KUBECONFIG={}\n  {} get nodes\nstop it with `cargo xtask node down`",
                kubeconfig.display(),
                llm_egress_tests::kube_lab::tool("kubectl").display()
            );
            Ok(())
        }
        NodeCmd::Seed => {
            crate::build_bins()?;
            let node = Node::existing(&state)?;
            let out = node.seed()?;
            if !out.status.success() {
                bail!("the seed's scenario failed ({})", out.status);
            }
            Ok(())
        }
        NodeCmd::Down => {
            // First what nothing keeps any more (a killed test's node, a
            // kept node whose daemons died, a node from before a restart):
            // those need more care than a plain teardown.
            let reclaimed = node_lab::reclaim_stale_nodes()?;
            for s in &reclaimed {
                println!("tore down the stale node in {}", s.display());
            }
            if state.join("up").exists() {
                let mut node = Node::existing(&state)?;
                return node.down();
            }
            if let Some(left) = node_lab::nodes_up().first() {
                bail!(
                    "no node is up in {}, but one is running in {}: tests own their nodes and stop them when they end",
                    state.display(),
                    left.display()
                );
            }
            if reclaimed.is_empty() {
                println!("no node is up in {}", state.display());
            }
            Ok(())
        }
        NodeCmd::Run => {
            prepare()?;
            let mut node = Node::up(&state)?;
            let out = node.seed();
            let down = node.down();
            let out = out?;
            if !out.status.success() {
                bail!("the seed's scenario failed ({})", out.status);
            }
            down
        }
    }
}

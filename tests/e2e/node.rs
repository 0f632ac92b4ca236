//! The chart as users install it, on a real kubelet node on this machine:
//! containerd runs the project's images (built here, no registry), the
//! Helm-installed DaemonSet captures real pods' connections with eBPF, the
//! Deployment serves behind its Service, and the seed's scenario
//! (deploy/scenario/seed.sh, shared with `cargo xtask kind`) passes. Then
//! the node is torn down and the machine must be as it was.

use llm_egress_tests::{
    env,
    node_lab::{agent_cgroup_root, nodes_up, reclaim_stale_nodes, MachineState, Node},
};

/// Directories named `pod<uid>` below `root`, at any depth.
fn pod_cgroups(root: &std::path::Path, found: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        if e.path().is_dir() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(uid) = name.strip_prefix("pod") {
                found.push(uid.to_string());
            }
            pod_cgroups(&e.path(), found);
        }
    }
}

#[test]
fn seed_scenario_through_the_helm_chart_on_a_real_kubelet_node_leaves_no_trace() {
    env::require_root();
    // A run killed half-way (or a machine stopped under it) leaves its node
    // behind: that must not fail this run, and it is torn down first.
    let reclaimed = reclaim_stale_nodes().expect("tearing down stale nodes");
    if !reclaimed.is_empty() {
        println!("tore down stale nodes: {reclaimed:?}");
    }
    let before = MachineState::read();
    assert!(
        before.cgroups.is_empty() && !before.links.iter().any(|l| l.starts_with("llmeg-h")),
        "a node is running on this machine (state in {:?}): stop it with `cargo xtask node down`",
        nodes_up()
    );
    let state = tempfile::Builder::new()
        .prefix("llm-egress-node")
        .tempdir_in("/tmp")
        .expect("state dir");
    let mut node = Node::up(state.path()).expect("the node comes up");
    let seed = node.seed().expect("running the scenario");
    let stdout = String::from_utf8_lossy(&seed.stdout).into_owned();
    // The recreated pod was followed while its predecessor's cgroup2
    // directory stayed behind (the kubelet leaves it): the case the agent
    // must not be confused by did happen.
    let mut cgroups = Vec::new();
    pod_cgroups(&agent_cgroup_root(), &mut cgroups);
    let old_uid = stdout
        .lines()
        .find_map(|l| l.strip_prefix("old pod "))
        .and_then(|l| l.split(',').next())
        .map(str::to_string);
    let down = node.down();
    assert!(
        seed.status.success() && stdout.contains("PASS: the seed's scenario passed"),
        "the seed's scenario failed on the node (its output is above)"
    );
    let old_uid = old_uid.expect("the scenario names the recreated pod's old UID");
    assert!(
        cgroups.contains(&old_uid),
        "the deleted pod's cgroup directory (pod{old_uid}) was expected to stay behind; pod cgroups seen: {cgroups:?}"
    );
    down.expect("the node tears down without leaving anything behind");
    let after = MachineState::read();
    assert_eq!(before.sysctls, after.sysctls, "sysctls not restored");
    assert_eq!(before.iptables, after.iptables, "the host's iptables changed");
    assert_eq!(before.mounts, after.mounts, "mounts left behind");
    assert_eq!(before.links, after.links, "network interfaces left behind");
    assert_eq!(before.netns, after.netns, "network namespaces left behind");
    assert_eq!(before.cgroups, after.cgroups, "cgroups left behind");
    assert_eq!(
        before.var_dirs, after.var_dirs,
        "directories under /var left behind"
    );
    assert_eq!(
        before.node_processes, after.node_processes,
        "node processes left running"
    );
}

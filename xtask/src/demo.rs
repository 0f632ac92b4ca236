//! `cargo xtask demo`: capture on one machine. A "pod" (network namespace +
//! cgroup, enrolled as default/sleep) calls an LLM host by name over plain
//! HTTP; the node agent's eBPF programs redirect the connection to the
//! agent, which knows the original destination and the workload identity.
//! Everything it creates is removed at the end, also on failure or Ctrl-C.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::bail;
use llm_egress_tests::{
    process::{self, Place},
    topology::{CaptureLab, ADMIN, LLM_HOST, NODE_INET_V4},
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn step(title: &str) -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    println!("\n=== {title}");
    Ok(())
}

pub fn run_demo() -> anyhow::Result<()> {
    step("Creating a node, a pod (default/sleep) and an internet host in network namespaces")?;
    let mut lab = CaptureLab::new();
    println!(
        "    pod {} → node {} → internet (203.0.113.10 = {LLM_HOST}); no route leaves them",
        lab.pod.name, lab.node.name
    );

    step("Starting the node agent with real eBPF (connect4/connect6/sock_ops)")?;
    lab.start_agent();
    println!("    llm-egress-agent {}", lab.agent_args().join(" "));

    step(&format!(
        "In the pod: curl http://{LLM_HOST}/compatible-mode/v1/chat/completions"
    ))?;
    let answer = lab.fetch_from(
        &lab.sleep_cgroup,
        &[
            "-4",
            &format!("http://{LLM_HOST}/compatible-mode/v1/chat/completions"),
        ],
    );
    println!("    the internet host answered: {answer}");
    let peer = answer["peer"].as_str().unwrap_or("");
    if peer.starts_with(NODE_INET_V4) {
        println!("    it saw the node agent ({peer}), not the pod: the connection was captured");
    } else {
        bail!("the connection was not captured (the internet host saw {peer})");
    }

    step("What the agent knows (llm-egress-agent status)")?;
    let out = process::run(
        &Place {
            netns: Some(&lab.node),
            cgroup: None,
        },
        llm_egress_tests::env::agent_bin()
            .to_str()
            .unwrap_or("llm-egress-agent"),
        &["status", "--admin", ADMIN],
        Duration::from_secs(10),
    );
    print!("{}", String::from_utf8_lossy(&out.stdout));

    step("A process in a cgroup that is not enrolled is left alone")?;
    let answer = lab.fetch_from(&lab.other_cgroup, &["-4", &format!("http://{LLM_HOST}/")]);
    println!(
        "    the internet host saw {} (the pod itself): not captured",
        answer["peer"].as_str().unwrap_or("?")
    );

    step("Agent stopped: capture stays pinned and fails closed")?;
    lab.stop_agent();
    let out = lab.curl_in(
        &lab.pod,
        Some(&lab.sleep_cgroup),
        &["-sS", "-4", &format!("http://{LLM_HOST}/")],
    );
    println!("    curl: {}", String::from_utf8_lossy(&out.stderr).trim());

    step("Cleaning up")?;
    drop(lab);
    println!("    done. The gateway (keys, policy) comes next: see the README.");
    Ok(())
}

pub fn run() -> anyhow::Result<()> {
    // SAFETY: the handler only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    run_demo()
}

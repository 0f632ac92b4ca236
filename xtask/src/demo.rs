//! `cargo xtask demo`: the seed document, replayed on one machine with real
//! eBPF. A "pod" (network namespace + cgroup, enrolled as default/sleep)
//! with no key and no sidecar runs the seed's curl; the node agent captures
//! it and tunnels it over mTLS to the egress gateway, which holds the key,
//! applies the seed's AuthorizationPolicy and calls a local
//! OpenAI-compatible provider answering as dashscope.aliyuncs.com.
//! Everything is removed at the end, also on failure or Ctrl-C.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use llm_egress_tests::{
    gateway_lab::examples_dir,
    process::{self, Place},
    topology::{CaptureLab, ADMIN},
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn step(n: &str, title: &str) -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        println!("\n\x1b[1m{n}  {title}\x1b[0m");
    } else {
        println!("\n{n}  {title}");
    }
    Ok(())
}

const SEED_CURL: &str = "curl --location 'http://dashscope.aliyuncs.com' --header 'Content-Type: application/json' --data '{\"messages\": [{\"role\": \"user\", \"content\": \"Tell me about yourself\"}]}'";

fn seed_until(lab: &CaptureLab, want: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, out, err) = lab.seed_curl(&lab.sleep_cgroup, &[]);
        let out = if out.is_empty() { err } else { out };
        if want(&out) || Instant::now() > deadline || INTERRUPTED.load(Ordering::SeqCst) {
            return out;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn run_demo() -> anyhow::Result<()> {
    step(
        "0.",
        "Setting up: namespaces, certificates, provider, gateway, agent",
    )?;
    let mut lab = CaptureLab::new();
    lab.start_mesh();
    println!(
        "   pod      {}  default/sleep, cgroup {}",
        lab.pod.name,
        lab.sleep_cgroup.display()
    );
    println!(
        "   node     {}  llm-egress-agent (eBPF connect4/connect6/sock_ops, tunnel to the gateway)",
        lab.node.name
    );
    println!(
        "   gateway  {}  llm-egress-gateway with deploy/examples: Gateway, LLMProvider, LLMRoute",
        lab.gw.name
    );
    println!(
        "   internet {}  OpenAI-compatible HTTPS provider as dashscope.aliyuncs.com (203.0.113.10)",
        lab.internet.name
    );
    println!("   no route leaves these namespaces; the API key lives only in the gateway's environment");

    step("1.", "Seed Step 4, in the pod:")?;
    println!("   $ {SEED_CURL}");
    let out = seed_until(&lab, |o| o.contains("chat.completion"));
    println!("   {out}");
    if !out.contains("chat.completion") {
        bail!("no completion: {out}\ngateway log:\n{}", lab.gateway_logs());
    }
    let seen = lab.provider_requests();
    let last = seen.last().context("the provider saw no request")?;
    println!(
        "   the provider saw POST {} with model {} and stream {}, authorized with the gateway's key: {}",
        last["path"], last["body"]["model"], last["body"]["stream"], last["authorized"]
    );

    step(
        "2.",
        "Seed Step 5: apply the AuthorizationPolicy (DENY sleep → dashscope) and run the same curl",
    )?;
    lab.apply(
        "authpolicy.yaml",
        &std::fs::read_to_string(examples_dir().join("authpolicy.yaml"))?,
    );
    let out = seed_until(&lab, |o| o == "RBAC: access denied");
    println!("   {out}");
    if out != "RBAC: access denied" {
        bail!("expected RBAC: access denied, got {out}");
    }

    step("3.", "The key never reached the pod")?;
    let env_out = process::run(
        &Place {
            netns: Some(&lab.pod),
            cgroup: Some(&lab.sleep_cgroup),
        },
        "env",
        &[],
        Duration::from_secs(5),
    );
    let pod_env = String::from_utf8_lossy(&env_out.stdout);
    let pod_files = std::fs::read_dir(&lab.pod.etc)
        .map(|rd| {
            rd.flatten()
                .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                .collect::<String>()
        })
        .unwrap_or_default();
    let (_, responses, _) = lab.seed_curl(&lab.sleep_cgroup, &["--include"]);
    let mut leaked = Vec::new();
    for (what, text) in [
        ("pod environment", pod_env.as_ref()),
        ("pod files", pod_files.as_str()),
        ("responses", responses.as_str()),
        ("agent log", lab.agent_logs().as_str()),
        ("gateway log", lab.gateway_logs().as_str()),
    ] {
        let found = text.contains(&lab.api_key);
        println!(
            "   {what:<16} {}",
            if found { "CONTAINS THE KEY" } else { "no key" }
        );
        if found {
            leaked.push(what);
        }
    }
    if !leaked.is_empty() {
        bail!("the key leaked into {leaked:?}");
    }

    step("4.", "Where to look")?;
    let agent_status = process::run(
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
    println!("   agent: llm-egress-agent status (admin {ADMIN} in the node namespace)");
    for line in String::from_utf8_lossy(&agent_status.stdout).lines().take(14) {
        println!("     {line}");
    }
    let metrics = lab.gateway_metrics();
    println!("   gateway: /metrics on 127.0.0.1:15020 in the gateway namespace");
    for line in metrics.lines().filter(|l| {
        l.starts_with("llm_egress_gateway_requests_total") || l.starts_with("gen_ai_client_token_usage_sum")
    }) {
        println!("     {line}");
    }

    step("5.", "Cleaning up")?;
    drop(lab);
    println!("   namespaces, cgroups, bpffs and processes removed. Tests: cargo xtask test");
    Ok(())
}

pub fn run() -> anyhow::Result<()> {
    // SAFETY: the handler only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    run_demo()
}

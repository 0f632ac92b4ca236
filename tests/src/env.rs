//! Where the binaries are, and the preconditions of the end-to-end tests.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// The end-to-end tests need root (eBPF, namespaces, cgroups). Fails the
/// test with an explanation instead of silently passing.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "end-to-end tests need root (eBPF, network namespaces, cgroups): run `cargo xtask test` as root"
    );
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// The agent binary: `LLM_EGRESS_AGENT_BIN`, or the debug build.
pub fn agent_bin() -> PathBuf {
    let path = std::env::var_os("LLM_EGRESS_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir().join("llm-egress-agent"));
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build -p llm-egress-agent`) or run `cargo xtask test`",
        path.display()
    );
    path
}

/// A short id unique to this process and call, for names of namespaces,
/// cgroups and mounts (interface names must stay under 16 bytes).
pub fn unique_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{:x}{n}", std::process::id() % 0xffff)
}

/// A binary of this crate (built alongside its integration tests).
pub fn tests_bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build -p llm-egress-tests`) or run `cargo xtask test`",
        path.display()
    );
    path
}

/// The gateway binary: `LLM_EGRESS_GATEWAY_BIN`, or the debug build.
pub fn gateway_bin() -> PathBuf {
    let path = std::env::var_os("LLM_EGRESS_GATEWAY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir().join("llm-egress-gateway"));
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build -p llm-egress-gateway`) or run `cargo xtask test`",
        path.display()
    );
    path
}

/// A loopback address of its own for each call (all of 127/8 is local), so
/// that parallel tests can each bind the same ports.
pub fn loopback_ip() -> std::net::Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::net::Ipv4Addr::new(
        127,
        100 + (std::process::id() % 100) as u8,
        (n / 250) as u8,
        (n % 250 + 1) as u8,
    )
}

/// Where the binaries are: `LLM_EGRESS_BIN_DIR` (benchmarks use a release
/// build), or the debug build.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("LLM_EGRESS_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("debug"))
}

/// A virtual environment holding the official OpenAI Python SDK, made by
/// `cargo xtask setup`.
pub fn openai_venv() -> PathBuf {
    cache_dir().join("openai-venv")
}

/// `~/.cache/llm-egress`: what setup installs once per machine.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
        .join(".cache/llm-egress")
}

/// The venv's Python, with a clear error when setup has not made it.
pub fn openai_python() -> PathBuf {
    let python = openai_venv().join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `cargo xtask setup` (it installs the OpenAI SDK into a virtual environment)",
        python.display()
    );
    python
}

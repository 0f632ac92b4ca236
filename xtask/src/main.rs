//! `cargo xtask …`: the commands a newcomer runs. Each does its own setup.

mod demo;
mod setup;

use std::process::Command;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "llm-egress developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what this machine lacks for building and testing (idempotent).
    Setup,
    /// Build the kernel programs and the agent that embeds them.
    BuildEbpf,
    /// Run the unit tests, then the end-to-end tests (as root).
    Test {
        /// Only the unit tests (no root needed).
        #[arg(long)]
        unit: bool,
        /// Passed to the test binaries, e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Show capture working on this machine: a pod, a node agent, an internet host.
    Demo,
}

pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn build_bins() -> anyhow::Result<()> {
    run(cargo().args([
        "build",
        "-p",
        "llm-egress-agent",
        "-p",
        "llm-egress-tests",
        "--bins",
    ]))
}

fn test(unit: bool, args: Vec<String>) -> anyhow::Result<()> {
    setup::setup(!unit)?;
    println!("==> unit tests");
    run(cargo()
        .args([
            "test",
            "--workspace",
            "--exclude",
            "llm-egress-ebpf",
            "--exclude",
            "llm-egress-tests",
        ])
        .args(["--features", "llm-egress-common/user", "--"])
        .args(&args))?;
    if unit {
        return Ok(());
    }
    if !is_root() {
        bail!("the end-to-end tests need root (eBPF, network namespaces, cgroups): run `sudo -E cargo xtask test`, or `cargo xtask test --unit` for the unit tests only");
    }
    println!("==> end-to-end tests (real eBPF, network namespaces, cgroups)");
    build_bins()?;
    run(cargo().args(["test", "-p", "llm-egress-tests", "--"]).args(&args))
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::setup(true),
        Cmd::BuildEbpf => {
            setup::setup(false)?;
            run(cargo().args(["build", "-p", "llm-egress-agent"]))
        }
        Cmd::Test { unit, args } => test(unit, args),
        Cmd::Demo => {
            setup::setup(true)?;
            if !is_root() {
                bail!(
                    "the demo needs root (eBPF, network namespaces, cgroups): run `sudo -E cargo xtask demo`"
                );
            }
            build_bins()?;
            demo::run()
        }
    }
}

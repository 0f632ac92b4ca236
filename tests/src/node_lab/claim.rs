//! Who a node belongs to, and what happens to one nobody keeps.
//!
//! A node acts on names that are global to the machine (its network
//! namespace, its cgroup root, sysctls, directories under /var), so there is
//! at most one, and a run killed half-way (or a machine stopped under it)
//! leaves one behind that would fail every later run. A node records its
//! owner and the boot it came up in; one whose owner is gone is torn down
//! by the next command that needs the machine. Everything that changes the
//! machine's node (reclaim, up, down) holds one lock.
//!
//! Teardown runs as root on what a state directory holds (pids it kills,
//! directories it removes, sysctls it writes), and state directories live
//! in /tmp, which every user can write: only a private directory of this
//! user is ever acted on, and only pids that are still the node's daemons
//! are killed.

use std::{
    fs::File,
    os::unix::{fs::MetadataExt, io::AsRawFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

/// Every node's state directory is `/tmp/<STATE_PREFIX>*`: the default one
/// and the tests' temporary ones.
pub(super) const STATE_PREFIX: &str = "llm-egress-node";

/// Names the process that owns a node: `<pid> <start time>`. The start time
/// (field 22 of /proc/PID/stat) tells a reused pid from the owner.
pub(super) const OWNER_FILE: &str = "owner";

/// The boot the node came up in: after a restart, nothing of it is left in
/// the kernel, and its pids and saved state mean nothing.
pub(super) const BOOT_FILE: &str = "boot-id";

/// Commands of the node's daemons and shims (as /proc/PID/comm shows them).
pub(super) const NODE_COMMANDS: [&str; 9] = [
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

const LOCK_FILE: &str = "/run/llm-egress-node.lock";

/// How long a node command waits for another one to finish with the
/// machine (bringing a node up takes a minute or two).
const LOCK_DEADLINE: Duration = Duration::from_secs(600);

/// When `pid` started, in clock ticks since boot; None if it is not running.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: count from after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// A running process, as an owner file names it.
pub(super) fn owner_line(pid: u32) -> Option<String> {
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

/// This boot of the machine.
pub(super) fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|b| b.trim().to_string())
        .unwrap_or_default()
}

/// Whether the node in `state` came up before the machine last started.
fn from_another_boot(state: &Path) -> bool {
    match std::fs::read_to_string(state.join(BOOT_FILE)) {
        Ok(id) => id.trim() != boot_id(),
        // Nodes older than the boot file: assume this boot.
        Err(_) => false,
    }
}

/// Whether `pid` is one of the node's daemons (a reused pid is not).
fn is_node_daemon(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{}/comm", pid.trim()))
        .is_ok_and(|c| NODE_COMMANDS.iter().any(|n| c.trim().starts_with(n)))
}

/// The daemons' pid files (`STATE/pids/*`).
fn pid_files(state: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(state.join("pids"))
        .map(|d| d.flatten().map(|f| f.path()).collect())
        .unwrap_or_default()
}

/// Forgets the pid files that no longer name one of the node's daemons
/// (the daemon died and its pid may be another program's now): teardown
/// kills the pids it finds.
pub(super) fn forget_reused_pids(state: &Path) {
    for f in pid_files(state) {
        if !is_node_daemon(&std::fs::read_to_string(&f).unwrap_or_default()) {
            let _ = std::fs::remove_file(&f);
        }
    }
}

/// Whether any daemon the node started still runs.
fn daemons_alive(state: &Path) -> bool {
    pid_files(state)
        .iter()
        .any(|f| is_node_daemon(&std::fs::read_to_string(f).unwrap_or_default()))
}

/// A node is stale when nothing keeps it: the process that owns it is gone
/// (a killed test run, a stopped machine), or, for a node the user kept,
/// none of its daemons runs. An owner that is alive keeps its node even
/// before the daemons start.
pub(super) fn is_stale(state: &Path) -> bool {
    if from_another_boot(state) {
        return true;
    }
    match std::fs::read_to_string(state.join(OWNER_FILE)) {
        Ok(owner) => !owner_alive(&owner),
        Err(_) => !daemons_alive(state),
    }
}

/// Whether `state` may be trusted as a node's state: a real directory (not
/// a link) that only this user owns and can write.
pub fn trusted_state_dir(state: &Path) -> Result<(), String> {
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

/// Held while a process changes the machine's node; released on drop.
pub(super) struct MachineLock(#[allow(dead_code)] File);

/// Waits (up to a deadline) until no other process changes the machine's node.
pub(super) fn lock_machine() -> anyhow::Result<MachineLock> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_FILE)
        .with_context(|| format!("opening {LOCK_FILE} (the node fixture needs root)"))?;
    let deadline = Instant::now() + LOCK_DEADLINE;
    loop {
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(MachineLock(file));
        }
        if Instant::now() > deadline {
            bail!(
                "another node command has held {LOCK_FILE} for {} s: wait for it, or stop it",
                LOCK_DEADLINE.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Tears down the stale nodes on this machine, so that a run killed
/// half-way does not fail every later one. Teardown works on the node's
/// global names, so while any node is kept alive nothing is touched.
/// Returns the state directories it reclaimed.
pub fn reclaim_stale_nodes() -> anyhow::Result<Vec<PathBuf>> {
    let _lock = lock_machine()?;
    reclaim_locked()
}

pub(super) fn reclaim_locked() -> anyhow::Result<Vec<PathBuf>> {
    let up = nodes_up();
    if up.iter().any(|s| !is_stale(s)) {
        return Ok(Vec::new());
    }
    for state in &up {
        if from_another_boot(state) {
            // The kernel's part went with the restart; what its saved
            // state names (pids, directories under /run) may belong to
            // others now. Only the record is removed.
            eprintln!(
                "node: {} is from before the machine restarted: removing its record only",
                state.display()
            );
            std::fs::remove_dir_all(state).with_context(|| format!("removing {}", state.display()))?;
            continue;
        }
        eprintln!(
            "node: tearing down a stale node in {} (its owner or its daemons are gone)",
            state.display()
        );
        super::teardown(
            state,
            &format!("tearing down the stale node in {}", state.display()),
        )?;
        // A test's temporary directory has no owner left to remove it.
        if *state != super::default_state_dir() {
            let _ = std::fs::remove_dir_all(state);
        }
    }
    Ok(up)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// A process that has exited and been reaped, as an owner file would
    /// have named it while it ran.
    fn gone_owner() -> String {
        let mut child = Command::new("sleep").arg("60").spawn().expect("spawning sleep");
        let line = owner_line(child.id()).expect("a running child has a start time");
        assert!(owner_alive(&line), "the child is alive when named");
        let _ = child.kill();
        child.wait().expect("reaping sleep");
        line
    }

    /// A running process whose command name is `name` (a link to sleep).
    fn running_as(dir: &Path, name: &str) -> std::process::Child {
        let exe = dir.join(name);
        // A link, not a copy: a copy still open for writing in a thread
        // that forks meanwhile cannot be run (ETXTBSY).
        std::os::unix::fs::symlink("/bin/sleep", &exe).expect("linking sleep");
        let child = Command::new(&exe)
            .arg("60")
            .stdout(Stdio::null())
            .spawn()
            .expect("starting sleep as a daemon");
        // spawn returns once the exec has begun, and the kernel renames the
        // process a little later: wait for the name.
        let comm = format!("/proc/{}/comm", child.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&comm).unwrap_or_default().trim() != name {
            assert!(Instant::now() < deadline, "{name} never got its name");
            std::thread::yield_now();
        }
        child
    }

    fn node_state(owner: Option<String>, daemon_pid: Option<u32>) -> tempfile::TempDir {
        let state = tempfile::tempdir().expect("tempdir");
        std::fs::write(state.path().join("up"), "").expect("up");
        std::fs::write(state.path().join(BOOT_FILE), boot_id()).expect("boot id");
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
        assert!(!owner_alive(&gone_owner()));
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
        let state = node_state(owner_line(std::process::id()), None);
        assert!(!is_stale(state.path()));
    }

    #[test]
    fn a_node_whose_owner_is_gone_is_stale_even_with_daemons_running() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut kubelet = running_as(dir.path(), "kubelet");
        let state = node_state(Some(gone_owner()), Some(kubelet.id()));
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

    #[test]
    fn teardown_is_left_only_the_pids_that_are_still_daemons() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut kubelet = running_as(dir.path(), "kubelet");
        let mut other = running_as(dir.path(), "not-a-daemon");
        let state = node_state(None, Some(kubelet.id()));
        let pids = state.path().join("pids");
        std::fs::write(pids.join("etcd"), other.id().to_string()).expect("pid");
        std::fs::write(pids.join("containerd"), "garbage").expect("pid");
        forget_reused_pids(state.path());
        let mut left: Vec<String> = std::fs::read_dir(&pids)
            .expect("pids")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        for child in [&mut kubelet, &mut other] {
            let _ = child.kill();
            let _ = child.wait();
        }
        assert_eq!(left, ["kubelet"]);
    }

    #[test]
    fn a_node_from_before_a_restart_is_stale_whatever_runs_under_its_pids() {
        let state = node_state(owner_line(std::process::id()), None);
        assert!(!is_stale(state.path()));
        std::fs::write(state.path().join(BOOT_FILE), "another-boot").expect("boot id");
        assert!(is_stale(state.path()));
    }

    #[test]
    fn one_process_at_a_time_holds_the_machine() {
        let held = lock_machine().expect("the lock is free");
        // SAFETY: flock on a descriptor this test owns.
        let other = File::options()
            .write(true)
            .open(LOCK_FILE)
            .expect("the lock file exists");
        let taken = unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_ne!(taken, 0, "a second holder got the lock");
        drop(held);
        let taken = unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(taken, 0, "the lock is free once dropped");
    }
}

//! A private cgroup v2 subtree and a private bpffs per test.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::netns::sh;

/// Finds the cgroup v2 mount (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified`).
pub fn cgroup2_mount() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("reading /proc/self/mounts");
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
            (kind == "cgroup2").then(|| PathBuf::from(dir))
        })
        .expect("no cgroup2 filesystem is mounted; the tests need cgroup v2")
}

/// A cgroup directory that is removed (with its children) on drop.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(path: PathBuf) -> TestCgroup {
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        TestCgroup { path }
    }

    pub fn child(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", p.display()));
        p
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path());
            }
        }
    }
    // Kill what is left so that the directory can go.
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|p| p.parse::<i32>().ok()) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_tree(&self.path);
    }
}

/// A bpffs mounted on a fresh temporary directory, unmounted on drop (which
/// also drops every pin in it).
pub struct Bpffs {
    pub dir: tempfile::TempDir,
}

impl Bpffs {
    pub fn new() -> Bpffs {
        let dir = tempfile::Builder::new()
            .prefix("llm-egress-bpffs")
            .tempdir()
            .expect("tempdir");
        sh(&format!("mount -t bpf bpf {}", dir.path().display()));
        Bpffs { dir }
    }

    /// The pin directory to give the agent.
    pub fn pins(&self) -> PathBuf {
        self.dir.path().join("llm-egress")
    }
}

impl Default for Bpffs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).output();
    }
}

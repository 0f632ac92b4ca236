//! Checks run before touching the kernel, so that a user sees what is wrong
//! with the host (and what to do) instead of a raw errno from bpf(2).

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("missing capabilities: the agent needs CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN; run it as root or grant them (in Kubernetes: privileged: true)")]
    Capabilities,
    #[error("this kernel has no BPF support (/proc/sys/kernel/unprivileged_bpf_disabled is missing); the agent needs CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF")]
    NoBpf,
    #[error("cgroup root {0} does not exist; pass the cgroup v2 mount with --cgroup-root (often /sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts)")]
    CgroupRootMissing(PathBuf),
    #[error("cgroup root {0} is a cgroup v1 hierarchy; the agent needs cgroup v2: pass the cgroup2 mount (on hybrid hosts /sys/fs/cgroup/unified)")]
    CgroupV1(PathBuf),
    #[error("cgroup root {0} is not on a cgroup2 filesystem; pass the cgroup v2 mount (see `mount -t cgroup2`), e.g. /sys/fs/cgroup/unified on hybrid hosts")]
    NotCgroup2(PathBuf),
    #[error("no bpffs is mounted at {0}: mount one (`mount -t bpf bpf {0}`) or, in a DaemonSet, mount the host's /sys/fs/bpf; pinned programs keep capture in place across agent restarts")]
    BpffsNotMounted(PathBuf),
    #[error("cannot mount a bpffs at {path}: {source}")]
    MountBpffs { path: PathBuf, source: std::io::Error },
    #[error("cannot inspect {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl PreflightError {
    /// Exit codes: 3 = permissions, 4 = host environment.
    pub fn exit_code(&self) -> i32 {
        match self {
            PreflightError::Capabilities => 3,
            _ => 4,
        }
    }
}

fn statfs_type(path: &Path) -> std::io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated string and buf a valid out pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut buf) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(buf.f_type as i64)
}

/// Effective capability set of this process, from /proc/self/status.
fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
}

pub fn has_capabilities(caps: u64) -> bool {
    let has = |bit: u32| caps & (1u64 << bit) != 0;
    (has(CAP_BPF) || has(CAP_SYS_ADMIN)) && has(CAP_NET_ADMIN)
}

pub fn check_capabilities() -> Result<(), PreflightError> {
    match effective_caps() {
        Some(caps) if has_capabilities(caps) => Ok(()),
        _ => Err(PreflightError::Capabilities),
    }
}

pub fn check_bpf() -> Result<(), PreflightError> {
    if Path::new("/proc/sys/kernel/unprivileged_bpf_disabled").exists() {
        Ok(())
    } else {
        Err(PreflightError::NoBpf)
    }
}

pub fn check_cgroup_root(root: &Path) -> Result<(), PreflightError> {
    if !root.is_dir() {
        return Err(PreflightError::CgroupRootMissing(root.to_owned()));
    }
    let kind = statfs_type(root).map_err(|source| PreflightError::Io {
        path: root.to_owned(),
        source,
    })?;
    match kind {
        CGROUP2_SUPER_MAGIC => Ok(()),
        CGROUP_SUPER_MAGIC => Err(PreflightError::CgroupV1(root.to_owned())),
        _ => Err(PreflightError::NotCgroup2(root.to_owned())),
    }
}

/// The pin directory must be on a bpffs; it is created when its parent is.
pub fn check_bpffs(pin_dir: &Path) -> Result<(), PreflightError> {
    let existing = if pin_dir.exists() {
        pin_dir
    } else {
        pin_dir.parent().unwrap_or(pin_dir)
    };
    match statfs_type(existing) {
        Ok(BPF_FS_MAGIC) => Ok(()),
        Ok(_) | Err(_) => Err(PreflightError::BpffsNotMounted(existing.to_owned())),
    }
}

/// Mounts a bpffs on the directory that will hold `pin_dir`, as Cilium does
/// on nodes that lack one (kind nodes, some distributions). In a DaemonSet
/// the mount propagates to the host through the Bidirectional volume, so
/// pins outlive the agent's container.
pub fn mount_bpffs(pin_dir: &Path) -> Result<PathBuf, PreflightError> {
    let at = pin_dir.parent().unwrap_or(pin_dir).to_owned();
    let fail = |source| PreflightError::MountBpffs {
        path: at.clone(),
        source,
    };
    std::fs::create_dir_all(&at).map_err(fail)?;
    let target = CString::new(at.as_os_str().as_bytes())
        .map_err(|_| fail(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    // SAFETY: every pointer is a valid NUL-terminated string or null.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    Ok(at)
}

pub fn is_cgroup2(path: &Path) -> bool {
    statfs_type(path)
        .map(|t| t == CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_sets() {
        let bit = |b: u32| 1u64 << b;
        assert!(has_capabilities(bit(CAP_BPF) | bit(CAP_NET_ADMIN)));
        assert!(has_capabilities(bit(CAP_SYS_ADMIN) | bit(CAP_NET_ADMIN)));
        assert!(!has_capabilities(bit(CAP_BPF)));
        assert!(!has_capabilities(bit(CAP_NET_ADMIN)));
        assert!(!has_capabilities(0));
    }

    #[test]
    fn missing_cgroup_root_is_reported() {
        let err = check_cgroup_root(Path::new("/nonexistent/cgroup")).unwrap_err();
        assert!(matches!(err, PreflightError::CgroupRootMissing(_)));
        assert_eq!(err.exit_code(), 4);
    }

    #[test]
    fn plain_directory_is_not_cgroup2() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            check_cgroup_root(dir.path()).unwrap_err(),
            PreflightError::NotCgroup2(_)
        ));
        assert!(matches!(
            check_bpffs(&dir.path().join("pins")).unwrap_err(),
            PreflightError::BpffsNotMounted(_)
        ));
    }
}

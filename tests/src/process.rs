//! Starting processes the way a pod's processes run: inside a network
//! namespace, a cgroup, and with the namespace's own /etc/hosts and
//! resolv.conf bind-mounted (like `ip netns exec`, but without remounting
//! /sys, which would hide the cgroup and bpffs mounts from the agent).

use std::{
    ffi::CString,
    fs::File,
    os::{fd::AsRawFd, unix::ffi::OsStrExt, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// Where and how to run a command.
#[derive(Default)]
pub struct Place<'a> {
    pub netns: Option<&'a Netns>,
    /// A cgroup directory the process moves itself into before exec.
    pub cgroup: Option<&'a Path>,
}

struct Prepared {
    netns: Option<File>,
    procs: Option<CString>,
    mounts: Vec<(CString, CString)>,
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn prepare(cmd: &mut Command, place: &Place) {
    let mut prep = Prepared {
        netns: None,
        procs: None,
        mounts: Vec::new(),
    };
    if let Some(ns) = place.netns {
        prep.netns = Some(ns.file());
        for f in ["hosts", "resolv.conf"] {
            prep.mounts
                .push((cstr(&ns.etc.join(f)), cstr(&Path::new("/etc").join(f))));
        }
    }
    if let Some(cg) = place.cgroup {
        prep.procs = Some(cstr(&cg.join("cgroup.procs")));
    }
    // SAFETY: the closure only makes async-signal-safe syscalls on data
    // prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &prep.procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                libc::close(fd);
                if !ok {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if !prep.mounts.is_empty() {
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let root = c"/";
                if libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                for (src, dst) in &prep.mounts {
                    if libc::mount(
                        src.as_ptr(),
                        dst.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
            if let Some(ns) = &prep.netns {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Runs a command to completion in `place`, with a timeout.
pub fn run(place: &Place, program: &str, args: &[&str], timeout: Duration) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    prepare(&mut cmd, place);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {program}: {e}"));
    // Drain the pipes while waiting: a child whose output exceeds a pipe's
    // buffer would otherwise block forever on its write.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = stderr.join().unwrap_or_default();
            panic!(
                "{program} {args:?} did not finish within {timeout:?}; stderr: {}",
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// A long-running process, killed on drop; its output goes to a log file.
pub struct Daemon {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(name: &str, place: &Place, program: &Path, args: &[String], log_dir: &Path) -> Daemon {
        Self::start_with_env(name, place, program, args, &[], log_dir)
    }

    pub fn start_with_env(
        name: &str,
        place: &Place,
        program: &Path,
        args: &[String],
        envs: &[(&str, &str)],
        log_dir: &Path,
    ) -> Daemon {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("creating log file");
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup log fd"))
            .stderr(out);
        prepare(&mut cmd, place);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({}): {e}", program.display()));
        Daemon {
            name: name.into(),
            child: Some(child),
            log,
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the process with SIGTERM (then SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Panics with the log if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{} exited ({status}); log:\n{}", self.name, self.logs());
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Retries `attempt` (which looks at an event, a status or a counter) until
/// it succeeds, and panics after `timeout` with what it saw last.
pub async fn eventually<T, Fut>(what: &str, timeout: Duration, mut attempt: impl FnMut() -> Fut) -> T
where
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match attempt().await {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

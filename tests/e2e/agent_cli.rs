//! The agent's command line against a real host: errors a user can hit
//! before anything is attached, each with its exit code and a message that
//! says what to do. Needs root (the checks run after the capability check).

use std::process::Command;

use llm_egress_tests::{
    cgroup::{cgroup2_mount, Bpffs},
    env,
};

fn agent(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env::agent_bin())
        .args(args)
        .output()
        .expect("running the agent");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn base_args<'a>(workloads: &'a str, cgroup_root: &'a str, bpffs: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--cgroup-root",
        cgroup_root,
        "--bpffs",
        bpffs,
        "--proxy-advertise",
        "10.0.0.1:15001",
        "--host",
        "llm.example.test",
        "--workloads",
        workloads,
        "--admin",
        "127.0.0.1:0",
        "--proxy-listen",
        "127.0.0.1:0",
        "--mode",
        "direct",
    ]
}

#[test]
fn startup_errors_name_the_problem_and_exit_with_their_code() {
    env::require_root();
    let dir = tempfile::tempdir().unwrap();
    let workloads = dir.path().join("workloads.yaml");
    std::fs::write(&workloads, "workloads: []\n").unwrap();
    let w = workloads.to_str().unwrap();
    let bpffs = Bpffs::new();
    let pins = bpffs.pins();
    let pins = pins.to_str().unwrap();
    let cg = cgroup2_mount();
    let cg = cg.to_str().unwrap();

    // A cgroup root that is not cgroup v2.
    let plain = dir.path().to_str().unwrap();
    let (code, err) = agent(&base_args(w, plain, pins));
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("not on a cgroup2 filesystem"), "{err}");

    // A cgroup root that does not exist.
    let (code, err) = agent(&base_args(w, "/nonexistent/cgroup", pins));
    assert_eq!(code, Some(4), "{err}");
    assert!(
        err.contains("does not exist") && err.contains("--cgroup-root"),
        "{err}"
    );

    // No bpffs where pins should go.
    let not_bpffs = dir.path().join("pins");
    let (code, err) = agent(&base_args(w, cg, not_bpffs.to_str().unwrap()));
    assert_eq!(code, Some(4), "{err}");
    assert!(
        err.contains("no bpffs is mounted") && err.contains("mount -t bpf"),
        "{err}"
    );

    // A bad config file: file and field named, exit 2.
    let config = dir.path().join("agent.yaml");
    std::fs::write(&config, "hosts: [a]\nproxy:\n  advertize: []\n").unwrap();
    let (code, err) = agent(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("agent.yaml") && err.contains("advertize"), "{err}");

    // A bad workload file, exit 2, with the entry and field.
    std::fs::write(
        &workloads,
        "workloads:\n- {namespace: default, name: x, cgroupPath: a}\n",
    )
    .unwrap();
    let (code, err) = agent(&base_args(w, cg, pins));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("workloads.yaml") && err.contains("serviceAccount"),
        "{err}"
    );

    // Nothing was attached by any of these.
    assert!(!bpffs.pins().join("links").exists());
}

#[test]
fn help_describes_every_flag() {
    let out = Command::new(env::agent_bin())
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--cgroup-root",
        "--bpffs",
        "--proxy-listen",
        "--proxy-advertise",
        "--host",
        "--port",
        "--workloads",
        "--admin",
        "--mode",
    ] {
        let line = help
            .lines()
            .find(|l| l.trim_start().starts_with(flag) || l.contains(&format!(" {flag} ")))
            .unwrap_or_else(|| panic!("{flag} missing from help:\n{help}"));
        let idx = help.find(line).unwrap();
        // The flag's line or the next one carries a description.
        let text = &help[idx..idx + line.len() + 80.min(help.len() - idx - line.len())];
        assert!(
            text.split_whitespace().count() > 3,
            "{flag} has no description:\n{help}"
        );
    }
}

#[test]
fn mount_bpffs_mounts_one_where_none_is_and_pins_there() {
    env::require_root();
    let dir = tempfile::tempdir().unwrap();
    let workloads = dir.path().join("workloads.yaml");
    std::fs::write(&workloads, "workloads: []\n").unwrap();
    let cgroup = llm_egress_tests::cgroup::TestCgroup::new(
        cgroup2_mount().join(format!("llm-egress-test-mount-{}", env::unique_id())),
    );
    // A plain directory where the DaemonSet would mount the host's /sys/fs/bpf.
    let bpf_root = dir.path().join("sys-fs-bpf");
    let pins = bpf_root.join("llm-egress");
    let (w, cg, p) = (
        workloads.to_str().unwrap(),
        cgroup.path.to_str().unwrap(),
        pins.to_str().unwrap(),
    );
    let mut args = base_args(w, cg, p);
    args.push("--mount-bpffs");
    let mut child = Command::new(env::agent_bin())
        .args(&args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let fs_type = || llm_egress_tests::netns::sh(&format!("stat -f -c %T {}", bpf_root.display()));
    let mut pinned = false;
    for _ in 0..100 {
        if pins.join("links").exists() {
            pinned = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mounted = fs_type();
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let _ = Command::new(env::agent_bin())
        .args(["uninstall", "--bpffs", p])
        .output();
    let _ = Command::new("umount").arg(&bpf_root).status();
    assert!(mounted.trim() == "bpf_fs", "not mounted: {mounted}");
    assert!(pinned, "nothing pinned: {}", String::from_utf8_lossy(&out.stderr));
}

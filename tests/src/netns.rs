//! Network namespaces created with iproute2 and removed on drop.

use std::{fs::File, path::PathBuf, process::Command};

pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("spawning sh");
    assert!(
        out.status.success(),
        "command failed: {cmd}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub struct Netns {
    pub name: String,
    /// `/etc/netns/<name>`: hosts and resolv.conf the test gives processes.
    pub etc: PathBuf,
}

impl Netns {
    pub fn new(name: &str) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        sh(&format!("ip netns add {name}"));
        sh(&format!("ip -n {name} link set lo up"));
        let etc = PathBuf::from("/etc/netns").join(name);
        std::fs::create_dir_all(&etc).expect("creating /etc/netns/<name>");
        // No name server anywhere: lookups never leave the namespaces.
        std::fs::write(
            etc.join("resolv.conf"),
            "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
        )
        .expect("writing resolv.conf");
        std::fs::write(etc.join("hosts"), "127.0.0.1 localhost\n::1 localhost\n").expect("writing hosts");
        Netns {
            name: name.to_string(),
            etc,
        }
    }

    /// Runs `ip -n <ns> <args>`.
    pub fn ip(&self, args: &str) {
        sh(&format!("ip -n {} {args}", self.name));
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        sh(&format!("ip netns exec {} sysctl -qw {key}={value}", self.name));
    }

    pub fn add_host(&self, ip: &str, name: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.etc.join("hosts"))
            .expect("opening hosts");
        writeln!(f, "{ip} {name}").expect("writing hosts");
    }

    pub fn file(&self) -> File {
        File::open(format!("/run/netns/{}", self.name)).expect("opening /run/netns/<name>")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
        let _ = std::fs::remove_dir_all(&self.etc);
    }
}

/// Links `a` and `b` with a veth pair named `a_if` (in a) and `b_if` (in b).
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    sh(&format!(
        "ip -n {} link add {a_if} type veth peer name {b_if} netns {}",
        a.name, b.name
    ));
    a.ip(&format!("link set {a_if} up"));
    b.ip(&format!("link set {b_if} up"));
}

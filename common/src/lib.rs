//! Types shared by the kernel programs (`ebpf/`) and the node agent (`agent/`).
//!
//! Every type here is `#[repr(C)]` with explicit padding so that the kernel and
//! userspace agree on its layout byte for byte. Addresses are stored as four
//! big-endian `u32` words, exactly as the kernel hands them to cgroup/sock_addr
//! and sock_ops programs; IPv4 uses the IPv4-mapped IPv6 form
//! (`::ffff:a.b.c.d`) so that one key shape serves both families.
#![cfg_attr(not(feature = "user"), no_std)]

/// Hash map of capture targets: `SockKey` → `TARGET_PRESENT`.
pub const MAP_TARGETS: &str = "TARGETS";
/// Hash map of enrolled cgroups: cgroup id (`u64`) → `ENROLLED_PRESENT`.
pub const MAP_ENROLLED: &str = "ENROLLED";
/// LRU map written by connect4/6: socket cookie (`u64`) → `OrigDst`.
pub const MAP_PENDING: &str = "PENDING";
/// LRU map written by sock_ops: client `SockKey` → `OrigDst`; the agent
/// reads and deletes entries on accept.
pub const MAP_ORIG_DST: &str = "ORIG_DST";
/// Array with one `ProxyConfig` at index 0.
pub const MAP_CONFIG: &str = "CONFIG";
/// Per-CPU array of `u64` counters, indexed by the `COUNTER_*` constants.
pub const MAP_COUNTERS: &str = "COUNTERS";

/// Program names (the Rust function names in `ebpf/`).
pub const PROG_CONNECT4: &str = "llm_egress_connect4";
pub const PROG_CONNECT6: &str = "llm_egress_connect6";
pub const PROG_SOCK_OPS: &str = "llm_egress_sock_ops";

pub const TARGETS_MAX: u32 = 4096;
pub const ENROLLED_MAX: u32 = 16384;
pub const PENDING_MAX: u32 = 65536;
pub const ORIG_DST_MAX: u32 = 65536;

/// How many cgroup levels above the calling task connect4/6 inspect when
/// looking for an enrolled ancestor. Kubernetes puts containers at level 4-5
/// (`kubepods.slice/kubepods-burstable.slice/…-pod<uid>.slice/cri-….scope`).
pub const MAX_CGROUP_LEVELS: i32 = 16;

pub const TARGET_PRESENT: u8 = 1;
pub const ENROLLED_PRESENT: u8 = 1;

/// connect() rewritten to the proxy.
pub const COUNTER_CAPTURED: u32 = 0;
/// connect() to a target from a task that is not enrolled: left alone.
pub const COUNTER_PASSED: u32 = 1;
/// A capture that could not be recorded (map full, no proxy configured).
/// The connect is left alone in that case only if `failOpen` were set; it
/// is rejected otherwise.
pub const COUNTER_ERRORS: u32 = 2;
/// Established connections whose record moved from cookie to client address.
pub const COUNTER_ESTABLISHED: u32 = 3;
pub const COUNTERS_LEN: u32 = 4;
pub const COUNTER_NAMES: [&str; COUNTERS_LEN as usize] = ["captured", "passed", "errors", "established"];

/// Address family tags stored in `SockKey::family` and `OrigDst::family`.
pub const FAMILY_V4: u16 = 4;
pub const FAMILY_V6: u16 = 6;

/// An (address, port) pair: a capture target, or a client's local address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockKey {
    /// Address as four big-endian words (IPv4-mapped for IPv4).
    pub addr: [u32; 4],
    /// Port in host byte order.
    pub port: u16,
    /// `FAMILY_V4` or `FAMILY_V6`. IPv4-mapped IPv6 addresses (a dual-stack
    /// socket dialling IPv4) are normalised to `FAMILY_V4` on both sides.
    pub family: u16,
}

/// The original destination of a captured connection and the enrolled
/// cgroup it came from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    pub addr: [u32; 4],
    /// Port in host byte order.
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
    /// Id of the enrolled cgroup (the task's own or an ancestor's).
    pub cgroup_id: u64,
}

/// Where connect4/6 send captured connections: the agent's proxy as seen
/// from workloads.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ProxyConfig {
    /// Big-endian IPv4 address; 0 = IPv4 capture disabled.
    pub ip4: u32,
    /// Port in host byte order; 0 = no proxy configured (fail closed).
    pub port4: u16,
    pub port6: u16,
    /// Big-endian words; all zero = IPv6 capture disabled.
    pub ip6: [u32; 4],
}

/// Builds the IPv4-mapped form used for IPv4 keys from a big-endian address.
#[inline(always)]
pub const fn v4_mapped(ip4_be: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_PREFIX_WORD, ip4_be]
}

/// Third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), big-endian.
pub const V4_MAPPED_PREFIX_WORD: u32 = 0xffffu32.to_be();

/// The family an address really has: IPv4-mapped IPv6 counts as IPv4.
#[inline(always)]
pub const fn family_of_v6_words(words: &[u32; 4]) -> u16 {
    if words[0] == 0 && words[1] == 0 && words[2] == V4_MAPPED_PREFIX_WORD {
        FAMILY_V4
    } else {
        FAMILY_V6
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    // SAFETY: all four types are repr(C), Copy, made only of integers, and
    // have no implicit padding (every gap is an explicit field).
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for ProxyConfig {}

    fn words_from_ip(ip: IpAddr) -> ([u32; 4], u16) {
        match ip {
            IpAddr::V4(v4) => (v4_mapped(u32::from(v4).to_be()), FAMILY_V4),
            IpAddr::V6(v6) => {
                let o = v6.octets();
                let mut words = [0u32; 4];
                for (i, w) in words.iter_mut().enumerate() {
                    // Bytes in memory order == network order; keep them as is.
                    *w = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
                }
                (words, FAMILY_V6)
            }
        }
    }

    fn ip_from_words(words: [u32; 4], family: u16) -> IpAddr {
        if family == FAMILY_V4 {
            IpAddr::V4(Ipv4Addr::from(u32::from_be(words[3])))
        } else {
            let mut o = [0u8; 16];
            for (i, w) in words.iter().enumerate() {
                o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
    }

    impl SockKey {
        /// The key a socket address has in `TARGETS` / `ORIG_DST`.
        /// IPv4-mapped IPv6 addresses are normalised to IPv4 because the
        /// kernel reports accepted dual-stack peers that way too.
        pub fn from_socket_addr(sa: SocketAddr) -> Self {
            let ip = match sa.ip() {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
                v4 => v4,
            };
            let (addr, family) = words_from_ip(ip);
            SockKey {
                addr,
                port: sa.port(),
                family,
            }
        }

        pub fn to_socket_addr(&self) -> SocketAddr {
            SocketAddr::new(ip_from_words(self.addr, self.family), self.port)
        }
    }

    impl OrigDst {
        pub fn socket_addr(&self) -> SocketAddr {
            SocketAddr::new(ip_from_words(self.addr, self.family), self.port)
        }
    }

    impl ProxyConfig {
        /// Proxy addresses for IPv4 and IPv6 workloads; either may be absent.
        pub fn new(v4: Option<SocketAddr>, v6: Option<SocketAddr>) -> Self {
            let mut cfg = ProxyConfig::default();
            if let Some(SocketAddr::V4(a)) = v4 {
                cfg.ip4 = u32::from(*a.ip()).to_be();
                cfg.port4 = a.port();
            }
            if let Some(SocketAddr::V6(a)) = v6 {
                cfg.ip6 = words_from_ip(IpAddr::V6(*a.ip())).0;
                cfg.port6 = a.port();
            }
            cfg
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn ipv4_key_is_v4_mapped_in_network_order() {
            let key = SockKey::from_socket_addr("203.0.113.10:443".parse().unwrap());
            assert_eq!(key.family, FAMILY_V4);
            assert_eq!(key.port, 443);
            // What the kernel puts in ctx.user_ip4 for 203.0.113.10: the
            // address bytes in memory order.
            assert_eq!(key.addr[3], u32::from_ne_bytes([203, 0, 113, 10]));
            assert_eq!(key.addr[2], u32::from_ne_bytes([0, 0, 0xff, 0xff]));
            assert_eq!(key.addr[0] | key.addr[1], 0);
        }

        #[test]
        fn ipv6_key_keeps_byte_order() {
            let key = SockKey::from_socket_addr("[2001:db8::10]:80".parse().unwrap());
            assert_eq!(key.family, FAMILY_V6);
            assert_eq!(key.addr[0], u32::from_ne_bytes([0x20, 0x01, 0x0d, 0xb8]));
            assert_eq!(key.addr[3], u32::from_ne_bytes([0, 0, 0, 0x10]));
        }

        #[test]
        fn v4_mapped_v6_normalises_to_v4() {
            let mapped = SockKey::from_socket_addr("[::ffff:203.0.113.10]:80".parse().unwrap());
            let plain = SockKey::from_socket_addr("203.0.113.10:80".parse().unwrap());
            assert_eq!(mapped, plain);
        }

        #[test]
        fn round_trips() {
            for s in ["192.0.2.1:80", "[2001:db8::1]:443", "10.0.0.1:65535"] {
                let sa: SocketAddr = s.parse().unwrap();
                assert_eq!(SockKey::from_socket_addr(sa).to_socket_addr(), sa);
            }
        }

        #[test]
        fn layouts_have_no_implicit_padding() {
            assert_eq!(core::mem::size_of::<SockKey>(), 20);
            assert_eq!(core::mem::size_of::<OrigDst>(), 32);
            assert_eq!(core::mem::size_of::<ProxyConfig>(), 24);
        }

        #[test]
        fn proxy_config_encodes_both_families() {
            let cfg = ProxyConfig::new(
                Some("10.0.0.1:15001".parse().unwrap()),
                Some("[fd00::1]:15001".parse().unwrap()),
            );
            assert_eq!(cfg.ip4, u32::from_ne_bytes([10, 0, 0, 1]));
            assert_eq!(cfg.port4, 15001);
            assert_eq!(cfg.ip6[0], u32::from_ne_bytes([0xfd, 0, 0, 0]));
            assert_eq!(cfg.port6, 15001);
        }
    }
}

//! Kernel side of llm-egress capture.
//!
//! * `connect4` / `connect6` (cgroup/sock_addr): a TCP connect() to a target
//!   `(ip, port)` from an enrolled cgroup (or a descendant of one) is recorded
//!   by socket cookie and rewritten to the node agent's proxy.
//! * `sock_ops` on `ACTIVE_ESTABLISHED`: the record moves to a map keyed by the
//!   client's `(ip, port)`, which is what the proxy sees as the peer address.
//!
//! Everything else returns untouched. When a capture cannot be recorded the
//! connect is rejected: capture fails closed, never bypasses the gateway.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie},
        macros::{cgroup_sock_addr, map, sock_ops},
        maps::{Array, HashMap, LruHashMap, PerCpuArray},
        programs::{SockAddrContext, SockOpsContext},
        EbpfContext,
    };
    use llm_egress_common::*;

    /// connect() return values for cgroup/sock_addr programs.
    const ALLOW: i32 = 1;
    const REJECT: i32 = 0;
    const SOCK_STREAM: u32 = 1;
    const AF_INET: u32 = 2;
    const AF_INET6: u32 = 10;

    #[map(name = "TARGETS")]
    static TARGETS: HashMap<SockKey, u8> = HashMap::pinned(TARGETS_MAX, 0);
    #[map(name = "ENROLLED")]
    static ENROLLED: HashMap<u64, u8> = HashMap::pinned(ENROLLED_MAX, 0);
    #[map(name = "PENDING")]
    static PENDING: LruHashMap<u64, OrigDst> = LruHashMap::pinned(PENDING_MAX, 0);
    #[map(name = "ORIG_DST")]
    static ORIG_DST: LruHashMap<SockKey, OrigDst> = LruHashMap::pinned(ORIG_DST_MAX, 0);
    #[map(name = "CONFIG")]
    static CONFIG: Array<ProxyConfig> = Array::pinned(1, 0);
    #[map(name = "COUNTERS")]
    static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTERS_LEN, 0);

    #[inline(always)]
    fn count(index: u32) {
        if let Some(ptr) = COUNTERS.get_ptr_mut(index) {
            // Per-CPU slot: no other CPU writes it, a plain add is enough.
            unsafe { *ptr += 1 };
        }
    }

    /// The enrolled cgroup the current task belongs to: its own cgroup or the
    /// deepest enrolled ancestor, so that container restarts (new leaf
    /// cgroups under the same pod cgroup) need no map update.
    #[inline(always)]
    fn enrolled_cgroup() -> Option<u64> {
        let current = unsafe { bpf_get_current_cgroup_id() };
        if unsafe { ENROLLED.get(&current) }.is_some() {
            return Some(current);
        }
        let mut level = MAX_CGROUP_LEVELS;
        // Level 0 is the hierarchy root, which is never enrolled.
        while level > 1 {
            level -= 1;
            let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
            if id != 0 && unsafe { ENROLLED.get(&id) }.is_some() {
                return Some(id);
            }
        }
        None
    }

    /// Shared decision for both families. `dst` is the normalised target key;
    /// returns the record to store, or `None` to leave the connect alone.
    #[inline(always)]
    fn decide(ctx: &SockAddrContext, dst: &SockKey) -> Option<OrigDst> {
        let sock_type = unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).type_) };
        if sock_type != SOCK_STREAM {
            return None;
        }
        unsafe { TARGETS.get(dst) }?;
        let Some(cgroup_id) = enrolled_cgroup() else {
            count(COUNTER_PASSED);
            return None;
        };
        Some(OrigDst {
            addr: dst.addr,
            port: dst.port,
            family: dst.family,
            _pad: 0,
            cgroup_id,
        })
    }

    #[inline(always)]
    fn record(ctx: &SockAddrContext, orig: &OrigDst) -> bool {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        PENDING.insert(&cookie, orig, 0).is_ok()
    }

    #[cgroup_sock_addr(connect4)]
    pub fn llm_egress_connect4(ctx: SockAddrContext) -> i32 {
        let sa = ctx.sock_addr;
        let (ip, port) = unsafe {
            (
                core::ptr::read_volatile(&(*sa).user_ip4),
                core::ptr::read_volatile(&(*sa).user_port),
            )
        };
        let dst = SockKey {
            addr: v4_mapped(ip),
            port: u16::from_be(port as u16),
            family: FAMILY_V4,
        };
        let Some(orig) = decide(&ctx, &dst) else {
            return ALLOW;
        };
        let Some(cfg) = CONFIG.get(0) else {
            count(COUNTER_ERRORS);
            return REJECT;
        };
        if cfg.port4 == 0 || cfg.ip4 == 0 || !record(&ctx, &orig) {
            count(COUNTER_ERRORS);
            return REJECT;
        }
        // Separate volatile stores: LLVM may otherwise merge them into one
        // 8-byte context store, which the verifier rejects.
        unsafe {
            core::ptr::write_volatile(&mut (*sa).user_ip4, cfg.ip4);
            core::ptr::write_volatile(&mut (*sa).user_port, u32::from(cfg.port4.to_be()));
        }
        count(COUNTER_CAPTURED);
        ALLOW
    }

    #[cgroup_sock_addr(connect6)]
    pub fn llm_egress_connect6(ctx: SockAddrContext) -> i32 {
        let sa = ctx.sock_addr;
        let (words, port) = unsafe {
            (
                [
                    core::ptr::read_volatile(&(*sa).user_ip6[0]),
                    core::ptr::read_volatile(&(*sa).user_ip6[1]),
                    core::ptr::read_volatile(&(*sa).user_ip6[2]),
                    core::ptr::read_volatile(&(*sa).user_ip6[3]),
                ],
                core::ptr::read_volatile(&(*sa).user_port),
            )
        };
        let dst = SockKey {
            addr: words,
            port: u16::from_be(port as u16),
            family: family_of_v6_words(&words),
        };
        let Some(orig) = decide(&ctx, &dst) else {
            return ALLOW;
        };
        let Some(cfg) = CONFIG.get(0) else {
            count(COUNTER_ERRORS);
            return REJECT;
        };
        // A dual-stack socket dialling IPv4 goes to the IPv4 proxy, mapped.
        let (proxy_words, proxy_port) = if dst.family == FAMILY_V4 {
            (v4_mapped(cfg.ip4), cfg.port4)
        } else {
            (cfg.ip6, cfg.port6)
        };
        let unset = proxy_words[0] | proxy_words[1] | proxy_words[3] == 0 && dst.family == FAMILY_V6;
        if proxy_port == 0 || unset || !record(&ctx, &orig) {
            count(COUNTER_ERRORS);
            return REJECT;
        }
        unsafe {
            core::ptr::write_volatile(&mut (*sa).user_ip6[0], proxy_words[0]);
            core::ptr::write_volatile(&mut (*sa).user_ip6[1], proxy_words[1]);
            core::ptr::write_volatile(&mut (*sa).user_ip6[2], proxy_words[2]);
            core::ptr::write_volatile(&mut (*sa).user_ip6[3], proxy_words[3]);
            core::ptr::write_volatile(&mut (*sa).user_port, u32::from(proxy_port.to_be()));
        }
        count(COUNTER_CAPTURED);
        ALLOW
    }

    #[sock_ops]
    pub fn llm_egress_sock_ops(ctx: SockOpsContext) -> u32 {
        if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
            return 0;
        }
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let Some(orig) = (unsafe { PENDING.get(&cookie) }).copied() else {
            return 0;
        };
        // Read every field up front, unconditionally: loads inside the
        // branches get merged by LLVM into one load through a selected ctx
        // pointer, which the verifier rejects ("dereference of modified ctx
        // ptr").
        let ops = ctx.ops;
        let (family, port, ip4, ip6) = unsafe {
            (
                core::ptr::read_volatile(&(*ops).family),
                core::ptr::read_volatile(&(*ops).local_port) as u16,
                core::ptr::read_volatile(&(*ops).local_ip4),
                [
                    core::ptr::read_volatile(&(*ops).local_ip6[0]),
                    core::ptr::read_volatile(&(*ops).local_ip6[1]),
                    core::ptr::read_volatile(&(*ops).local_ip6[2]),
                    core::ptr::read_volatile(&(*ops).local_ip6[3]),
                ],
            )
        };
        let key = if family == AF_INET {
            SockKey {
                addr: v4_mapped(ip4),
                port,
                family: FAMILY_V4,
            }
        } else if family == AF_INET6 {
            SockKey {
                addr: ip6,
                port,
                family: family_of_v6_words(&ip6),
            }
        } else {
            return 0;
        };
        if ORIG_DST.insert(&key, &orig, 0).is_err() {
            count(COUNTER_ERRORS);
        } else {
            count(COUNTER_ESTABLISHED);
        }
        let _ = PENDING.remove(&cookie);
        0
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

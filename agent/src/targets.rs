//! Capture targets: the configured LLM hosts, resolved with the node's
//! resolver (hosts file first, then DNS), re-resolved as their TTLs expire,
//! and written to `TARGETS` as (address, port) pairs.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime},
};

use hickory_resolver::{
    config::{ResolveHosts, ResolverConfig},
    TokioResolver,
};
use llm_egress_common::SockKey;
use serde::{Deserialize, Serialize};

use crate::{config::ResolveTiming, loader::Capture};

/// What the agent currently knows about one configured host.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostStatus {
    pub host: String,
    pub addresses: Vec<IpAddr>,
    /// The last resolution error; addresses from the last success stay
    /// captured meanwhile.
    pub error: Option<String>,
    /// Seconds since the Unix epoch of the last successful resolution.
    pub resolved_at: Option<u64>,
    pub attempts: u64,
}

pub struct Targets {
    ports: Vec<u16>,
    hosts: RwLock<BTreeMap<String, HostStatus>>,
    /// Wakes the resolver loop when the host list changes.
    changed: tokio::sync::Notify,
}

/// Decides when to look a host up again: at TTL expiry, clamped to bounds.
pub fn next_refresh(timing: &ResolveTiming, valid_for: Option<Duration>) -> Duration {
    match valid_for {
        Some(ttl) => ttl.clamp(timing.min_refresh, timing.max_refresh),
        None => timing.retry,
    }
}

/// The map keys for a set of addresses on the configured ports.
pub fn keys_for(addresses: &BTreeSet<IpAddr>, ports: &[u16]) -> Vec<SockKey> {
    let mut keys = Vec::with_capacity(addresses.len() * ports.len());
    for ip in addresses {
        for port in ports {
            keys.push(SockKey::from_socket_addr(SocketAddr::new(*ip, *port)));
        }
    }
    keys
}

impl Targets {
    pub fn new(hosts: &[String], ports: Vec<u16>) -> Targets {
        let hosts = hosts
            .iter()
            .map(|h| {
                (
                    h.clone(),
                    HostStatus {
                        host: h.clone(),
                        ..Default::default()
                    },
                )
            })
            .collect();
        Targets {
            ports,
            hosts: RwLock::new(hosts),
            changed: tokio::sync::Notify::new(),
        }
    }

    pub fn snapshot(&self) -> Vec<HostStatus> {
        self.hosts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Replaces the host list; new hosts are resolved at once, removed
    /// hosts stop being captured at the next sync.
    pub fn set_hosts(&self, hosts: &[String]) {
        {
            let mut map = self.hosts.write().unwrap_or_else(|p| p.into_inner());
            map.retain(|h, _| hosts.contains(h));
            for h in hosts {
                map.entry(h.clone()).or_insert_with(|| HostStatus {
                    host: h.clone(),
                    ..Default::default()
                });
            }
        }
        // A stored permit: a change made while the loop resolves is not lost.
        self.changed.notify_one();
    }

    fn names(&self) -> Vec<String> {
        self.hosts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Every host has been tried at least once (successfully or not).
    pub fn all_attempted(&self) -> bool {
        self.hosts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .all(|h| h.attempts > 0)
    }

    /// The host name an address belongs to, for metrics and logs.
    pub fn host_of(&self, ip: IpAddr) -> Option<String> {
        self.hosts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|h| h.addresses.contains(&ip))
            .map(|h| h.host.clone())
    }

    fn all_addresses(&self) -> BTreeSet<IpAddr> {
        self.hosts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .flat_map(|h| h.addresses.iter().copied())
            .collect()
    }

    fn record(&self, host: &str, result: Result<Vec<IpAddr>, String>) {
        let mut hosts = self.hosts.write().unwrap_or_else(|p| p.into_inner());
        let Some(status) = hosts.get_mut(host) else { return };
        status.attempts += 1;
        match result {
            Ok(mut addresses) => {
                addresses.sort();
                addresses.dedup();
                if addresses != status.addresses {
                    tracing::info!(host, addresses = ?addresses, "capture target resolved");
                }
                status.addresses = addresses;
                status.error = None;
                status.resolved_at = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs());
            }
            Err(e) => {
                if status.error.as_deref() != Some(e.as_str()) {
                    tracing::warn!(host, error = %e, "capture target does not resolve; retrying");
                }
                status.error = Some(e);
            }
        }
    }

    /// Writes the union of all hosts' addresses to TARGETS.
    fn sync(&self, capture: &Capture) {
        let keys = keys_for(&self.all_addresses(), &self.ports);
        if let Err(e) = capture.sync_targets(&keys) {
            tracing::error!(error = %e, "updating the TARGETS map failed");
        }
    }

    /// Resolves every host on its own schedule, forever, and writes the
    /// addresses to TARGETS after each change.
    pub async fn run(self: Arc<Self>, capture: Arc<Capture>, timing: ResolveTiming) {
        self.resolve_forever(timing, |targets| targets.sync(&capture))
            .await
    }

    /// The resolver loop: each host when due (TTL-driven), hosts added by
    /// `set_hosts` at once, and `on_change` after every round that changed
    /// something (a removed host is dropped from TARGETS right away).
    async fn resolve_forever(self: Arc<Self>, timing: ResolveTiming, on_change: impl Fn(&Targets)) {
        let resolver = build_resolver();
        let mut due: BTreeMap<String, Instant> = BTreeMap::new();
        loop {
            let names = self.names();
            let mut changed = due.len() != names.len() || names.iter().any(|n| !due.contains_key(n));
            due.retain(|n, _| names.contains(n));
            for n in names {
                due.entry(n).or_insert_with(Instant::now);
            }
            let now = Instant::now();
            for (host, at) in due.iter_mut() {
                if *at > now {
                    continue;
                }
                let (result, valid_for) = resolve(&resolver, host).await;
                *at = Instant::now() + next_refresh(&timing, if result.is_ok() { valid_for } else { None });
                self.record(host, result);
                changed = true;
            }
            if changed {
                on_change(&self);
            }
            let next = due
                .values()
                .min()
                .copied()
                .unwrap_or_else(|| Instant::now() + timing.max_refresh);
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {}
                _ = self.changed.notified() => {}
            }
        }
    }
}

fn build_resolver() -> TokioResolver {
    let builder = match TokioResolver::builder_tokio() {
        Ok(b) => b,
        Err(e) => {
            // No usable resolv.conf: keep answering from the hosts file and
            // never fall back to a public resolver.
            tracing::warn!(error = %e, "cannot read the system resolver configuration; resolving from the hosts file only");
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], vec![]),
                Default::default(),
            )
        }
    };
    let mut builder = builder;
    builder.options_mut().use_hosts_file = ResolveHosts::Always;
    match builder.build() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "resolver setup failed; resolving from the hosts file only");
            let mut b = TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], vec![]),
                Default::default(),
            );
            b.options_mut().use_hosts_file = ResolveHosts::Always;
            b.build().expect("a resolver without name servers always builds")
        }
    }
}

/// Resolves one host; literal IP addresses resolve to themselves.
async fn resolve(resolver: &TokioResolver, host: &str) -> (Result<Vec<IpAddr>, String>, Option<Duration>) {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return (Ok(vec![ip]), Some(Duration::MAX));
    }
    match resolver.lookup_ip(host).await {
        Ok(lookup) => {
            let valid_for = lookup.valid_until().saturating_duration_since(Instant::now());
            let addrs: Vec<IpAddr> = lookup.iter().collect();
            if addrs.is_empty() {
                (Err(format!("{host} has no A or AAAA records")), None)
            } else {
                (Ok(addrs), Some(valid_for))
            }
        }
        Err(e) => (Err(format!("{host}: {e}")), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_follows_ttl_within_bounds() {
        let t = ResolveTiming::default();
        assert_eq!(
            next_refresh(&t, Some(Duration::from_secs(60))),
            Duration::from_secs(60)
        );
        assert_eq!(next_refresh(&t, Some(Duration::from_secs(0))), t.min_refresh);
        assert_eq!(next_refresh(&t, Some(Duration::from_secs(86400))), t.max_refresh);
        assert_eq!(next_refresh(&t, None), t.retry);
    }

    #[test]
    fn keys_cover_every_address_and_port() {
        let addrs: BTreeSet<IpAddr> =
            ["203.0.113.10".parse().unwrap(), "2001:db8::10".parse().unwrap()].into();
        let keys = keys_for(&addrs, &[80, 443]);
        assert_eq!(keys.len(), 4);
        assert!(keys.contains(&SockKey::from_socket_addr("203.0.113.10:443".parse().unwrap())));
        assert!(keys.contains(&SockKey::from_socket_addr("[2001:db8::10]:80".parse().unwrap())));
    }

    /// Routes arrive after the agent starts (watched from the API): a host
    /// added then is resolved at once, not at the next periodic refresh,
    /// and a removed one leaves the capture set right away.
    #[tokio::test]
    async fn hosts_added_or_removed_later_are_picked_up_at_once() {
        let t = Arc::new(Targets::new(&[], vec![80]));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let timing = ResolveTiming::default();
        tokio::spawn(t.clone().resolve_forever(timing, move |t| {
            let _ = tx.send(t.all_addresses());
        }));
        let within = Duration::from_secs(5);
        t.set_hosts(&["192.0.2.7".into()]);
        let expected: BTreeSet<IpAddr> = ["192.0.2.7".parse().unwrap()].into();
        loop {
            let seen = tokio::time::timeout(within, rx.recv())
                .await
                .expect("a change within 5 s");
            if seen.as_ref() == Some(&expected) {
                break;
            }
        }
        t.set_hosts(&[]);
        loop {
            let seen = tokio::time::timeout(within, rx.recv())
                .await
                .expect("a change within 5 s");
            if seen.as_ref().is_some_and(BTreeSet::is_empty) {
                break;
            }
        }
    }

    #[test]
    fn status_keeps_last_good_addresses_on_error() {
        let t = Targets::new(&["llm.example.test".into()], vec![80]);
        assert!(!t.all_attempted());
        t.record("llm.example.test", Ok(vec!["203.0.113.10".parse().unwrap()]));
        t.record("llm.example.test", Err("timeout".into()));
        let s = &t.snapshot()[0];
        assert_eq!(s.addresses, vec!["203.0.113.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(s.error.as_deref(), Some("timeout"));
        assert_eq!(s.attempts, 2);
        assert!(t.all_attempted());
        assert_eq!(
            t.host_of("203.0.113.10".parse().unwrap()).as_deref(),
            Some("llm.example.test")
        );
    }

    #[tokio::test]
    async fn literal_addresses_resolve_to_themselves() {
        let r = build_resolver();
        let (res, ttl) = resolve(&r, "192.0.2.7").await;
        assert_eq!(res.unwrap(), vec!["192.0.2.7".parse::<IpAddr>().unwrap()]);
        assert!(ttl.is_some());
    }

    #[tokio::test]
    async fn localhost_resolves_from_hosts_file() {
        // /etc/hosts carries localhost on every Linux machine; no DNS query leaves.
        let r = build_resolver();
        let (res, _) = resolve(&r, "localhost").await;
        let addrs = res.unwrap();
        assert!(addrs.iter().any(|a| a.is_loopback()), "{addrs:?}");
    }
}

//! Capture targets: the configured LLM hosts, resolved with the node's
//! resolver (hosts file first, then DNS), re-resolved as their TTLs expire,
//! and written to `TARGETS` as (address, port) pairs.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime},
};

use futures::stream::{FuturesUnordered, StreamExt};

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
    known: RwLock<Known>,
    /// Wakes the resolver loop when the host list changes.
    changed: tokio::sync::Notify,
}

/// Lookups in flight at once: a host whose name server never answers holds
/// one of them for the resolver's timeout, not every host behind it.
const CONCURRENT_LOOKUPS: usize = 32;

/// While lookups are still in flight, results are written to TARGETS at
/// most this often (10,000 hosts resolving at start would otherwise
/// rewrite the map 10,000 times).
const SYNC_EVERY: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Known {
    hosts: BTreeMap<String, HostStatus>,
    /// Address to the hosts that resolve to it, for `host_of` on every
    /// captured connection (a walk over 10,000 hosts is not).
    by_address: HashMap<IpAddr, BTreeSet<String>>,
}

impl Known {
    fn forget_addresses(&mut self, host: &str, addresses: &[IpAddr]) {
        for ip in addresses {
            if let Some(names) = self.by_address.get_mut(ip) {
                names.remove(host);
                if names.is_empty() {
                    self.by_address.remove(ip);
                }
            }
        }
    }
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
            known: RwLock::new(Known {
                hosts,
                by_address: HashMap::new(),
            }),
            changed: tokio::sync::Notify::new(),
        }
    }

    pub fn snapshot(&self) -> Vec<HostStatus> {
        self.read().hosts.values().cloned().collect()
    }

    /// Replaces the host list; new hosts are resolved at once, removed
    /// hosts stop being captured at the next sync.
    pub fn set_hosts(&self, hosts: &[String]) {
        {
            let mut known = self.write();
            let wanted: HashSet<&String> = hosts.iter().collect();
            let gone: Vec<(String, Vec<IpAddr>)> = known
                .hosts
                .iter()
                .filter(|(h, _)| !wanted.contains(h))
                .map(|(h, s)| (h.clone(), s.addresses.clone()))
                .collect();
            for (h, addresses) in gone {
                known.forget_addresses(&h, &addresses);
                known.hosts.remove(&h);
            }
            for h in hosts {
                known.hosts.entry(h.clone()).or_insert_with(|| HostStatus {
                    host: h.clone(),
                    ..Default::default()
                });
            }
        }
        // A stored permit: a change made while the loop resolves is not lost.
        self.changed.notify_one();
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Known> {
        self.known.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Known> {
        self.known.write().unwrap_or_else(|p| p.into_inner())
    }

    fn names(&self) -> Vec<String> {
        self.read().hosts.keys().cloned().collect()
    }

    /// Every host has been tried at least once (successfully or not).
    pub fn all_attempted(&self) -> bool {
        self.read().hosts.values().all(|h| h.attempts > 0)
    }

    /// The host name an address belongs to, for metrics and logs (the
    /// first in name order when several resolve to it).
    pub fn host_of(&self, ip: IpAddr) -> Option<String> {
        self.read().by_address.get(&ip)?.first().cloned()
    }

    fn all_addresses(&self) -> BTreeSet<IpAddr> {
        self.read().by_address.keys().copied().collect()
    }

    /// Records a lookup's result; true when the host's addresses changed.
    fn record(&self, host: &str, result: Result<Vec<IpAddr>, String>) -> bool {
        let mut known = self.write();
        let Some(status) = known.hosts.get_mut(host) else {
            return false;
        };
        status.attempts += 1;
        let mut moved = None;
        match result {
            Ok(mut addresses) => {
                addresses.sort();
                addresses.dedup();
                if addresses != status.addresses {
                    tracing::info!(host, addresses = ?addresses, "capture target resolved");
                    moved = Some((
                        std::mem::replace(&mut status.addresses, addresses.clone()),
                        addresses,
                    ));
                }
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
        let Some((old, new)) = moved else {
            return false;
        };
        known.forget_addresses(host, &old);
        for ip in new {
            known.by_address.entry(ip).or_default().insert(host.to_string());
        }
        true
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
    /// `set_hosts` at once, up to `CONCURRENT_LOOKUPS` at a time, and
    /// `on_change` after results came in (a removed host is dropped from
    /// TARGETS right away).
    async fn resolve_forever(self: Arc<Self>, timing: ResolveTiming, on_change: impl Fn(&Targets)) {
        self.resolve_forever_with(build_resolver(), timing, on_change)
            .await
    }

    async fn resolve_forever_with(
        self: Arc<Self>,
        resolver: TokioResolver,
        timing: ResolveTiming,
        on_change: impl Fn(&Targets),
    ) {
        let resolver = &resolver;
        let mut plan = Schedule::default();
        let mut in_flight = FuturesUnordered::new();
        let (mut reconcile, mut dirty, mut last_sync) = (true, false, Instant::now());
        loop {
            if reconcile {
                dirty |= plan.reconcile(self.names(), Instant::now());
                reconcile = false;
            }
            while in_flight.len() < CONCURRENT_LOOKUPS {
                let Some(host) = plan.next_due(Instant::now()) else {
                    break;
                };
                in_flight.push(async move {
                    let answer = resolve(resolver, &host).await;
                    (host, answer)
                });
            }
            if dirty && (in_flight.is_empty() || last_sync.elapsed() >= SYNC_EVERY) {
                on_change(&self);
                (dirty, last_sync) = (false, Instant::now());
            }
            let next_due = plan
                .first_due()
                .unwrap_or_else(|| Instant::now() + timing.max_refresh);
            tokio::select! {
                Some((host, (result, valid_for))) = in_flight.next(), if !in_flight.is_empty() => {
                    plan.done(&host, result.is_ok(), valid_for, &timing, Instant::now());
                    // TARGETS is rewritten only when an address changed.
                    dirty |= self.record(&host, result);
                }
                _ = tokio::time::sleep_until(next_due.into()), if in_flight.len() < CONCURRENT_LOOKUPS => {}
                _ = tokio::time::sleep_until((last_sync + SYNC_EVERY).into()), if dirty => {}
                _ = self.changed.notified() => reconcile = true,
            }
        }
    }
}

/// When each host is looked up next: every operation is a map update, so
/// that 10,000 hosts cost no more per lookup than ten.
#[derive(Default)]
struct Schedule {
    /// Every host in the list, with its failures in a row (for backoff).
    hosts: HashMap<String, u32>,
    /// Hosts waiting for their next lookup, by when it is due: those whose
    /// last lookup succeeded (or that were never looked up), and those
    /// whose last lookup failed.
    waiting: BTreeSet<(Instant, String)>,
    waiting_failing: BTreeSet<(Instant, String)>,
    due_at: HashMap<String, (Instant, bool)>,
    /// Hosts with a lookup in flight, and whether they were failing.
    resolving: HashMap<String, bool>,
    failing_in_flight: usize,
}

/// Lookups of failing hosts in flight at once: names that never answer
/// (a tenant's typos, a dead zone) hold at most these slots for the
/// resolver's timeout, and new and healthy hosts keep the rest.
const FAILING_LOOKUPS: usize = CONCURRENT_LOOKUPS / 2;

impl Schedule {
    /// Takes the current host list: new hosts are due now, removed ones
    /// leave. Returns whether the list changed.
    fn reconcile(&mut self, names: Vec<String>, now: Instant) -> bool {
        let names: HashSet<String> = names.into_iter().collect();
        let removed: Vec<String> = self
            .hosts
            .keys()
            .filter(|h| !names.contains(*h))
            .cloned()
            .collect();
        let mut changed = !removed.is_empty();
        for h in removed {
            self.hosts.remove(&h);
            if let Some((at, failing)) = self.due_at.remove(&h) {
                self.queue(failing).remove(&(at, h));
            }
        }
        for h in names {
            if !self.hosts.contains_key(&h) {
                changed = true;
                self.hosts.insert(h.clone(), 0);
                if !self.resolving.contains_key(&h) {
                    self.wait(h, now, false);
                }
            }
        }
        changed
    }

    fn queue(&mut self, failing: bool) -> &mut BTreeSet<(Instant, String)> {
        if failing {
            &mut self.waiting_failing
        } else {
            &mut self.waiting
        }
    }

    fn wait(&mut self, host: String, at: Instant, failing: bool) {
        self.due_at.insert(host.clone(), (at, failing));
        self.queue(failing).insert((at, host));
    }

    /// The failing hosts' queue, when one of their slots is free.
    fn failing_open(&self) -> Option<&BTreeSet<(Instant, String)>> {
        (self.failing_in_flight < FAILING_LOOKUPS).then_some(&self.waiting_failing)
    }

    /// The next host due by `now`, marked in flight: healthy and new hosts
    /// first.
    fn next_due(&mut self, now: Instant) -> Option<String> {
        let due = |q: &BTreeSet<(Instant, String)>| q.first().is_some_and(|(at, _)| *at <= now);
        let failing = if due(&self.waiting) {
            false
        } else if self.failing_open().is_some_and(due) {
            true
        } else {
            return None;
        };
        let (_, host) = self.queue(failing).pop_first()?;
        self.due_at.remove(&host);
        self.resolving.insert(host.clone(), failing);
        self.failing_in_flight += usize::from(failing);
        Some(host)
    }

    /// When the next host can start.
    fn first_due(&self) -> Option<Instant> {
        let first = |q: &BTreeSet<(Instant, String)>| q.first().map(|(at, _)| *at);
        [first(&self.waiting), self.failing_open().and_then(first)]
            .into_iter()
            .flatten()
            .min()
    }

    /// A lookup finished: the host waits for its TTL, or, after failures,
    /// the retry interval doubled per failure in a row (a name that never
    /// resolves is not asked for every 2 s forever).
    fn done(
        &mut self,
        host: &str,
        ok: bool,
        valid_for: Option<Duration>,
        timing: &ResolveTiming,
        now: Instant,
    ) {
        if self.resolving.remove(host) == Some(true) {
            self.failing_in_flight -= 1;
        }
        let Some(failures) = self.hosts.get_mut(host) else {
            return;
        };
        *failures = if ok { 0 } else { failures.saturating_add(1) };
        let (wait, failing) = if ok {
            (next_refresh(timing, valid_for), false)
        } else {
            (retry_after(timing, *failures), true)
        };
        self.wait(host.to_string(), now + wait, failing);
    }
}

/// The wait after `failures` failed lookups in a row: the retry interval,
/// doubled per failure after the first, at most the longest refresh.
pub fn retry_after(timing: &ResolveTiming, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    timing
        .retry
        .saturating_mul(1 << doublings)
        .min(timing.max_refresh.max(timing.retry))
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
    fn failed_lookups_back_off_to_the_longest_refresh() {
        let t = ResolveTiming::default();
        assert_eq!(retry_after(&t, 1), t.retry);
        assert_eq!(retry_after(&t, 2), t.retry * 2);
        assert_eq!(retry_after(&t, 3), t.retry * 4);
        assert_eq!(retry_after(&t, 40), t.max_refresh);
    }

    #[test]
    fn the_schedule_runs_each_host_once_at_a_time_and_follows_the_list() {
        let t = ResolveTiming::default();
        let now = Instant::now();
        let mut plan = Schedule::default();
        assert!(plan.reconcile(vec!["a".into(), "b".into()], now));
        assert!(!plan.reconcile(vec!["b".into(), "a".into()], now));
        let mut started = vec![plan.next_due(now).unwrap(), plan.next_due(now).unwrap()];
        started.sort();
        assert_eq!(started, ["a", "b"]);
        // In flight: not started twice, even when removed and added back.
        assert_eq!(plan.next_due(now), None);
        assert!(plan.reconcile(vec!["b".into()], now));
        assert!(plan.reconcile(vec!["a".into(), "b".into()], now));
        assert_eq!(plan.next_due(now), None);
        // A failure waits the retry interval, a success its TTL.
        plan.done("a", false, None, &t, now);
        plan.done("b", true, Some(Duration::from_secs(60)), &t, now);
        assert_eq!(plan.first_due(), Some(now + t.retry));
        assert_eq!(plan.next_due(now + t.retry).as_deref(), Some("a"));
        plan.done("a", false, None, &t, now + t.retry);
        assert_eq!(plan.first_due(), Some(now + t.retry + t.retry * 2));
        // A removed host is not looked up again, even if its lookup was
        // in flight.
        let later = now + Duration::from_secs(60);
        // Both due: the healthy host first.
        assert_eq!(plan.next_due(later).as_deref(), Some("b"));
        assert_eq!(plan.next_due(later).as_deref(), Some("a"));
        assert!(plan.reconcile(vec!["a".into()], later));
        plan.done("b", true, Some(Duration::from_secs(60)), &t, later);
        plan.done("a", true, Some(Duration::from_secs(60)), &t, later);
        let much_later = now + Duration::from_secs(3600);
        assert_eq!(plan.next_due(much_later).as_deref(), Some("a"));
        assert_eq!(plan.next_due(much_later), None);
    }

    /// Names that never answer cannot take every lookup slot: a new host
    /// starts at once however many failing hosts are due.
    #[test]
    fn failing_hosts_hold_at_most_their_share_of_lookups() {
        let t = ResolveTiming::default();
        let now = Instant::now();
        let mut plan = Schedule::default();
        let bad: Vec<String> = (0..3 * FAILING_LOOKUPS).map(|i| format!("bad-{i}")).collect();
        plan.reconcile(bad.clone(), now);
        while let Some(h) = plan.next_due(now) {
            plan.done(&h, false, None, &t, now);
        }
        // All due again; a new host arrives.
        let later = now + t.retry;
        let mut names = bad.clone();
        names.push("new".into());
        plan.reconcile(names, later);
        assert_eq!(plan.next_due(later).as_deref(), Some("new"));
        let mut failing_started = 0;
        while plan.next_due(later).is_some() {
            failing_started += 1;
        }
        assert_eq!(failing_started, FAILING_LOOKUPS);
        // Nothing can start until a failing lookup ends, so the loop does
        // not wake for the overdue ones.
        assert_eq!(plan.first_due(), None);
        plan.done("bad-0", false, None, &t, later);
        assert!(plan.next_due(later).is_some());
        // A success makes a host healthy again.
        plan.done("new", true, Some(Duration::from_secs(60)), &t, later);
        assert_eq!(plan.due_at.get("new").map(|(_, failing)| *failing), Some(false));
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
    /// Waits until `on_change` reports an address set that `wanted`
    /// accepts, for at most `within`.
    async fn until_reported(
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<BTreeSet<IpAddr>>,
        within: Duration,
        what: &str,
        wanted: impl Fn(&BTreeSet<IpAddr>) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let seen = tokio::time::timeout_at(deadline, rx.recv()).await.expect(what);
            if seen.as_ref().is_some_and(&wanted) {
                return;
            }
        }
    }

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
        until_reported(&mut rx, within, "a change within 5 s", |seen| *seen == expected).await;
        t.set_hosts(&[]);
        until_reported(&mut rx, within, "a change within 5 s", BTreeSet::is_empty).await;
    }

    /// A name server on loopback that answers `fast-*` names with an
    /// address and never answers anything else, as an unreachable or
    /// overloaded server would.
    async fn name_server_ignoring_slow_names() -> TokioResolver {
        use hickory_resolver::{
            config::{NameServerConfig, ResolverOpts},
            net::runtime::TokioRuntimeProvider,
            proto::{
                op::{Message, MessageType},
                rr::{rdata::A, RData, Record, RecordType},
            },
        };
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = socket.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(q) = query.queries.first().cloned() else {
                    continue;
                };
                if !q.name().to_ascii().starts_with("fast-") {
                    continue;
                }
                let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
                reply.metadata.message_type = MessageType::Response;
                reply.metadata.recursion_desired = query.metadata.recursion_desired;
                reply.add_query(q.clone());
                if q.query_type() == RecordType::A {
                    reply.add_answer(Record::from_rdata(
                        q.name().clone(),
                        60,
                        RData::A(A::new(192, 0, 2, 9)),
                    ));
                }
                if let Ok(bytes) = reply.to_vec() {
                    let _ = socket.send_to(&bytes, from).await;
                }
            }
        });
        let mut server = NameServerConfig::udp("127.0.0.1".parse().unwrap());
        server.connections[0].port = port;
        let mut opts = ResolverOpts::default();
        // Far longer than the test waits: only concurrency can pass it.
        opts.timeout = Duration::from_secs(120);
        opts.attempts = 1;
        let mut b = TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, vec![], vec![server]),
            TokioRuntimeProvider::default(),
        );
        *b.options_mut() = opts;
        b.build().unwrap()
    }

    /// A tenant's route to a name that never resolves must not hold up
    /// capture of the hosts after it.
    #[tokio::test]
    async fn a_host_whose_lookup_hangs_does_not_hold_up_the_others() {
        let resolver = name_server_ignoring_slow_names().await;
        // Sorted before the fast host, as the loop walks hosts in order.
        let slow = 8;
        assert!(slow < CONCURRENT_LOOKUPS);
        let mut hosts: Vec<String> = (0..slow).map(|i| format!("a-slow-{i}.test")).collect();
        hosts.push("fast-llm.test".into());
        let t = Arc::new(Targets::new(&hosts, vec![80]));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(
            t.clone()
                .resolve_forever_with(resolver, ResolveTiming::default(), move |t| {
                    let _ = tx.send(t.all_addresses());
                }),
        );
        let expected: BTreeSet<IpAddr> = ["192.0.2.9".parse().unwrap()].into();
        until_reported(
            &mut rx,
            Duration::from_secs(10),
            "the fast host captured while the slow lookups hang",
            |seen| *seen == expected,
        )
        .await;
        assert_eq!(
            t.host_of("192.0.2.9".parse().unwrap()).as_deref(),
            Some("fast-llm.test")
        );
    }

    #[test]
    fn host_of_follows_changes_and_removals() {
        let t = Targets::new(&["b.test".into(), "a.test".into()], vec![80]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(t.record("b.test", Ok(vec![ip("192.0.2.1"), ip("192.0.2.2")])));
        assert!(t.record("a.test", Ok(vec![ip("192.0.2.2")])));
        // The same answer again (in another order) changes nothing to write.
        assert!(!t.record("b.test", Ok(vec![ip("192.0.2.2"), ip("192.0.2.1")])));
        // Shared: the first in name order.
        assert_eq!(t.host_of(ip("192.0.2.2")).as_deref(), Some("a.test"));
        assert_eq!(t.host_of(ip("192.0.2.1")).as_deref(), Some("b.test"));
        t.record("b.test", Ok(vec![ip("192.0.2.3")]));
        assert_eq!(t.host_of(ip("192.0.2.1")), None);
        assert_eq!(t.host_of(ip("192.0.2.3")).as_deref(), Some("b.test"));
        t.set_hosts(&["b.test".into()]);
        assert_eq!(t.host_of(ip("192.0.2.2")), None);
        assert_eq!(t.all_addresses(), [ip("192.0.2.3")].into());
        // An error keeps the last good addresses, and changes nothing.
        assert!(!t.record("b.test", Err("timeout".into())));
        assert_eq!(t.host_of(ip("192.0.2.3")).as_deref(), Some("b.test"));
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

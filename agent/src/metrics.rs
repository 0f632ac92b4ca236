//! Prometheus metrics of the agent. eBPF counters and map sizes are read
//! from the kernel at scrape time by a collector, so they never go stale.

use std::sync::Arc;

use llm_egress_common::COUNTER_NAMES;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge, gauge::Gauge, MetricType,
    },
    registry::Registry,
};

use crate::loader::Capture;

/// Who made a captured connection and where it was going.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub namespace: String,
    pub workload: String,
    pub service_account: String,
    /// `host:port` when the address belongs to a configured host.
    pub destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByteLabels {
    pub namespace: String,
    pub workload: String,
    pub service_account: String,
    pub destination: String,
    /// `sent` (workload → destination) or `received`.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub reason: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    pub connections: Family<ConnectionLabels, Counter>,
    pub bytes: Family<ByteLabels, Counter>,
    pub rejected: Family<RejectLabels, Counter>,
    pub active: Gauge,
}

/// Reads the kernel-side counters and map sizes on every scrape.
#[derive(Debug)]
struct EbpfCollector(Arc<Capture>);

impl Collector for EbpfCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters = self.0.counters();
        let mut family = encoder.encode_descriptor(
            "llm_egress_agent_ebpf_events",
            "Events counted by the kernel programs: captured = connect() redirected to the proxy, passed = connect() to a target from a workload that is not enrolled, errors = a capture that could not be recorded (connect refused), established = captured connections that reached the proxy",
            None,
            MetricType::Counter,
        )?;
        for (name, value) in COUNTER_NAMES.iter().zip(counters) {
            ConstCounter::new(value).encode(family.encode_family(&[("event", *name)])?)?;
        }
        let sizes = self.0.map_sizes();
        let mut family = encoder.encode_descriptor(
            "llm_egress_agent_map_entries",
            "Entries in each eBPF map",
            None,
            MetricType::Gauge,
        )?;
        let mut sizes: Vec<_> = sizes.into_iter().collect();
        sizes.sort();
        for (map, size) in sizes {
            ConstGauge::new(size as i64).encode(family.encode_family(&[("map", map)])?)?;
        }
        Ok(())
    }
}

impl Metrics {
    pub fn new(capture: Arc<Capture>) -> Metrics {
        let mut registry = Registry::default();
        let connections = Family::<ConnectionLabels, Counter>::default();
        let bytes = Family::<ByteLabels, Counter>::default();
        let rejected = Family::<RejectLabels, Counter>::default();
        let active = Gauge::default();
        registry.register(
            "llm_egress_agent_captured_connections",
            "Captured connections accepted by the proxy, by workload and original destination",
            connections.clone(),
        );
        registry.register(
            "llm_egress_agent_captured_bytes",
            "Bytes carried for captured connections, by workload, destination and direction",
            bytes.clone(),
        );
        registry.register(
            "llm_egress_agent_rejected_connections",
            "Connections the proxy closed without forwarding: no_record (not captured by eBPF), unknown_workload (cgroup no longer enrolled), upstream_error (destination or tunnel failed mid-way), gateway_unavailable (no tunnel to the egress gateway could be opened)",
            rejected.clone(),
        );
        registry.register(
            "llm_egress_agent_active_connections",
            "Captured connections currently open",
            active.clone(),
        );
        registry.register_collector(Box::new(EbpfCollector(capture)));
        Metrics {
            registry,
            connections,
            bytes,
            rejected,
            active,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

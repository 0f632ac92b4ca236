//! Prometheus metrics of the gateway. Labels never carry a key or a body.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub principal: String,
    pub host: String,
    pub provider: String,
    pub model: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    pub host: String,
    pub provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub principal: String,
    pub model: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    pub provider: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PassthroughLabels {
    pub principal: String,
    pub sni: String,
    pub decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TunnelLabels {
    pub peer: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    pub client_timeouts: Family<StageLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<DurationLabels, Histogram>,
    pub tokens: Family<TokenLabels, Counter>,
    pub reloads: Family<ResultLabels, Counter>,
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
    pub passthrough: Family<PassthroughLabels, Counter>,
    pub tunnel_streams: Family<TunnelLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<DurationLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
            ])
        });
        let tokens = Family::<TokenLabels, Counter>::default();
        let reloads = Family::<ResultLabels, Counter>::default();
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        let passthrough = Family::<PassthroughLabels, Counter>::default();
        let tunnel_streams = Family::<TunnelLabels, Counter>::default();
        let client_timeouts = Family::<StageLabels, Counter>::default();
        registry.register(
            "llm_egress_gateway_client_timeouts",
            "Client connections and streams closed by a deadline, by stage (sniff, request_head, body, idle)",
            client_timeouts.clone(),
        );
        registry.register(
            "llm_egress_gateway_requests",
            "LLM requests by principal, host, provider, model and status code",
            requests.clone(),
        );
        registry.register(
            "llm_egress_gateway_request_duration_seconds",
            "Time from request to the end of the response body",
            duration.clone(),
        );
        registry.register(
            "llm_egress_gateway_tokens",
            "Tokens reported by providers, by principal, model and kind (prompt, completion)",
            tokens.clone(),
        );
        registry.register(
            "llm_egress_gateway_config_reloads",
            "Configuration reloads by result (success, failure: the last good configuration stays)",
            reloads.clone(),
        );
        registry.register(
            "llm_egress_gateway_upstream_errors",
            "Provider requests that failed, by provider and reason (connect, timeout, failed)",
            upstream_errors.clone(),
        );
        registry.register(
            "llm_egress_gateway_passthrough_connections",
            "TLS connections passed through by SNI, by principal, SNI and decision",
            passthrough.clone(),
        );
        registry.register(
            "llm_egress_gateway_tunnel_streams",
            "Tunnel streams by peer kind (agent, workload) and outcome",
            tunnel_streams.clone(),
        );
        Metrics {
            registry,
            client_timeouts,
            requests,
            duration,
            tokens,
            reloads,
            upstream_errors,
            passthrough,
            tunnel_streams,
        }
    }

    pub fn client_timeout(&self, stage: &'static str) {
        self.client_timeouts.get_or_create(&StageLabels { stage }).inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

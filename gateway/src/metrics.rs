//! Prometheus metrics of the gateway. Labels never carry a key or a body.
//! LLM traffic follows the OpenTelemetry GenAI semantic conventions
//! (`gen_ai.client.token.usage`, `gen_ai.server.request.duration`,
//! `gen_ai.server.time_to_first_token`, `gen_ai.server.time_per_output_token`,
//! in Prometheus form: dots become underscores, seconds as the unit), with
//! the caller's workload principal as an extra label; `llm_egress_*` keeps
//! what those do not say (status codes, reloads, tunnel and client events).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::{Registry, Unit},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub principal: String,
    pub host: String,
    pub provider: String,
    pub model: String,
    pub code: u16,
}

/// The GenAI attributes of one request (`gen_ai.*`, `error.type`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GenAiLabels {
    pub gen_ai_operation_name: String,
    pub gen_ai_provider_name: String,
    pub gen_ai_request_model: String,
    pub gen_ai_response_model: String,
    /// Empty on success; the HTTP status code otherwise.
    pub error_type: String,
    pub principal: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenUsageLabels {
    pub gen_ai_operation_name: String,
    pub gen_ai_provider_name: String,
    pub gen_ai_request_model: String,
    pub gen_ai_response_model: String,
    /// `input` or `output`.
    pub gen_ai_token_type: &'static str,
    pub principal: String,
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
pub struct BackendLabels {
    pub provider: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EjectionLabels {
    pub provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExtAuthzLabels {
    pub provider: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenDetailLabels {
    pub principal: String,
    pub gen_ai_request_model: String,
    /// `cached_input` or `reasoning_output`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabels {
    /// `namespace/name` of the LLMTokenBudget.
    pub budget: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetRefusalLabels {
    pub budget: String,
    /// exhausted, too_large, store_unavailable, store_unavailable_fail_open.
    pub reason: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    pub budget_reserved: Family<BudgetLabels, Counter>,
    pub budget_charged: Family<BudgetLabels, Counter>,
    pub budget_refused: Family<BudgetRefusalLabels, Counter>,
    pub budget_store_errors: Counter,
    pub token_details: Family<TokenDetailLabels, Counter>,
    pub client_timeouts: Family<StageLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub token_usage: Family<TokenUsageLabels, Histogram>,
    pub request_duration: Family<GenAiLabels, Histogram>,
    pub time_to_first_token: Family<GenAiLabels, Histogram>,
    pub time_per_output_token: Family<GenAiLabels, Histogram>,
    pub reloads: Family<ResultLabels, Counter>,
    /// Reading, checking and compiling the whole configuration once.
    pub reload_duration: Histogram,
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
    pub passthrough: Family<PassthroughLabels, Counter>,
    pub tunnel_streams: Family<TunnelLabels, Counter>,
    pub ext_authz_checks: Family<ExtAuthzLabels, Counter>,
    pub backend_attempts: Family<BackendLabels, Counter>,
    pub backend_ejections: Family<EjectionLabels, Counter>,
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
        // Bucket boundaries as the GenAI conventions advise.
        let token_usage = Family::<TokenUsageLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0,
                4194304.0, 16777216.0, 67108864.0,
            ])
        });
        let request_duration = Family::<GenAiLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
            ])
        });
        let time_to_first_token = Family::<GenAiLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            ])
        });
        let time_per_output_token = Family::<GenAiLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
            ])
        });
        let reloads = Family::<ResultLabels, Counter>::default();
        let reload_duration = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ]);
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        let passthrough = Family::<PassthroughLabels, Counter>::default();
        let tunnel_streams = Family::<TunnelLabels, Counter>::default();
        let ext_authz_checks = Family::<ExtAuthzLabels, Counter>::default();
        let backend_attempts = Family::<BackendLabels, Counter>::default();
        let backend_ejections = Family::<EjectionLabels, Counter>::default();
        let client_timeouts = Family::<StageLabels, Counter>::default();
        let token_details = Family::<TokenDetailLabels, Counter>::default();
        let budget_reserved = Family::<BudgetLabels, Counter>::default();
        let budget_charged = Family::<BudgetLabels, Counter>::default();
        let budget_refused = Family::<BudgetRefusalLabels, Counter>::default();
        let budget_store_errors = Counter::default();
        registry.register(
            "llm_egress_gateway_budget_tokens_reserved",
            "Tokens reserved by requests before they were forwarded, per LLMTokenBudget",
            budget_reserved.clone(),
        );
        registry.register(
            "llm_egress_gateway_budget_tokens_charged",
            "Tokens charged once requests ended (the provider's reported usage; the rest of each reservation is given back), per LLMTokenBudget",
            budget_charged.clone(),
        );
        registry.register(
            "llm_egress_gateway_budget_requests_refused",
            "Requests a token budget refused (or let through unbudgeted with --budget-fail-open), by budget and reason",
            budget_refused.clone(),
        );
        registry.register(
            "llm_egress_gateway_budget_store_errors",
            "Budget store (Redis) operations that failed or timed out",
            budget_store_errors.clone(),
        );
        registry.register(
            "llm_egress_gateway_token_details",
            "Input tokens served from the provider's cache and output tokens spent on reasoning, by principal and model (parts of gen_ai_client_token_usage)",
            token_details.clone(),
        );
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
            "gen_ai_client_token_usage",
            "Tokens used per request, by token type (input, output), operation, provider, models and principal (gen_ai.client.token.usage)",
            token_usage.clone(),
        );
        registry.register_with_unit(
            "gen_ai_server_request_duration",
            "Time from request to the end of the response (gen_ai.server.request.duration)",
            Unit::Seconds,
            request_duration.clone(),
        );
        registry.register_with_unit(
            "gen_ai_server_time_to_first_token",
            "Time from request to the first chunk of a streamed response (gen_ai.server.time_to_first_token)",
            Unit::Seconds,
            time_to_first_token.clone(),
        );
        registry.register_with_unit(
            "gen_ai_server_time_per_output_token",
            "Time per output token after the first, for streamed responses (gen_ai.server.time_per_output_token)",
            Unit::Seconds,
            time_per_output_token.clone(),
        );
        registry.register(
            "llm_egress_gateway_config_reloads",
            "Configuration reloads by result (success, failure: the last good configuration stays)",
            reloads.clone(),
        );
        registry.register_with_unit(
            "llm_egress_gateway_config_reload_duration",
            "Time to read, check and compile the configuration when it changed",
            Unit::Seconds,
            reload_duration.clone(),
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
        registry.register(
            "llm_egress_gateway_ext_authz_checks",
            "CUSTOM authorization checks by provider and result (allow, deny, error, error_fail_open, unknown_provider)",
            ext_authz_checks.clone(),
        );
        registry.register(
            "llm_egress_gateway_backend_attempts",
            "Requests sent to each provider (backend) and how each attempt ended: served, server_error, rate_limited, failed_last, or the connection error",
            backend_attempts.clone(),
        );
        registry.register(
            "llm_egress_gateway_backend_ejections",
            "Times a provider was ejected by outlier detection (consecutive failures, or a 429 with Retry-After)",
            backend_ejections.clone(),
        );
        Metrics {
            registry,
            budget_reserved,
            budget_charged,
            budget_refused,
            budget_store_errors,
            token_details,
            client_timeouts,
            requests,
            token_usage,
            request_duration,
            time_to_first_token,
            time_per_output_token,
            reloads,
            reload_duration,
            upstream_errors,
            passthrough,
            tunnel_streams,
            ext_authz_checks,
            backend_attempts,
            backend_ejections,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric the Grafana dashboard queries is one this gateway
    /// exports (a renamed metric would leave a panel empty).
    #[test]
    fn the_dashboard_queries_only_metrics_the_gateway_exports() {
        let m = Metrics::new();
        m.token_usage
            .get_or_create(&TokenUsageLabels {
                gen_ai_operation_name: "chat".into(),
                gen_ai_provider_name: "p".into(),
                gen_ai_request_model: "m".into(),
                gen_ai_response_model: "m".into(),
                gen_ai_token_type: "input",
                principal: "x".into(),
            })
            .observe(1.0);
        let labels = GenAiLabels {
            gen_ai_operation_name: "chat".into(),
            gen_ai_provider_name: "p".into(),
            gen_ai_request_model: "m".into(),
            gen_ai_response_model: "m".into(),
            error_type: String::new(),
            principal: "x".into(),
        };
        for h in [
            &m.request_duration,
            &m.time_to_first_token,
            &m.time_per_output_token,
        ] {
            h.get_or_create(&labels).observe(0.1);
        }
        m.client_timeout("sniff");
        m.requests
            .get_or_create(&RequestLabels {
                principal: "x".into(),
                host: "h".into(),
                provider: "p".into(),
                model: "m".into(),
                code: 200,
            })
            .inc();
        let exported = m.encode();
        let dashboard: serde_json::Value = serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana/llm-egress-genai.json"
        )))
        .expect("the dashboard is JSON");
        let mut checked = 0;
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if word.starts_with("gen_ai_") || word.starts_with("llm_egress_") {
                        if word.starts_with("gen_ai_token_type")
                            || word.starts_with("gen_ai_operation_name")
                            || word.starts_with("gen_ai_request_model")
                            || word.starts_with("gen_ai_response_model")
                        {
                            continue;
                        }
                        assert!(
                            exported.contains(&format!("\n{word}")),
                            "{word} is not exported:\n{exported}"
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked >= 8, "{checked}");
    }
}

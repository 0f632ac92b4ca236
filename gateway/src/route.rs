//! LLMRoute: which provider serves a request at this gateway. A route for
//! the request's host must list this gateway (by its Gateway resource's
//! `namespace/name`); its first rule whose match names this gateway (and
//! whose headers match) chooses a backend, by weight.

use std::collections::HashMap;

use hyper::HeaderMap;
use llm_egress_config::resources::{BackendRef, LlmRouteRule, LlmRouteSpec, Named};

use crate::config::{Compiled, Provider};

/// The LLMRoutes, with the one that serves each host at this gateway found
/// by lookup: the first, in file order, that names one of this gateway's
/// Gateway resources.
#[derive(Debug, Default)]
pub struct Routes {
    all: Vec<Named<LlmRouteSpec>>,
    /// Lower-cased host to its route in `all`.
    here: HashMap<String, usize>,
}

impl Routes {
    pub fn new(all: Vec<Named<LlmRouteSpec>>, gateway_names: &[String]) -> Routes {
        let mut here = HashMap::new();
        for (i, r) in all.iter().enumerate() {
            if r.spec.gateways.iter().any(|g| gateway_names.contains(g)) {
                here.entry(r.spec.host.to_ascii_lowercase()).or_insert(i);
            }
        }
        Routes { all, here }
    }

    pub fn len(&self) -> usize {
        self.all.len()
    }

    /// The route for `host` (any case, no port) at this gateway.
    pub fn at_this_gateway(&self, host: &str) -> Option<&Named<LlmRouteSpec>> {
        let i = match self.here.get(host) {
            Some(i) => *i,
            None => *self.here.get(&host.to_ascii_lowercase())?,
        };
        Some(&self.all[i])
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error(
        "no LLMRoute for host {0:?} at this gateway; requests for hosts without a route are not forwarded"
    )]
    NoRoute(String),
    #[error("LLMRoute for {host:?} sends to provider host {provider:?}, but no LLMProvider for that host applies to this gateway")]
    NoProvider { host: String, provider: String },
}

fn strip_port(host: &str) -> &str {
    host.rsplit_once(':')
        .filter(|(_, p)| p.parse::<u16>().is_ok())
        .map_or(host, |(h, _)| h)
}

fn rule_applies(rule: &LlmRouteRule, gateways: &[String], headers: &HeaderMap) -> bool {
    rule.matches.iter().any(|m| {
        m.gateways.iter().any(|g| gateways.contains(g))
            && m.headers.iter().all(|(name, sm)| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| sm.matches(v))
            })
    })
}

/// Picks an index by weight; `roll` returns a value in `0..total`. A
/// missing weight counts as 1 when others are weighted, as Istio does for a
/// lone backend (which then gets everything).
fn pick_index(weights: &[u32], roll: impl FnOnce(u32) -> u32) -> Option<usize> {
    let total: u32 = weights.iter().sum();
    if total == 0 {
        return (!weights.is_empty()).then_some(0);
    }
    let mut r = roll(total);
    for (i, w) in weights.iter().enumerate() {
        if r < *w {
            return Some(i);
        }
        r -= w;
    }
    weights.len().checked_sub(1)
}

/// Picks among backends by weight; `roll` returns a value in `0..total`.
#[cfg(test)]
fn pick_backend(backends: &[BackendRef], roll: impl FnOnce(u32) -> u32) -> Option<&BackendRef> {
    let weights: Vec<u32> = backends.iter().map(|b| b.weight.unwrap_or(1)).collect();
    pick_index(&weights, roll).map(|i| &backends[i])
}

/// The providers that may serve a request to `host`, in the order to try
/// them: a weighted pick among the lowest priority's backends that are not
/// ejected, then that priority's others, then the next priorities'. Ejected
/// providers come last, so that something is always tried.
pub fn candidates<'a>(
    c: &'a Compiled,
    host: &str,
    headers: &HeaderMap,
    roll: impl FnOnce(u32) -> u32,
    ejected: impl Fn(&str) -> bool,
) -> Result<Vec<&'a Provider>, RouteError> {
    let host_lc = strip_port(host).to_ascii_lowercase();
    let route = c
        .routes
        .at_this_gateway(&host_lc)
        .ok_or_else(|| RouteError::NoRoute(host_lc.clone()))?;
    let rule = route
        .spec
        .rules
        .iter()
        .find(|r| rule_applies(r, &c.gateway_names, headers))
        .ok_or_else(|| RouteError::NoRoute(host_lc.clone()))?;
    let mut entries: Vec<(&BackendRef, &Provider)> = Vec::with_capacity(rule.backend_refs.len());
    for b in &rule.backend_refs {
        let p = c
            .providers
            .get(&b.provider_host.to_ascii_lowercase())
            .ok_or_else(|| RouteError::NoProvider {
                host: host_lc.clone(),
                provider: b.provider_host.clone(),
            })?;
        entries.push((b, p));
    }
    // Lowest priority first; within a level, heavier backends first.
    entries.sort_by_key(|(b, _)| (b.priority.unwrap_or(0), std::cmp::Reverse(b.weight.unwrap_or(1))));
    let (mut healthy, sick): (Vec<_>, Vec<_>) = entries.into_iter().partition(|(_, p)| !ejected(&p.name));
    // The weighted pick among the best healthy level's backends goes first.
    if let Some(level) = healthy.first().map(|(b, _)| b.priority.unwrap_or(0)) {
        let weights: Vec<u32> = healthy
            .iter()
            .take_while(|(b, _)| b.priority.unwrap_or(0) == level)
            .map(|(b, _)| b.weight.unwrap_or(1))
            .collect();
        if let Some(i) = pick_index(&weights, roll) {
            let first = healthy.remove(i);
            healthy.insert(0, first);
        }
    }
    let mut order: Vec<&Provider> = Vec::new();
    for (_, p) in healthy.into_iter().chain(sick) {
        if !order.iter().any(|q| q.name == p.name) {
            order.push(p);
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{compile, GatewayIdentity};
    use llm_egress_config::resources::ResourceSet;
    use std::{collections::BTreeMap, path::Path};

    /// The first provider to try.
    fn select<'a>(
        c: &'a Compiled,
        host: &str,
        headers: &HeaderMap,
        roll: impl FnOnce(u32) -> u32,
    ) -> Result<&'a Provider, RouteError> {
        candidates(c, host, headers, roll, |_| false)?
            .first()
            .copied()
            .ok_or_else(|| RouteError::NoRoute(host.into()))
    }

    fn me() -> GatewayIdentity {
        GatewayIdentity {
            namespace: "istio-system".into(),
            labels: BTreeMap::from([("istio".into(), "egressgateway".into())]),
            root_namespace: "istio-system".into(),
            trusted_namespaces: Vec::new(),
            keys: Default::default(),
        }
    }

    fn compiled(extra: &str) -> Compiled {
        let (mut set, mut problems) = ResourceSet::load_dir(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/examples"
        )))
        .unwrap();
        problems.extend(set.add_text(Path::new("extra.yaml"), extra));
        compile(set, problems, &me(), |_| Some("k".into())).unwrap()
    }

    #[test]
    fn seed_route_chooses_the_dashscope_provider_at_the_gateway() {
        let c = compiled("");
        let p = select(&c, "dashscope.aliyuncs.com", &HeaderMap::new(), |_| 0).unwrap();
        assert_eq!(p.path, "/compatible-mode/v1/chat/completions");
        let p = select(&c, "DashScope.aliyuncs.com:80", &HeaderMap::new(), |_| 0).unwrap();
        assert_eq!(p.host, "dashscope.aliyuncs.com");
    }

    #[test]
    fn unknown_host_has_no_route() {
        let c = compiled("");
        assert_eq!(
            select(&c, "api.openai.com", &HeaderMap::new(), |_| 0).unwrap_err(),
            RouteError::NoRoute("api.openai.com".into())
        );
    }

    #[test]
    fn the_first_route_naming_this_gateway_serves_its_host() {
        let route = |name: &str, host: &str, gateway: &str, provider: &str| {
            format!("apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata: {{name: {name}}}\nspec:\n  host: {host}\n  gateways: [{gateway}]\n  rules:\n  - matches: [{{gateways: [{gateway}]}}]\n    backendRefs: [{{providerHost: {provider}}}]\n---\n")
        };
        let c = compiled(
            &[
                // Another gateway's route for the host comes first: skipped.
                route(
                    "elsewhere",
                    "LLM.example",
                    "istio-system/other-gw",
                    "api.openai.com",
                ),
                route(
                    "first",
                    "llm.example",
                    "istio-system/egress-gw",
                    "dashscope.aliyuncs.com",
                ),
                route(
                    "second",
                    "llm.EXAMPLE",
                    "istio-system/egress-gw",
                    "api.openai.com",
                ),
            ]
            .concat(),
        );
        assert_eq!(
            c.routes
                .at_this_gateway("Llm.Example")
                .map(|r| r.meta.name.as_str()),
            Some("first")
        );
        let p = select(&c, "LLM.example:80", &HeaderMap::new(), |_| 0).unwrap();
        assert_eq!(p.host, "dashscope.aliyuncs.com");
        assert!(c.routes.at_this_gateway("other.example").is_none());
    }

    #[test]
    fn route_to_a_missing_provider_is_reported() {
        let c = compiled("apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata: {name: o}\nspec:\n  host: api.openai.com\n  gateways: [istio-system/egress-gw]\n  rules:\n  - matches: [{gateways: [istio-system/egress-gw]}]\n    backendRefs: [{providerHost: api.openai.com}]\n");
        assert!(matches!(
            select(&c, "api.openai.com", &HeaderMap::new(), |_| 0),
            Err(RouteError::NoProvider { .. })
        ));
    }

    #[test]
    fn header_matches_and_weights() {
        let b = |h: &str, w| BackendRef {
            provider_host: h.into(),
            weight: Some(w),
            priority: None,
        };
        let backends = [b("a", 80), b("b", 20)];
        assert_eq!(pick_backend(&backends, |_| 0).unwrap().provider_host, "a");
        assert_eq!(pick_backend(&backends, |_| 79).unwrap().provider_host, "a");
        assert_eq!(pick_backend(&backends, |_| 80).unwrap().provider_host, "b");
        assert_eq!(pick_backend(&backends, |t| t - 1).unwrap().provider_host, "b");

        let c = compiled("apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata: {name: o}\nspec:\n  host: llm.example.test\n  gateways: [istio-system/egress-gw]\n  rules:\n  - matches: [{gateways: [istio-system/egress-gw], headers: {x-tier: {exact: gold}}}]\n    backendRefs: [{providerHost: dashscope.aliyuncs.com}]\n");
        assert!(select(&c, "llm.example.test", &HeaderMap::new(), |_| 0).is_err());
        let mut h = HeaderMap::new();
        h.insert("x-tier", "gold".parse().unwrap());
        assert!(select(&c, "llm.example.test", &h, |_| 0).is_ok());
    }

    #[test]
    fn failover_order_follows_priority_and_skips_ejected_providers() {
        let providers = "apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMProvider\nmetadata: {name: a, namespace: istio-system}\nspec: {host: a.test, path: /v1, configs: {defaultConfig: {openAIConfig: {model: m, apiKey: k}}}}\n---\napiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMProvider\nmetadata: {name: b, namespace: istio-system}\nspec: {host: b.test, path: /v1, configs: {defaultConfig: {openAIConfig: {model: m, apiKey: k}}}}\n---\napiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMProvider\nmetadata: {name: c, namespace: istio-system}\nspec: {host: c.test, path: /v1, configs: {defaultConfig: {openAIConfig: {model: m, apiKey: k}}}}\n";
        let route = "apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata: {name: r}\nspec:\n  host: llm.test\n  gateways: [istio-system/egress-gw]\n  rules:\n  - matches: [{gateways: [istio-system/egress-gw]}]\n    backendRefs: [{providerHost: c.test, priority: 1}, {providerHost: a.test, weight: 50}, {providerHost: b.test, weight: 50}]\n";
        let c = compiled(&format!("{providers}---\n{route}"));
        let names = |v: Vec<&Provider>| v.iter().map(|p| p.host.clone()).collect::<Vec<_>>();
        let order = |roll: u32, ejected: &[&str]| {
            let ejected: Vec<String> = ejected.iter().map(|s| s.to_string()).collect();
            let hosts: Vec<(String, String)> = c
                .providers
                .values()
                .map(|p| (p.name.clone(), p.host.clone()))
                .collect();
            names(
                candidates(
                    &c,
                    "llm.test",
                    &HeaderMap::new(),
                    |_| roll,
                    |name| hosts.iter().any(|(n, h)| n == name && ejected.contains(h)),
                )
                .unwrap(),
            )
        };
        // Priority 0 first (the weighted pick, then its peer), priority 1 last.
        assert_eq!(order(0, &[]), ["a.test", "b.test", "c.test"]);
        assert_eq!(order(60, &[]), ["b.test", "a.test", "c.test"]);
        // An ejected provider goes to the end; all ejected: still tried.
        assert_eq!(order(0, &["a.test"]), ["b.test", "c.test", "a.test"]);
        assert_eq!(order(0, &["a.test", "b.test"]), ["c.test", "a.test", "b.test"]);
        assert_eq!(order(0, &["a.test", "b.test", "c.test"]).len(), 3);
    }
}

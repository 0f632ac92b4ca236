//! Which resources a tenant may publish, as Istio scopes configuration.
//!
//! - An `LLMProvider` names a host and a key to send there, so it is accepted
//!   only from the *trusted namespaces* (the gateway's, Istio's root
//!   namespace, and any the operator adds). So are `Gateway` objects.
//! - An `LLMRoute` from a trusted namespace may route any host. A route from
//!   any other namespace may only claim a host that an accepted provider
//!   serves and may only send to accepted providers: a tenant can publish a
//!   route for a provider the platform declared, never capture other hosts.
//! - Two routes for one host conflict. Routes of trusted namespaces come
//!   first; among equals the oldest (creation time, then namespace/name)
//!   wins, as in Istio; the others are rejected and name the winner.
//!
//! Both the gateway and the agent apply the same rules to the same objects,
//! so an agent captures exactly the hosts of the routes the gateway accepts.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use crate::resources::{LlmRouteSpec, Meta, Named, Problem, ResourceSet, Severity};

/// The gateway name that marks a route rule as the capture side.
pub const MESH_GATEWAY: &str = "mesh";

/// The namespaces trusted with providers (and so with keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    trusted: BTreeSet<String>,
}

impl Scope {
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(trusted: I) -> Scope {
        Scope {
            trusted: trusted.into_iter().map(Into::into).collect(),
        }
    }

    pub fn is_trusted(&self, namespace: &str) -> bool {
        self.trusted.contains(namespace)
    }

    pub fn trusted(&self) -> impl Iterator<Item = &str> {
        self.trusted.iter().map(String::as_str)
    }

    fn list(&self) -> String {
        self.trusted.iter().cloned().collect::<Vec<_>>().join(", ")
    }
}

fn rejection(kind: &str, meta: &Meta, file: &Path, field: &str, message: String) -> Problem {
    Problem {
        severity: Severity::Error,
        file: file.to_owned(),
        resource: Some(format!("{kind} {}/{}", meta.namespace(), meta.name)),
        field: Some(field.into()),
        message,
    }
}

/// Precedence of an object among conflicting ones: trusted namespaces
/// first, then the oldest, then by namespace and name (deterministic).
fn precedence<T>(scope: &Scope, r: &Named<T>) -> (bool, Option<String>, String, String) {
    (
        !scope.is_trusted(r.meta.namespace()),
        // RFC 3339 in UTC (as the API server writes it) sorts by time; an
        // object without a timestamp (files) sorts after those with one.
        r.meta.creation_timestamp.clone().or(Some("~".into())),
        r.meta.namespace().to_string(),
        r.meta.name.clone(),
    )
}

/// Whether a rule of the route applies only on the capture side (gateway
/// `mesh`): every gateway it applies to (its matches', else the route's,
/// else `mesh`) is `mesh`.
fn rule_is_mesh(spec: &LlmRouteSpec, rule: &crate::resources::LlmRouteRule) -> bool {
    let route_gateways: Vec<&str> = if spec.gateways.is_empty() {
        vec![MESH_GATEWAY]
    } else {
        spec.gateways.iter().map(String::as_str).collect()
    };
    if rule.matches.is_empty() {
        return route_gateways.iter().all(|g| *g == MESH_GATEWAY);
    }
    rule.matches.iter().all(|m| {
        if m.gateways.is_empty() {
            route_gateways.iter().all(|g| *g == MESH_GATEWAY)
        } else {
            m.gateways.iter().all(|g| g == MESH_GATEWAY)
        }
    })
}

/// Why a route is refused (the field and the reason), given the accepted
/// providers and the routes accepted before it; `None` when it is accepted.
fn route_refusal(
    r: &Named<LlmRouteSpec>,
    host: &str,
    scope: &Scope,
    provider_of: &BTreeMap<String, String>,
    route_of: &BTreeMap<String, String>,
) -> Option<(String, String)> {
    if !scope.is_trusted(r.meta.namespace()) {
        if !provider_of.contains_key(host) {
            return Some((
                "spec.host".into(),
                format!(
                    "a route outside the trusted namespaces ({}) may only route the host of an accepted LLMProvider, and {host} is none",
                    scope.list()
                ),
            ));
        }
        let foreign = r.spec.rules.iter().enumerate().find_map(|(i, rule)| {
            if rule_is_mesh(&r.spec, rule) {
                return None;
            }
            rule.backend_refs.iter().enumerate().find_map(|(j, b)| {
                (!provider_of.contains_key(&b.provider_host.to_ascii_lowercase()))
                    .then(|| (i, j, b.provider_host.clone()))
            })
        });
        if let Some((i, j, backend)) = foreign {
            return Some((
                format!("spec.rules[{i}].backendRefs[{j}].providerHost"),
                format!(
                    "a route outside the trusted namespaces ({}) may only send to accepted LLMProviders, and {backend} is none",
                    scope.list()
                ),
            ));
        }
    }
    route_of.get(host).map(|winner| {
        (
            "spec.host".into(),
            format!(
                "conflict: host {host} is already routed by LLMRoute {winner}, which takes precedence (trusted namespaces first, then the oldest)"
            ),
        )
    })
}

/// Removes what `scope` does not allow from `set` and returns why, one
/// problem per object removed (severity `Error`, on the object's field).
pub fn admit(set: &mut ResourceSet, scope: &Scope) -> Vec<Problem> {
    let mut problems = Vec::new();

    // Providers: trusted namespaces only; one per host.
    let mut providers = std::mem::take(&mut set.providers);
    providers.sort_by_key(|p| precedence(scope, p));
    let mut provider_of: BTreeMap<String, String> = BTreeMap::new();
    for p in providers {
        let id = format!("{}/{}", p.meta.namespace(), p.meta.name);
        if !scope.is_trusted(p.meta.namespace()) {
            problems.push(rejection(
                "LLMProvider",
                &p.meta,
                &p.file,
                "metadata.namespace",
                format!(
                    "an LLMProvider holds a provider key and is accepted only in a trusted namespace ({}); create it there (platform team) or add the namespace with --trusted-namespace",
                    scope.list()
                ),
            ));
            continue;
        }
        let host = p.spec.host.to_ascii_lowercase();
        if let Some(winner) = provider_of.get(&host) {
            problems.push(rejection(
                "LLMProvider",
                &p.meta,
                &p.file,
                "spec.host",
                format!("host {host} is already served by LLMProvider {winner} (created earlier; the oldest wins)"),
            ));
            continue;
        }
        provider_of.insert(host, id);
        set.providers.push(p);
    }

    // Gateways select the gateway pods: trusted namespaces only.
    let gateways = std::mem::take(&mut set.gateways);
    for g in gateways {
        if scope.is_trusted(g.meta.namespace()) {
            set.gateways.push(g);
        } else {
            problems.push(rejection(
                "Gateway",
                &g.meta,
                &g.file,
                "metadata.namespace",
                format!(
                    "a Gateway for the egress gateway is accepted only in a trusted namespace ({})",
                    scope.list()
                ),
            ));
        }
    }

    // Routes: tenants only for providers' hosts, to providers; one per host.
    let mut routes = std::mem::take(&mut set.routes);
    routes.sort_by_key(|r| precedence(scope, r));
    let mut route_of: BTreeMap<String, String> = BTreeMap::new();
    for r in routes {
        let host = r.spec.host.to_ascii_lowercase();
        if let Some((field, message)) = route_refusal(&r, &host, scope, &provider_of, &route_of) {
            problems.push(rejection("LLMRoute", &r.meta, &r.file, &field, message));
            continue;
        }
        route_of.insert(host, format!("{}/{}", r.meta.namespace(), r.meta.name));
        set.routes.push(r);
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> Scope {
        Scope::new(["istio-system"])
    }

    fn provider(ns: &str, name: &str, host: &str) -> String {
        format!(
            "apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMProvider\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  host: {host}\n  configs: {{defaultConfig: {{openAIConfig: {{apiKey: '${{API_KEY}}'}}}}}}\n---\n"
        )
    }

    fn route(ns: &str, name: &str, host: &str, backend: &str, created: Option<&str>) -> String {
        let ts = created
            .map(|t| format!(", creationTimestamp: '{t}'"))
            .unwrap_or_default();
        format!(
            "apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata: {{name: {name}, namespace: {ns}{ts}}}\nspec:\n  host: {host}\n  gateways: [mesh, istio-system/egress-gw]\n  rules:\n  - matches: [{{gateways: [mesh]}}]\n    backendRefs: [{{providerHost: istio-egressgateway.istio-system.svc.cluster.local}}]\n  - matches: [{{gateways: [istio-system/egress-gw]}}]\n    backendRefs: [{{providerHost: {backend}}}]\n---\n"
        )
    }

    fn admitted(text: &str) -> (ResourceSet, Vec<Problem>) {
        let mut set = ResourceSet::default();
        let parse = set.add_text(Path::new("t.yaml"), text);
        assert!(parse.is_empty(), "{parse:?}");
        let problems = admit(&mut set, &scope());
        (set, problems)
    }

    fn names<T>(v: &[Named<T>]) -> Vec<String> {
        v.iter()
            .map(|r| format!("{}/{}", r.meta.namespace(), r.meta.name))
            .collect()
    }

    #[test]
    fn providers_only_from_trusted_namespaces() {
        let (set, problems) = admitted(&format!(
            "{}{}",
            provider("istio-system", "real", "dashscope.aliyuncs.com"),
            provider("team-a", "exfil", "attacker.example")
        ));
        assert_eq!(names(&set.providers), ["istio-system/real"]);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].resource.as_deref(), Some("LLMProvider team-a/exfil"));
        assert_eq!(problems[0].field.as_deref(), Some("metadata.namespace"));
        assert!(problems[0].message.contains("istio-system"), "{}", problems[0]);
    }

    #[test]
    fn tenant_routes_reach_only_accepted_providers() {
        let (set, problems) = admitted(&format!(
            "{}{}{}{}{}",
            provider("istio-system", "real", "dashscope.aliyuncs.com"),
            provider("team-a", "exfil", "attacker.example"),
            route("team-a", "to-exfil", "attacker.example", "attacker.example", None),
            route(
                "team-b",
                "hijack-github",
                "github.com",
                "dashscope.aliyuncs.com",
                None
            ),
            route(
                "team-c",
                "other-backend",
                "dashscope.aliyuncs.com",
                "attacker.example",
                None
            ),
        ));
        assert!(set.routes.is_empty(), "{:?}", names(&set.routes));
        let fields: Vec<_> = problems.iter().filter_map(|p| p.field.clone()).collect();
        assert!(fields.contains(&"spec.host".to_string()), "{fields:?}");
        assert!(
            fields.contains(&"spec.rules[1].backendRefs[0].providerHost".to_string()),
            "{fields:?}"
        );
    }

    #[test]
    fn a_rule_for_mesh_and_the_gateway_is_checked_like_a_gateway_rule() {
        let p = provider("istio-system", "real", "dashscope.aliyuncs.com");
        let sneaky = "apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata: {name: sneaky, namespace: team-a}\nspec:\n  host: dashscope.aliyuncs.com\n  gateways: [mesh, istio-system/egress-gw]\n  rules:\n  - matches: [{gateways: [mesh, istio-system/egress-gw]}]\n    backendRefs: [{providerHost: attacker.example}]\n---\n";
        let (set, problems) = admitted(&format!("{p}{sneaky}"));
        assert!(set.routes.is_empty());
        assert_eq!(
            problems[0].field.as_deref(),
            Some("spec.rules[0].backendRefs[0].providerHost")
        );
    }

    #[test]
    fn the_seed_route_in_default_is_accepted() {
        let (set, problems) = admitted(&format!(
            "{}{}",
            provider("istio-system", "real", "dashscope.aliyuncs.com"),
            route(
                "default",
                "seed",
                "dashscope.aliyuncs.com",
                "dashscope.aliyuncs.com",
                None
            ),
        ));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(names(&set.routes), ["default/seed"]);
    }

    #[test]
    fn oldest_route_wins_a_host_whatever_the_order_and_trusted_ones_first() {
        let p = provider("istio-system", "real", "dashscope.aliyuncs.com");
        let old = route(
            "default",
            "seed",
            "dashscope.aliyuncs.com",
            "dashscope.aliyuncs.com",
            Some("2026-01-01T00:00:00Z"),
        );
        let new = route(
            "aaa",
            "takeover",
            "dashscope.aliyuncs.com",
            "dashscope.aliyuncs.com",
            Some("2026-02-01T00:00:00Z"),
        );
        for text in [format!("{p}{old}{new}"), format!("{p}{new}{old}")] {
            let (set, problems) = admitted(&text);
            assert_eq!(names(&set.routes), ["default/seed"]);
            assert_eq!(problems.len(), 1);
            assert_eq!(problems[0].resource.as_deref(), Some("LLMRoute aaa/takeover"));
            assert!(problems[0].message.contains("default/seed"), "{}", problems[0]);
        }
        // A newer route of a trusted namespace still takes precedence.
        let platform = route(
            "istio-system",
            "platform",
            "dashscope.aliyuncs.com",
            "dashscope.aliyuncs.com",
            Some("2026-03-01T00:00:00Z"),
        );
        let (set, _) = admitted(&format!("{p}{old}{platform}"));
        assert_eq!(names(&set.routes), ["istio-system/platform"]);
    }

    #[test]
    fn trusted_routes_may_route_any_host_and_gateways_are_scoped() {
        let (set, problems) = admitted(&format!(
            "{}apiVersion: networking.istio.io/v1beta1\nkind: Gateway\nmetadata: {{name: gw, namespace: team-a}}\nspec:\n  selector: {{istio: egressgateway}}\n  servers: [{{hosts: ['*'], port: {{number: 80, name: http, protocol: HTTP}}}}]\n",
            route("istio-system", "r", "extra.example", "gw.example", None)
        ));
        assert_eq!(names(&set.routes), ["istio-system/r"]);
        assert!(set.gateways.is_empty());
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].resource.as_deref(), Some("Gateway team-a/gw"));
    }
}

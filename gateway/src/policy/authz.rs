//! Istio AuthorizationPolicy semantics: DENY policies first, then, if any
//! ALLOW policy applies to this gateway, the request must match one of them.
//! Within a rule `from`, `to` and `when` must all match; list entries are
//! alternatives; `not*` fields match when none of their values do.
//! Value forms: exact, prefix `abc*`, suffix `*abc`, and `*` (present).

use hyper::HeaderMap;
use llm_egress_config::resources::{
    Action, AuthorizationPolicySpec, Condition, Operation, PolicyRule, Source,
};

use super::index::PolicyIndex;

/// What a policy can see of a request or connection.
#[derive(Debug, Default, Clone)]
pub struct Attributes<'a> {
    /// Peer principal, e.g. `cluster.local/ns/default/sa/sleep`.
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
    /// JWT `iss/sub`, when a RequestAuthentication validated a token.
    pub request_principal: Option<&'a str>,
    pub claims: Option<&'a serde_json::Value>,
    /// Host header, or SNI for TLS passthrough.
    pub host: &'a str,
    pub port: Option<u16>,
    /// `None` at L4 (TLS passthrough).
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
    pub headers: Option<&'a HeaderMap>,
}

impl Attributes<'_> {
    fn is_l4(&self) -> bool {
        self.method.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied, with the policy responsible (or why no ALLOW matched).
    Deny(String),
}

/// Istio's string match: `*` any non-empty value, `p*` prefix, `*s` suffix.
pub fn value_matches(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return !value.is_empty();
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    pattern == value
}

fn host_matches(pattern: &str, host: &str) -> bool {
    // Hosts compare without case and without a port.
    let host = host
        .rsplit_once(':')
        .filter(|(_, p)| p.parse::<u16>().is_ok())
        .map_or(host, |(h, _)| h);
    value_matches(&pattern.to_ascii_lowercase(), &host.to_ascii_lowercase())
}

/// `values` (any matches) and `not_values` (none matches) against `value`.
/// A missing value matches no `values` and every `not_values`.
fn field(
    values: &Option<Vec<String>>,
    not_values: &Option<Vec<String>>,
    value: Option<&str>,
    m: fn(&str, &str) -> bool,
) -> bool {
    if let Some(vs) = values {
        let Some(v) = value else { return false };
        if !vs.iter().any(|p| m(p, v)) {
            return false;
        }
    }
    if let Some(nvs) = not_values {
        if let Some(v) = value {
            if nvs.iter().any(|p| m(p, v)) {
                return false;
            }
        }
    }
    true
}

fn source_matches(s: &Source, a: &Attributes, action: Action) -> bool {
    // At L4 there is no JWT: an ALLOW on request principals cannot match,
    // a DENY ignores them (Istio's "more restrictive" rule for TCP).
    let request_principal_ok = if a.is_l4() {
        action != Action::Allow || (s.request_principals.is_none() && s.not_request_principals.is_none())
    } else {
        field(
            &s.request_principals,
            &s.not_request_principals,
            a.request_principal,
            value_matches,
        )
    };
    field(&s.principals, &s.not_principals, a.principal, value_matches)
        && field(&s.namespaces, &s.not_namespaces, a.namespace, value_matches)
        && request_principal_ok
}

fn operation_matches(o: &Operation, a: &Attributes, action: Action) -> bool {
    let port = a.port.map(|p| p.to_string());
    let l7_only =
        o.methods.is_some() || o.not_methods.is_some() || o.paths.is_some() || o.not_paths.is_some();
    let l7_ok = if a.is_l4() {
        action != Action::Allow || !l7_only
    } else {
        field(&o.methods, &o.not_methods, a.method, |p, v| p == "*" || p == v)
            && field(&o.paths, &o.not_paths, a.path, value_matches)
    };
    field(&o.hosts, &o.not_hosts, Some(a.host), host_matches)
        && field(&o.ports, &o.not_ports, port.as_deref(), |p, v| p == v)
        && l7_ok
}

/// Values a `when` key has for this request (several for list claims).
fn condition_values(key: &str, a: &Attributes) -> Option<Vec<String>> {
    let one = |v: Option<&str>| v.map(|s| vec![s.to_string()]);
    if let Some(name) = key
        .strip_prefix("request.headers[")
        .and_then(|r| r.strip_suffix(']'))
    {
        let headers = a.headers?;
        let vals: Vec<String> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect();
        return (!vals.is_empty()).then_some(vals);
    }
    if let Some(name) = key
        .strip_prefix("request.auth.claims[")
        .and_then(|r| r.strip_suffix(']'))
    {
        // Nested claims are written request.auth.claims[a][b].
        let mut v = a.claims?;
        for part in name.split("][") {
            v = v.get(part)?;
        }
        return match v {
            serde_json::Value::String(s) => Some(vec![s.clone()]),
            serde_json::Value::Array(items) => Some(
                items
                    .iter()
                    .filter_map(|i| i.as_str().map(str::to_string))
                    .collect(),
            ),
            other => Some(vec![other.to_string()]),
        };
    }
    match key {
        "source.principal" => one(a.principal),
        "source.namespace" => one(a.namespace),
        "request.auth.principal" => one(a.request_principal),
        "request.auth.audiences" => a.claims.and_then(|c| c.get("aud")).map(|aud| match aud {
            serde_json::Value::Array(items) => items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_string))
                .collect(),
            other => vec![other.as_str().unwrap_or_default().to_string()],
        }),
        "request.auth.presenter" => a
            .claims
            .and_then(|c| c.get("azp"))
            .and_then(|v| v.as_str())
            .map(|s| vec![s.to_string()]),
        "destination.port" => a.port.map(|p| vec![p.to_string()]),
        _ => None,
    }
}

fn condition_matches(c: &Condition, a: &Attributes, action: Action) -> bool {
    let l7_key = c.key.starts_with("request.");
    if a.is_l4() && l7_key {
        return action != Action::Allow;
    }
    let values = condition_values(&c.key, a);
    if let Some(vs) = &c.values {
        let Some(have) = &values else { return false };
        if !have.iter().any(|h| vs.iter().any(|p| value_matches(p, h))) {
            return false;
        }
    }
    if let (Some(nvs), Some(have)) = (&c.not_values, &values) {
        if have.iter().any(|h| nvs.iter().any(|p| value_matches(p, h))) {
            return false;
        }
    }
    true
}

fn rule_matches(r: &PolicyRule, a: &Attributes, action: Action) -> bool {
    (r.from.is_empty() || r.from.iter().any(|f| source_matches(&f.source, a, action)))
        && (r.to.is_empty() || r.to.iter().any(|t| operation_matches(&t.operation, a, action)))
        && r.when.iter().all(|c| condition_matches(c, a, action))
}

fn policy_matches(p: &AuthorizationPolicySpec, a: &Attributes) -> bool {
    p.rules.iter().flatten().any(|r| rule_matches(r, a, p.action))
}

/// The external authorizers to ask, in policy order and once each: those
/// named by the CUSTOM policies whose rules match the request (Istio asks
/// them before any DENY or ALLOW policy).
pub fn custom_providers<'p>(policies: &'p PolicyIndex, a: &Attributes) -> Vec<&'p str> {
    let mut names: Vec<&str> = Vec::new();
    for p in policies.candidates(a).filter(|p| p.spec.action == Action::Custom) {
        let Some(provider) = &p.spec.provider else {
            continue;
        };
        if policy_matches(&p.spec, a) && !names.contains(&provider.name.as_str()) {
            names.push(&provider.name);
        }
    }
    names
}

/// Decides a request against the DENY and ALLOW policies that apply to
/// this gateway (CUSTOM ones are `custom_providers`' business).
pub fn evaluate(policies: &PolicyIndex, a: &Attributes) -> Decision {
    let mut allowed = !policies.has_allow();
    for p in policies.candidates(a) {
        match p.spec.action {
            Action::Deny if policy_matches(&p.spec, a) => {
                return Decision::Deny(format!("DENY policy {}/{}", p.meta.namespace(), p.meta.name));
            }
            Action::Allow if !allowed => allowed = policy_matches(&p.spec, a),
            _ => {}
        }
    }
    if allowed {
        Decision::Allow
    } else {
        Decision::Deny("no ALLOW policy matched".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_egress_config::resources::{Meta, Named, ResourceSet};
    use std::path::{Path, PathBuf};

    fn policies(yaml: &str) -> Vec<Named<AuthorizationPolicySpec>> {
        let mut set = ResourceSet::default();
        let problems = set.add_text(Path::new("t.yaml"), yaml);
        assert!(problems.is_empty(), "{problems:?}");
        set.policies
    }

    fn policy(action: &str, rules: &str) -> Named<AuthorizationPolicySpec> {
        let yaml = format!("apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: istio-system}}\nspec:\n  action: {action}\n  rules: {rules}\n");
        policies(&yaml).remove(0)
    }

    fn sleep<'a>() -> Attributes<'a> {
        Attributes {
            principal: Some("cluster.local/ns/default/sa/sleep"),
            namespace: Some("default"),
            host: "dashscope.aliyuncs.com",
            port: Some(80),
            method: Some("POST"),
            path: Some("/v1/chat/completions"),
            ..Default::default()
        }
    }

    fn allowed(ps: &[Named<AuthorizationPolicySpec>], a: &Attributes) -> bool {
        evaluate(&PolicyIndex::new(ps.to_vec()), a) == Decision::Allow
    }

    /// Istio's semantics as a walk over every policy: what the index must
    /// decide too.
    fn walk_all(ps: &[Named<AuthorizationPolicySpec>], a: &Attributes) -> Decision {
        if let Some(p) = ps
            .iter()
            .find(|p| p.spec.action == Action::Deny && policy_matches(&p.spec, a))
        {
            return Decision::Deny(format!("DENY policy {}/{}", p.meta.namespace(), p.meta.name));
        }
        let mut allows = ps.iter().filter(|p| p.spec.action == Action::Allow).peekable();
        if allows.peek().is_none() || allows.any(|p| policy_matches(&p.spec, a)) {
            Decision::Allow
        } else {
            Decision::Deny("no ALLOW policy matched".into())
        }
    }

    /// Every combination of a population of filed and unfiled policies and
    /// of peers: the indexed decision (and the authorizers asked) is the
    /// walk's.
    #[test]
    fn the_index_decides_as_a_walk_over_every_policy() {
        let sources = [
            "{principals: [cluster.local/ns/a/sa/x]}",
            "{principals: [cluster.local/ns/a/sa/x, cluster.local/ns/b/sa/y]}",
            "{principals: ['cluster.local/ns/b/*']}",
            "{principals: ['*/sa/y']}",
            "{namespaces: [a]}",
            "{namespaces: [b], principals: ['*']}",
            "{notPrincipals: [cluster.local/ns/a/sa/x]}",
            "{notNamespaces: [b]}",
            "{principals: []}",
            // Edge values: a `*` inside is literal, the empty string, a
            // value named twice.
            "{principals: ['cluster.local/ns/a/*/x']}",
            "{principals: ['']}",
            "{principals: [cluster.local/ns/b/sa/y, cluster.local/ns/b/sa/y]}",
        ];
        let tos = [
            "",
            ", to: [{operation: {paths: ['/v1/*']}}]",
            ", to: [{operation: {methods: [GET]}}]",
        ];
        let mut yaml = String::new();
        let mut n = 0;
        for (i, source) in sources.iter().enumerate() {
            for (j, to) in tos.iter().enumerate() {
                for action in ["ALLOW", "DENY", "CUSTOM"] {
                    n += 1;
                    let provider = if action == "CUSTOM" {
                        format!("  provider: {{name: ext-{n}}}\n")
                    } else {
                        String::new()
                    };
                    let second = if (i + j) % 4 == 0 {
                        format!(", {{from: [{{source: {}}}]}}", sources[(i + 4) % sources.len()])
                    } else {
                        String::new()
                    };
                    yaml.push_str(&format!(
                        "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {{name: p{n}, namespace: istio-system}}\nspec:\n  action: {action}\n{provider}  rules: [{{from: [{{source: {source}}}]{to}}}{second}]\n---\n"
                    ));
                }
            }
        }
        yaml.push_str("apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: open, namespace: istio-system}\nspec:\n  action: DENY\n  rules: [{to: [{operation: {paths: [/admin]}}]}]\n---\n");
        // Matches nothing, yet is an ALLOW.
        yaml.push_str("apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: no-rules, namespace: istio-system}\nspec:\n  action: ALLOW\n  rules: []\n");
        let all = policies(&yaml);
        let peers = [
            (Some("cluster.local/ns/a/sa/x"), Some("a")),
            (Some("cluster.local/ns/b/sa/y"), Some("b")),
            (Some("cluster.local/ns/c/sa/y"), Some("c")),
            (Some("cluster.local/ns/a/sa/x"), Some("b")),
            (Some("cluster.local/ns/a/*/x"), Some("a")),
            (Some(""), Some("")),
            (None, None),
        ];
        let requests = [
            ("POST", "/v1/chat/completions"),
            ("GET", "/v1/models"),
            ("POST", "/admin"),
        ];
        let (mut decided, mut allowed) = (0, 0);
        // Suffixes, every third policy, and the sets without DENYs: sets
        // with and without ALLOWs.
        let no_deny: Vec<_> = all
            .iter()
            .filter(|p| p.spec.action != Action::Deny)
            .cloned()
            .collect();
        let subsets: Vec<Vec<Named<AuthorizationPolicySpec>>> = (0..all.len())
            .step_by(7)
            .map(|k| all[k..].to_vec())
            .chain((0..3).map(|r| all.iter().skip(r).step_by(3).cloned().collect()))
            .chain((0..no_deny.len()).step_by(5).map(|k| no_deny[k..].to_vec()))
            .collect();
        for set in &subsets {
            let index = PolicyIndex::new(set.clone());
            for (principal, namespace) in peers {
                for (method, path) in requests {
                    for l4 in [false, true] {
                        let a = Attributes {
                            principal,
                            namespace,
                            method: (!l4).then_some(method),
                            path: (!l4).then_some(path),
                            ..sleep()
                        };
                        let decision = evaluate(&index, &a);
                        assert_eq!(decision, walk_all(set, &a), "{a:?}");
                        allowed += usize::from(decision == Decision::Allow);
                        let customs: Vec<&str> = set
                            .iter()
                            .filter(|p| p.spec.action == Action::Custom && policy_matches(&p.spec, &a))
                            .filter_map(|p| p.spec.provider.as_ref().map(|x| x.name.as_str()))
                            .collect();
                        assert_eq!(custom_providers(&index, &a), customs, "{a:?}");
                        decided += 1;
                    }
                }
            }
        }
        // Both outcomes, many times.
        assert!(
            decided >= 400 && allowed >= 50 && decided - allowed >= 50,
            "{decided} {allowed}"
        );
    }

    #[test]
    fn value_forms() {
        assert!(value_matches("abc", "abc"));
        assert!(!value_matches("abc", "abcd"));
        assert!(value_matches("ab*", "abcd"));
        assert!(value_matches("*cd", "abcd"));
        assert!(!value_matches("*cd", "abce"));
        assert!(value_matches("*", "x"));
        assert!(!value_matches("*", ""));
        assert!(host_matches("*.aliyuncs.com", "dashscope.aliyuncs.com"));
        assert!(host_matches(
            "DashScope.aliyuncs.com",
            "dashscope.aliyuncs.com:80"
        ));
    }

    /// (description, policies, attributes, expected allow)
    #[test]
    fn decision_table() {
        let seed = policies(include_str!("../../../deploy/examples/authpolicy.yaml"));
        let base = sleep();
        let none = vec![];
        let other_sa = Attributes {
            principal: Some("cluster.local/ns/default/sa/other"),
            ..sleep()
        };
        let other_ns = Attributes {
            principal: Some("cluster.local/ns/prod/sa/sleep"),
            namespace: Some("prod"),
            ..sleep()
        };
        let other_host = Attributes {
            host: "api.openai.com",
            ..sleep()
        };
        let anonymous = Attributes {
            principal: None,
            namespace: None,
            ..sleep()
        };
        let get = Attributes {
            method: Some("GET"),
            ..sleep()
        };
        let admin_path = Attributes {
            path: Some("/admin/keys"),
            ..sleep()
        };
        let mut h = HeaderMap::new();
        h.insert("x-team", "blue".parse().unwrap());
        let with_header = Attributes {
            headers: Some(&h),
            ..sleep()
        };
        let claims =
            serde_json::json!({"groups": ["dev", "ops"], "iss": "https://idp", "sub": "alice", "aud": "llm"});
        let jwt = Attributes {
            request_principal: Some("https://idp/alice"),
            claims: Some(&claims),
            ..sleep()
        };
        let l4 = Attributes {
            method: None,
            path: None,
            port: Some(443),
            ..sleep()
        };
        let port443 = Attributes {
            port: Some(443),
            ..sleep()
        };

        let allow_sleep = vec![policy(
            "ALLOW",
            "[{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]}]",
        )];
        let allow_nothing = vec![policy("ALLOW", "[]")];
        let allow_all = vec![policy("ALLOW", "[{}]")];
        let deny_empty_rules = vec![policy("DENY", "[]")];
        let deny_all = vec![policy("DENY", "[{}]")];
        let deny_and_allow = vec![
            policy("DENY", "[{to: [{operation: {paths: [/admin*]}}]}]"),
            policy("ALLOW", "[{}]"),
        ];
        let not_principal = vec![policy(
            "ALLOW",
            "[{from: [{source: {notPrincipals: [cluster.local/ns/default/sa/sleep]}}]}]",
        )];
        let ns_allow = vec![policy("ALLOW", "[{from: [{source: {namespaces: [default]}}]}]")];
        let not_ns = vec![policy("DENY", "[{from: [{source: {notNamespaces: [default]}}]}]")];
        let prefix_principal = vec![policy(
            "ALLOW",
            "[{from: [{source: {principals: [cluster.local/ns/default/*]}}]}]",
        )];
        let any_principal = vec![policy("ALLOW", "[{from: [{source: {principals: ['*']}}]}]")];
        let hosts_suffix = vec![policy(
            "ALLOW",
            "[{to: [{operation: {hosts: ['*.aliyuncs.com']}}]}]",
        )];
        let not_hosts = vec![policy(
            "DENY",
            "[{to: [{operation: {notHosts: [dashscope.aliyuncs.com]}}]}]",
        )];
        let methods = vec![policy("ALLOW", "[{to: [{operation: {methods: [POST]}}]}]")];
        let not_methods = vec![policy("DENY", "[{to: [{operation: {notMethods: [POST]}}]}]")];
        let paths = vec![policy("ALLOW", "[{to: [{operation: {paths: ['/v1/*']}}]}]")];
        let not_paths = vec![policy("ALLOW", "[{to: [{operation: {notPaths: ['/admin*']}}]}]")];
        let ports = vec![policy("ALLOW", "[{to: [{operation: {ports: ['80']}}]}]")];
        let header_when = vec![policy(
            "ALLOW",
            "[{when: [{key: 'request.headers[x-team]', values: [blue]}]}]",
        )];
        let header_not = vec![policy(
            "DENY",
            "[{when: [{key: 'request.headers[x-team]', notValues: [blue]}]}]",
        )];
        let principal_when = vec![policy(
            "DENY",
            "[{when: [{key: source.principal, values: ['*/sa/sleep']}]}]",
        )];
        let claims_when = vec![policy(
            "ALLOW",
            "[{when: [{key: 'request.auth.claims[groups]', values: [ops]}]}]",
        )];
        let req_principal = vec![policy(
            "ALLOW",
            "[{from: [{source: {requestPrincipals: ['https://idp/*']}}]}]",
        )];
        let from_or = vec![policy(
            "ALLOW",
            "[{from: [{source: {principals: [a]}}, {source: {namespaces: [default]}}]}]",
        )];
        let fields_and = vec![policy(
            "ALLOW",
            "[{from: [{source: {principals: [cluster.local/ns/default/sa/sleep], namespaces: [prod]}}]}]",
        )];
        let deny_post_l7 = vec![policy("DENY", "[{to: [{operation: {methods: [POST]}}]}]")];
        let allow_get_only = vec![policy("ALLOW", "[{to: [{operation: {methods: [GET]}}]}]")];
        let deny_host_l4 = vec![policy(
            "DENY",
            "[{to: [{operation: {hosts: [dashscope.aliyuncs.com]}}]}]",
        )];

        let cases: Vec<(&str, &Vec<Named<AuthorizationPolicySpec>>, &Attributes, bool)> = vec![
            ("seed DENY denies sleep", &seed, &base, false),
            ("seed DENY leaves another service account", &seed, &other_sa, true),
            ("seed DENY leaves another host", &seed, &other_host, true),
            (
                "seed DENY leaves another namespace's sleep",
                &seed,
                &other_ns,
                true,
            ),
            ("no policies: allow", &none, &base, true),
            ("ALLOW for sleep allows sleep", &allow_sleep, &base, true),
            ("ALLOW for sleep denies others", &allow_sleep, &other_sa, false),
            (
                "ALLOW for sleep denies anonymous",
                &allow_sleep,
                &anonymous,
                false,
            ),
            ("ALLOW without rules allows nothing", &allow_nothing, &base, false),
            (
                "ALLOW with an empty rule allows all",
                &allow_all,
                &anonymous,
                true,
            ),
            (
                "DENY without rules denies nothing",
                &deny_empty_rules,
                &base,
                true,
            ),
            ("DENY with an empty rule denies all", &deny_all, &base, false),
            ("DENY wins over ALLOW", &deny_and_allow, &admin_path, false),
            (
                "ALLOW applies when DENY does not match",
                &deny_and_allow,
                &base,
                true,
            ),
            ("notPrincipals excludes sleep", &not_principal, &base, false),
            ("notPrincipals admits others", &not_principal, &other_sa, true),
            ("namespaces match", &ns_allow, &base, true),
            ("namespaces mismatch", &ns_allow, &other_ns, false),
            ("notNamespaces denies other namespace", &not_ns, &other_ns, false),
            ("notNamespaces leaves default", &not_ns, &base, true),
            ("principal prefix", &prefix_principal, &base, true),
            ("principal prefix mismatch", &prefix_principal, &other_ns, false),
            (
                "'*' principal needs a principal",
                &any_principal,
                &anonymous,
                false,
            ),
            ("'*' principal with one", &any_principal, &base, true),
            ("host suffix", &hosts_suffix, &base, true),
            ("host suffix mismatch", &hosts_suffix, &other_host, false),
            ("notHosts denies other host", &not_hosts, &other_host, false),
            ("notHosts leaves listed host", &not_hosts, &base, true),
            ("methods POST", &methods, &base, true),
            ("methods POST rejects GET", &methods, &get, false),
            ("notMethods denies GET", &not_methods, &get, false),
            ("paths prefix", &paths, &base, true),
            ("paths prefix mismatch", &paths, &admin_path, false),
            ("notPaths", &not_paths, &admin_path, false),
            ("ports match", &ports, &base, true),
            ("ports mismatch", &ports, &port443, false),
            ("header condition without header", &header_when, &base, false),
            ("header condition with header", &header_when, &with_header, true),
            (
                "header notValues with other value denies",
                &header_not,
                &with_header,
                true,
            ),
            ("source.principal condition suffix", &principal_when, &base, false),
            ("claims list condition", &claims_when, &jwt, true),
            ("claims condition without JWT", &claims_when, &base, false),
            ("requestPrincipals prefix", &req_principal, &jwt, true),
            ("requestPrincipals without JWT", &req_principal, &base, false),
            ("from entries are alternatives", &from_or, &base, true),
            ("source fields all must match", &fields_and, &base, false),
            (
                "L4: DENY on methods still denies (restrictive)",
                &deny_post_l7,
                &l4,
                false,
            ),
            ("L4: ALLOW on methods cannot match", &allow_get_only, &l4, false),
            ("L4: DENY on host (SNI)", &deny_host_l4, &l4, false),
            ("L4: ALLOW by principal", &allow_sleep, &l4, true),
        ];
        assert!(cases.len() >= 30);
        for (what, ps, attrs, expect) in cases {
            assert_eq!(allowed(ps, attrs), expect, "{what}");
        }
    }

    #[test]
    fn deny_reason_names_the_policy() {
        let ps = PolicyIndex::new(vec![Named {
            meta: Meta {
                name: "test".into(),
                namespace: Some("istio-system".into()),
                ..Default::default()
            },
            spec: policy("DENY", "[{}]").spec,
            file: PathBuf::new(),
        }]);
        assert_eq!(
            evaluate(&ps, &sleep()),
            Decision::Deny("DENY policy istio-system/test".into())
        );
    }

    /// Fuzz target: the matcher and the evaluator on any strings. Never
    /// panics; `*` matches exactly the non-empty values; a pattern without
    /// `*` matches only itself; DENY on every source always denies.
    #[test]
    fn fuzz_authorization_matcher() {
        let deny_all = PolicyIndex::new(policies(
            "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: d, namespace: istio-system}\nspec:\n  action: DENY\n  rules:\n  - from: [{source: {principals: ['*']}}]\n    to: [{operation: {hosts: ['*.aliyuncs.com', 'dashscope*'], paths: ['/v1/*']}}]\n  - from: [{source: {notNamespaces: ['x']}}]\n",
        ));
        bolero::check!()
            .with_type::<(String, String, String, String)>()
            .with_iterations(crate::FUZZ_ITERATIONS)
            .for_each(|(pattern, value, principal, host)| {
                let _ = value_matches(pattern, value);
                assert_eq!(value_matches("*", value), !value.is_empty());
                if !pattern.contains('*') {
                    assert_eq!(value_matches(pattern, value), pattern == value);
                }
                let mut headers = HeaderMap::new();
                if let Ok(v) = hyper::header::HeaderValue::from_str(value) {
                    headers.insert("x-fuzz", v);
                }
                let claims = serde_json::json!({"sub": value});
                let a = Attributes {
                    principal: Some(principal),
                    namespace: Some(value),
                    request_principal: Some(pattern),
                    claims: Some(&claims),
                    host,
                    port: Some(80),
                    method: Some("POST"),
                    path: Some(value),
                    headers: Some(&headers),
                };
                let d = evaluate(&deny_all, &a);
                if !principal.is_empty() || value != "x" {
                    assert!(
                        matches!(d, Decision::Deny(_)),
                        "{d:?} for {principal:?} {value:?}"
                    );
                }
            });
    }
}

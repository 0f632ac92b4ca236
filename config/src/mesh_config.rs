//! Istio's MeshConfig, the part the gateway reads: `extensionProviders`,
//! the external authorizers an `AuthorizationPolicy` with `action: CUSTOM`
//! names. The same YAML users keep in the `istio` ConfigMap (key `mesh`) of
//! Istio's root namespace, or in a file; every other MeshConfig field is
//! ignored.

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;

/// Istio's default for `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// Istio's default for `statusOnError`.
pub const DEFAULT_STATUS_ON_ERROR: u16 = 403;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMesh {
    #[serde(default)]
    extension_providers: Vec<RawProvider>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawProvider {
    name: String,
    envoy_ext_authz_http: Option<RawHttp>,
    envoy_ext_authz_grpc: Option<RawGrpc>,
}

/// `port` is a uint32 in Istio's proto; its docs write it quoted.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Port {
    Number(u64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawHttp {
    service: String,
    port: Port,
    timeout: Option<String>,
    #[serde(default)]
    path_prefix: String,
    #[serde(default)]
    fail_open: bool,
    status_on_error: Option<String>,
    #[serde(default)]
    include_request_headers_in_check: Vec<String>,
    #[serde(default)]
    include_additional_headers_in_check: BTreeMap<String, String>,
    #[serde(default)]
    headers_to_upstream_on_allow: Vec<String>,
    #[serde(default)]
    headers_to_downstream_on_deny: Vec<String>,
    #[serde(default)]
    headers_to_downstream_on_allow: Vec<String>,
    include_request_body_in_check: Option<RawBody>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawGrpc {
    service: String,
    port: Port,
    timeout: Option<String>,
    #[serde(default)]
    fail_open: bool,
    status_on_error: Option<String>,
    include_request_body_in_check: Option<RawBody>,
}

/// `includeRequestBodyInCheck`, as Istio spells it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawBody {
    #[serde(default)]
    max_request_bytes: u64,
    #[serde(default)]
    allow_partial_message: bool,
    #[serde(default)]
    pack_as_bytes: bool,
}

/// Largest `maxRequestBytes`: a check body is held in memory per request.
pub const MAX_CHECK_BODY: u64 = 8 << 20;

/// `includeRequestBodyInCheck`: the request body goes to the authorizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodySettings {
    /// At most this many bytes of the body are sent.
    pub max_request_bytes: usize,
    /// A larger body is sent cut to `max_request_bytes` (flagged partial);
    /// without it, such a request is answered 413.
    pub allow_partial_message: bool,
    /// gRPC: the body as `raw_body` bytes rather than the UTF-8 `body`.
    pub pack_as_bytes: bool,
}

/// An external authorizer, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtAuthzProvider {
    pub name: String,
    /// Host name of the authorizer's Service (a `namespace/` prefix, which
    /// Istio allows, removed).
    pub service: String,
    pub port: u16,
    pub timeout: Duration,
    pub fail_open: bool,
    pub status_on_error: u16,
    pub protocol: ExtAuthzProtocol,
    /// `includeRequestBodyInCheck`, when set.
    pub body: Option<BodySettings>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ExtAuthzProtocol {
    Http(HttpSettings),
    Grpc,
}

/// `envoyExtAuthzHttp`'s header and path settings. Header name patterns
/// match like AuthorizationPolicy values (exact, `prefix*`, `*suffix`),
/// without case.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HttpSettings {
    pub path_prefix: String,
    pub include_request_headers: Vec<String>,
    pub additional_headers: Vec<(String, String)>,
    pub headers_to_upstream_on_allow: Vec<String>,
    pub headers_to_downstream_on_deny: Vec<String>,
    pub headers_to_downstream_on_allow: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MeshConfigError {
    #[error("the mesh config is not valid YAML for MeshConfig: {0}")]
    Syntax(String),
    #[error("extensionProviders[{index}] ({name:?}): {problem}")]
    Provider {
        index: usize,
        name: String,
        problem: String,
    },
}

/// The extension providers of a MeshConfig YAML text, each checked.
pub fn parse_extension_providers(yaml: &str) -> Result<Vec<ExtAuthzProvider>, MeshConfigError> {
    let raw: RawMesh = if yaml.trim().is_empty() {
        RawMesh::default()
    } else {
        serde_yaml_ng::from_str(yaml).map_err(|e| MeshConfigError::Syntax(e.to_string()))?
    };
    let mut names = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (index, p) in raw.extension_providers.into_iter().enumerate() {
        let bad = |problem: String| MeshConfigError::Provider {
            index,
            name: p.name.clone(),
            problem,
        };
        if p.name.is_empty() {
            return Err(bad("a provider needs a name".into()));
        }
        if !names.insert(p.name.clone()) {
            return Err(bad(
                "the name is used by an earlier provider; names must be unique".into(),
            ));
        }
        let provider = match (&p.envoy_ext_authz_http, &p.envoy_ext_authz_grpc) {
            (Some(h), None) => {
                let common = common(
                    &h.service,
                    &h.port,
                    h.timeout.as_deref(),
                    h.status_on_error.as_deref(),
                )
                .map_err(bad)?;
                let body = check_body(h.include_request_body_in_check.as_ref()).map_err(bad)?;
                if !h.path_prefix.is_empty() && !h.path_prefix.starts_with('/') {
                    return Err(bad(format!("pathPrefix {:?} must start with '/'", h.path_prefix)));
                }
                ExtAuthzProvider {
                    name: p.name.clone(),
                    service: common.0,
                    port: common.1,
                    timeout: common.2,
                    fail_open: h.fail_open,
                    status_on_error: common.3,
                    protocol: ExtAuthzProtocol::Http(HttpSettings {
                        path_prefix: h.path_prefix.clone(),
                        include_request_headers: lower(&h.include_request_headers_in_check),
                        additional_headers: h
                            .include_additional_headers_in_check
                            .iter()
                            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                            .collect(),
                        headers_to_upstream_on_allow: lower(&h.headers_to_upstream_on_allow),
                        headers_to_downstream_on_deny: lower(&h.headers_to_downstream_on_deny),
                        headers_to_downstream_on_allow: lower(&h.headers_to_downstream_on_allow),
                    }),
                    body,
                }
            }
            (None, Some(g)) => {
                let common = common(
                    &g.service,
                    &g.port,
                    g.timeout.as_deref(),
                    g.status_on_error.as_deref(),
                )
                .map_err(bad)?;
                let body = check_body(g.include_request_body_in_check.as_ref()).map_err(bad)?;
                ExtAuthzProvider {
                    name: p.name.clone(),
                    service: common.0,
                    port: common.1,
                    timeout: common.2,
                    fail_open: g.fail_open,
                    status_on_error: common.3,
                    protocol: ExtAuthzProtocol::Grpc,
                    body,
                }
            }
            (Some(_), Some(_)) => {
                return Err(bad(
                    "set one of envoyExtAuthzHttp and envoyExtAuthzGrpc, not both".into(),
                ))
            }
            // Tracing, logging and metrics providers: not ours to run.
            (None, None) => continue,
        };
        out.push(provider);
    }
    Ok(out)
}

fn lower(v: &[String]) -> Vec<String> {
    v.iter().map(|s| s.to_ascii_lowercase()).collect()
}

fn check_body(body: Option<&RawBody>) -> Result<Option<BodySettings>, String> {
    let Some(b) = body else {
        return Ok(None);
    };
    // Envoy refuses 0 too (its buffer settings need a positive size).
    if b.max_request_bytes == 0 || b.max_request_bytes > MAX_CHECK_BODY {
        return Err(format!(
            "includeRequestBodyInCheck.maxRequestBytes must be between 1 and {MAX_CHECK_BODY} (got {})",
            b.max_request_bytes
        ));
    }
    Ok(Some(BodySettings {
        max_request_bytes: b.max_request_bytes as usize,
        allow_partial_message: b.allow_partial_message,
        pack_as_bytes: b.pack_as_bytes,
    }))
}

/// Service host, port, timeout and statusOnError, checked.
fn common(
    service: &str,
    port: &Port,
    timeout: Option<&str>,
    status: Option<&str>,
) -> Result<(String, u16, Duration, u16), String> {
    // Istio allows `namespace/host`; the host is what is dialled.
    let host = service.rsplit_once('/').map_or(service, |(_, h)| h);
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
    {
        return Err(format!(
            "service {service:?} is not a host name ([namespace/]hostname)"
        ));
    }
    let port = match port {
        Port::Number(n) => u16::try_from(*n).ok(),
        Port::Text(t) => t.trim().parse::<u16>().ok(),
    }
    .filter(|p| *p != 0)
    .ok_or_else(|| "port must be a number from 1 to 65535".to_string())?;
    let timeout = match timeout {
        None => DEFAULT_TIMEOUT,
        Some(t) => parse_duration(t)
            .ok_or_else(|| format!("timeout {t:?} is not a duration such as 0.5s or 200ms"))?,
    };
    let status = match status {
        None => DEFAULT_STATUS_ON_ERROR,
        Some(s) => s
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|c| (200..=599).contains(c))
            .ok_or_else(|| format!("statusOnError {s:?} is not an HTTP status code"))?,
    };
    Ok((host.to_string(), port, timeout, status))
}

/// A protobuf JSON duration (`0.5s`, `1s`), also `200ms` and `1m`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let t = text.trim();
    let (number, unit) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        return None;
    };
    let value: f64 = number.parse().ok()?;
    (value.is_finite() && value > 0.0 && value * unit <= 86_400.0)
        .then(|| Duration::from_secs_f64(value * unit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_request_body_in_check_is_read_as_istio_spells_it() {
        let p = parse_extension_providers(
            "extensionProviders:\n- name: a\n  envoyExtAuthzGrpc:\n    service: a\n    port: 9000\n    includeRequestBodyInCheck: {maxRequestBytes: 1024, allowPartialMessage: true, packAsBytes: true}\n",
        )
        .unwrap();
        assert_eq!(
            p[0].body,
            Some(BodySettings {
                max_request_bytes: 1024,
                allow_partial_message: true,
                pack_as_bytes: true
            })
        );
    }

    /// The shapes of Istio's ext-authz task (istio.io, "External Authorization").
    const ISTIO_TASK: &str = r#"
accessLogFile: /dev/stdout
defaultConfig: {discoveryAddress: istiod.istio-system.svc:15012}
extensionProviders:
- name: "sample-ext-authz-grpc"
  envoyExtAuthzGrpc:
    service: "ext-authz.foo.svc.cluster.local"
    port: "9000"
- name: "sample-ext-authz-http"
  envoyExtAuthzHttp:
    service: "foo/ext-authz.foo.svc.cluster.local"
    port: 8000
    timeout: 0.5s
    pathPrefix: /check
    failOpen: true
    statusOnError: "503"
    includeRequestHeadersInCheck: ["X-Ext-Authz", "x-team-*"]
    includeAdditionalHeadersInCheck: {X-Gateway: llm-egress}
    headersToUpstreamOnAllow: ["x-ext-authz-check-result"]
    headersToDownstreamOnDeny: ["x-ext-authz-check-result"]
- name: otel
  opentelemetry: {service: otel.istio-system.svc.cluster.local, port: 4317}
"#;

    #[test]
    fn istio_shapes_parse_with_istio_defaults() {
        let p = parse_extension_providers(ISTIO_TASK).unwrap();
        assert_eq!(p.len(), 2, "the tracing provider is not an authorizer");
        assert_eq!(p[0].name, "sample-ext-authz-grpc");
        assert_eq!(p[0].protocol, ExtAuthzProtocol::Grpc);
        assert_eq!(
            (p[0].port, p[0].timeout, p[0].fail_open, p[0].status_on_error),
            (9000, DEFAULT_TIMEOUT, false, 403)
        );
        let http = &p[1];
        assert_eq!(http.service, "ext-authz.foo.svc.cluster.local");
        assert_eq!(
            (http.port, http.timeout, http.fail_open, http.status_on_error),
            (8000, Duration::from_millis(500), true, 503)
        );
        let ExtAuthzProtocol::Http(h) = &http.protocol else {
            panic!("http")
        };
        assert_eq!(h.path_prefix, "/check");
        assert_eq!(h.include_request_headers, ["x-ext-authz", "x-team-*"]);
        assert_eq!(
            h.additional_headers,
            [("x-gateway".to_string(), "llm-egress".to_string())]
        );
    }

    #[test]
    fn bad_providers_are_refused_with_the_reason() {
        let cases = [
            ("extensionProviders: [{name: a, envoyExtAuthzHttp: {service: 'a b', port: 80}}]", "not a host name"),
            ("extensionProviders: [{name: a, envoyExtAuthzHttp: {service: a, port: 70000}}]", "port must be"),
            ("extensionProviders: [{name: a, envoyExtAuthzHttp: {service: a, port: 80, timeout: soon}}]", "not a duration"),
            ("extensionProviders: [{name: a, envoyExtAuthzHttp: {service: a, port: 80, statusOnError: teapot}}]", "not an HTTP status"),
            ("extensionProviders: [{name: a, envoyExtAuthzHttp: {service: a, port: 80, pathPrefix: check}}]", "must start with '/'"),
            ("extensionProviders: [{name: a, envoyExtAuthzGrpc: {service: a, port: 80}}, {name: a, envoyExtAuthzGrpc: {service: b, port: 80}}]", "unique"),
            ("extensionProviders: [{name: a, envoyExtAuthzGrpc: {service: a, port: 80, includeRequestBodyInCheck: {allowPartialMessage: true}}}]", "maxRequestBytes must be between 1"),
            ("extensionProviders: [{name: a, envoyExtAuthzHttp: {service: a, port: 80, includeRequestBodyInCheck: {maxRequestBytes: 10, packAsByte: true}}}]", "unknown field"),
            ("extensionProviders: {name: a}", "not valid YAML"),
        ];
        for (yaml, expected) in cases {
            let e = parse_extension_providers(yaml).expect_err(yaml).to_string();
            assert!(e.contains(expected), "{yaml}: {e}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0.5s"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("200ms"), Some(Duration::from_millis(200)));
        assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("NaNs"), None);
        assert_eq!(parse_duration("5"), None);
    }
}

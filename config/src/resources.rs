//! The resources llm-egress is configured with, exactly as ASM and Istio
//! spell them: `LLMProvider` and `LLMRoute` (istio.alibabacloud.com/v1beta1),
//! `AuthorizationPolicy` and `RequestAuthentication` (security.istio.io),
//! `Gateway` (networking.istio.io), and llm-egress's own `LLMTokenBudget`
//! (llm-egress.io, see `budget`). Loading names the file, the resource and
//! the field of every problem; unknown kinds are reported and skipped.
//!
//! Policy types reject fields they do not implement: silently ignoring a
//! condition would widen an ALLOW or narrow a DENY.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

pub use crate::budget::LlmTokenBudgetSpec;

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Set by the API server; orders conflicting routes (oldest wins).
    #[serde(default)]
    pub creation_timestamp: Option<String>,
}

impl Meta {
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

/// A resource with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Named<T> {
    pub meta: Meta,
    pub spec: T,
    pub file: PathBuf,
}

// ---------- LLMProvider ----------

#[derive(Debug, Clone, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LlmProviderSpec {
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
    #[schemars(length(min = 1))]
    pub host: String,
    #[serde(default = "default_provider_path")]
    #[schemars(regex(pattern = "^/"))]
    pub path: String,
    pub configs: ProviderConfigs,
}

fn default_provider_path() -> String {
    "/v1/chat/completions".into()
}

#[derive(Debug, Clone, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderConfigs {
    pub default_config: ProviderConfig,
}

#[derive(Debug, Clone, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderConfig {
    #[serde(rename = "openAIConfig")]
    pub open_ai_config: OpenAiConfig,
}

#[derive(Clone, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OpenAiConfig {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub stream: Option<bool>,
    /// Usually `${API_KEY}`: expanded by the gateway, never logged.
    #[schemars(length(min = 1))]
    pub api_key: String,
}

impl fmt::Debug for OpenAiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiConfig")
            .field("model", &self.model)
            .field("stream", &self.stream)
            .field("api_key", &"<redacted>")
            .finish()
    }
}

// ---------- LLMRoute ----------

#[derive(Debug, Clone, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LlmRouteSpec {
    #[schemars(length(min = 1))]
    pub host: String,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[schemars(length(min = 1))]
    pub rules: Vec<LlmRouteRule>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LlmRouteRule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<RouteMatch>,
    #[schemars(length(min = 1))]
    pub backend_refs: Vec<BackendRef>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
}

/// Istio's StringMatch: exactly one of exact, prefix, regex.
#[derive(Debug, Clone, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StringMatch {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
}

impl StringMatch {
    pub fn matches(&self, v: &str) -> bool {
        match (&self.exact, &self.prefix) {
            (Some(e), _) => v == e,
            (None, Some(p)) => v.starts_with(p.as_str()),
            (None, None) => false,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    #[schemars(length(min = 1))]
    pub provider_host: String,
    #[serde(default)]
    pub weight: Option<u32>,
    /// Failover order (llm-egress): backends of the lowest priority serve,
    /// by weight; the next priority serves when they fail or are ejected.
    /// Absent: 0.
    #[serde(default)]
    pub priority: Option<u32>,
}

// ---------- AuthorizationPolicy ----------

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<LabelSelector>,
    #[serde(default)]
    pub action: Action,
    /// `None`: no rules at all (an ALLOW then matches nothing).
    #[serde(default)]
    pub rules: Option<Vec<PolicyRule>>,
    /// The external authorizer of a CUSTOM policy: an `extensionProviders`
    /// entry of the mesh config.
    #[serde(default)]
    pub provider: Option<ExtensionProviderRef>,
    #[serde(default)]
    pub target_ref: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExtensionProviderRef {
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl LabelSelector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyRule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct From {
    pub source: Source,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct To {
    pub operation: Operation,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    pub principals: Option<Vec<String>>,
    pub not_principals: Option<Vec<String>>,
    pub request_principals: Option<Vec<String>>,
    pub not_request_principals: Option<Vec<String>>,
    pub namespaces: Option<Vec<String>>,
    pub not_namespaces: Option<Vec<String>>,
    pub ip_blocks: Option<Vec<String>>,
    pub not_ip_blocks: Option<Vec<String>>,
    pub remote_ip_blocks: Option<Vec<String>>,
    pub not_remote_ip_blocks: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    pub hosts: Option<Vec<String>>,
    pub not_hosts: Option<Vec<String>>,
    pub ports: Option<Vec<String>>,
    pub not_ports: Option<Vec<String>>,
    pub methods: Option<Vec<String>>,
    pub not_methods: Option<Vec<String>>,
    pub paths: Option<Vec<String>>,
    pub not_paths: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    pub values: Option<Vec<String>>,
    pub not_values: Option<Vec<String>>,
}

// ---------- RequestAuthentication ----------

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<LabelSelector>,
    #[serde(default)]
    pub jwt_rules: Vec<JwtRule>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRule {
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Inline JWKS document (JSON).
    #[serde(default)]
    pub jwks: Option<String>,
    /// Where the issuer publishes its keys: `https://` (or `http://`),
    /// fetched and refreshed by the gateway, or a `file://` path.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// Headers the token may come in (default `Authorization: Bearer`).
    #[serde(default)]
    pub from_headers: Vec<JwtHeader>,
    /// Query parameters the token may come in.
    #[serde(default)]
    pub from_params: Vec<String>,
    /// Keep the token's header on the request to the provider (default: removed).
    #[serde(default)]
    pub forward_original_token: bool,
    /// Send the verified payload (base64url JSON) to the provider in this header.
    #[serde(default)]
    pub output_payload_to_header: Option<String>,
    /// Send claims of the verified token to the provider in headers.
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimToHeader {
    pub header: String,
    pub claim: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtHeader {
    pub name: String,
    #[serde(default)]
    pub prefix: Option<String>,
}

fn jwks_uri_ok(uri: &str) -> bool {
    ["https://", "http://", "file://"]
        .iter()
        .any(|scheme| uri.strip_prefix(scheme).is_some_and(|rest| !rest.is_empty()))
}

/// An HTTP header name (RFC 9110 token characters).
fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

// ---------- Gateway ----------

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub servers: Vec<GatewayServer>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GatewayServer {
    #[serde(default)]
    pub hosts: Vec<String>,
    pub port: GatewayPort,
    #[serde(default)]
    pub tls: Option<GatewayTls>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GatewayPort {
    #[serde(default)]
    pub name: Option<String>,
    pub number: u16,
    #[serde(default)]
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GatewayTls {
    #[serde(default)]
    pub mode: Option<String>,
}

// ---------- loading ----------

/// All resources of one configuration source.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResourceSet {
    pub providers: Vec<Named<LlmProviderSpec>>,
    pub routes: Vec<Named<LlmRouteSpec>>,
    pub policies: Vec<Named<AuthorizationPolicySpec>>,
    pub authentications: Vec<Named<RequestAuthenticationSpec>>,
    pub gateways: Vec<Named<GatewaySpec>>,
    pub budgets: Vec<Named<LlmTokenBudgetSpec>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One problem found while loading, located as precisely as possible.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub severity: Severity,
    pub file: PathBuf,
    /// `Kind namespace/name`, when known.
    pub resource: Option<String>,
    /// Path of the field, e.g. `spec.rules[0].from[0].source.principals`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{sev}: {}", self.file.display())?;
        if let Some(r) = &self.resource {
            write!(f, ": {r}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<serde_yaml_ng::Value>,
    spec: Option<serde_yaml_ng::Value>,
}

/// Each kind, its API group, and the version error messages suggest.
const KINDS: [(&str, &str, &str); 6] = [
    ("LLMProvider", "istio.alibabacloud.com/", "v1beta1"),
    ("LLMRoute", "istio.alibabacloud.com/", "v1beta1"),
    ("AuthorizationPolicy", "security.istio.io/", "v1beta1"),
    ("RequestAuthentication", "security.istio.io/", "v1beta1"),
    ("Gateway", "networking.istio.io/", "v1beta1"),
    ("LLMTokenBudget", "llm-egress.io/", "v1alpha1"),
];

fn typed<T: serde::de::DeserializeOwned>(
    value: serde_yaml_ng::Value,
    prefix: &str,
) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            prefix.to_string()
        } else {
            format!("{prefix}.{path}")
        };
        (field, e.into_inner().to_string())
    })
}

impl ResourceSet {
    /// Adds every resource of `other`.
    pub fn merge(&mut self, other: ResourceSet) {
        self.providers.extend(other.providers);
        self.routes.extend(other.routes);
        self.policies.extend(other.policies);
        self.authentications.extend(other.authentications);
        self.gateways.extend(other.gateways);
        self.budgets.extend(other.budgets);
    }

    /// Parses a multi-document YAML text into this set; returns problems.
    pub fn add_text(&mut self, file: &Path, text: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        let problem = |severity, resource: Option<String>, field: Option<String>, message: String| Problem {
            severity,
            file: file.to_owned(),
            resource,
            field,
            message,
        };
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let value = match serde_yaml_ng::Value::deserialize(doc) {
                Ok(v) => v,
                Err(e) => {
                    problems.push(problem(
                        Severity::Error,
                        None,
                        None,
                        format!("document {}: not valid YAML: {e}", i + 1),
                    ));
                    // The rest of the stream cannot be trusted after a syntax error.
                    break;
                }
            };
            if value.is_null() {
                continue;
            }
            let env: Envelope = match serde_yaml_ng::from_value(value) {
                Ok(e) => e,
                Err(e) => {
                    problems.push(problem(
                        Severity::Error,
                        None,
                        None,
                        format!("document {}: {e}", i + 1),
                    ));
                    continue;
                }
            };
            let Some(kind) = env.kind.clone() else {
                problems.push(problem(
                    Severity::Error,
                    None,
                    Some("kind".into()),
                    format!("document {}: missing", i + 1),
                ));
                continue;
            };
            let meta: Meta = match env.metadata.map(|m| typed::<Meta>(m, "metadata")) {
                Some(Ok(m)) => m,
                Some(Err((field, msg))) => {
                    problems.push(problem(Severity::Error, Some(kind.clone()), Some(field), msg));
                    continue;
                }
                None => {
                    problems.push(problem(
                        Severity::Error,
                        Some(kind.clone()),
                        Some("metadata.name".into()),
                        "missing".into(),
                    ));
                    continue;
                }
            };
            let rname = format!("{kind} {}/{}", meta.namespace(), meta.name);
            let Some((_, group, version)) = KINDS.iter().find(|(k, _, _)| *k == kind) else {
                problems.push(problem(
                    Severity::Warning,
                    Some(rname),
                    Some("kind".into()),
                    format!("unknown kind {kind:?}; skipped"),
                ));
                continue;
            };
            let api = env.api_version.unwrap_or_default();
            if !api.starts_with(group) {
                problems.push(problem(
                    Severity::Error,
                    Some(rname),
                    Some("apiVersion".into()),
                    format!("{api:?} is not a version of {kind}; expected {group}{version}"),
                ));
                continue;
            }
            let Some(spec) = env.spec else {
                problems.push(problem(
                    Severity::Error,
                    Some(rname),
                    Some("spec".into()),
                    "missing".into(),
                ));
                continue;
            };
            let file = file.to_owned();
            let res = match kind.as_str() {
                "LLMProvider" => {
                    typed(spec, "spec").map(|spec| self.providers.push(Named { meta, spec, file }))
                }
                "LLMRoute" => typed(spec, "spec").map(|spec| self.routes.push(Named { meta, spec, file })),
                "AuthorizationPolicy" => {
                    typed(spec, "spec").map(|spec| self.policies.push(Named { meta, spec, file }))
                }
                "RequestAuthentication" => {
                    typed(spec, "spec").map(|spec| self.authentications.push(Named { meta, spec, file }))
                }
                "LLMTokenBudget" => {
                    typed(spec, "spec").map(|spec| self.budgets.push(Named { meta, spec, file }))
                }
                _ => typed(spec, "spec").map(|spec| self.gateways.push(Named { meta, spec, file })),
            };
            if let Err((field, msg)) = res {
                problems.push(problem(Severity::Error, Some(rname), Some(field), msg));
            }
        }
        problems
    }

    /// Loads every `*.yaml` / `*.yml` file of `dir` (sorted, not recursive).
    pub fn load_dir(dir: &Path) -> Result<(ResourceSet, Vec<Problem>), std::io::Error> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect();
        files.sort();
        let mut set = ResourceSet::default();
        let mut problems = Vec::new();
        for f in files {
            match std::fs::read_to_string(&f) {
                Ok(text) => problems.extend(set.add_text(&f, &text)),
                Err(e) => problems.push(Problem {
                    severity: Severity::Error,
                    file: f,
                    resource: None,
                    field: None,
                    message: format!("cannot read: {e}"),
                }),
            }
        }
        problems.extend(set.validate());
        Ok((set, problems))
    }

    /// `load_dir`, with an unreadable directory reported as a problem too.
    pub fn load_dir_checked(dir: &Path) -> Result<(ResourceSet, Vec<Problem>), Vec<Problem>> {
        ResourceSet::load_dir(dir).map_err(|e| {
            vec![Problem {
                severity: Severity::Error,
                file: dir.to_owned(),
                resource: None,
                field: None,
                message: format!("cannot read the resource directory: {e}"),
            }]
        })
    }

    /// Checks what the types alone cannot.
    pub fn validate(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut err = |file: &Path, kind: &str, meta: &Meta, field: String, message: String| {
            out.push(Problem {
                severity: Severity::Error,
                file: file.to_owned(),
                resource: Some(format!("{kind} {}/{}", meta.namespace(), meta.name)),
                field: Some(field),
                message,
            })
        };
        for p in &self.providers {
            if p.spec.host.trim().is_empty() {
                err(
                    &p.file,
                    "LLMProvider",
                    &p.meta,
                    "spec.host".into(),
                    "must not be empty".into(),
                );
            }
            if !p.spec.path.starts_with('/') {
                err(
                    &p.file,
                    "LLMProvider",
                    &p.meta,
                    "spec.path".into(),
                    format!("{:?} must start with '/'", p.spec.path),
                );
            }
            if p.spec
                .configs
                .default_config
                .open_ai_config
                .api_key
                .trim()
                .is_empty()
            {
                err(
                    &p.file,
                    "LLMProvider",
                    &p.meta,
                    "spec.configs.defaultConfig.openAIConfig.apiKey".into(),
                    "must not be empty".into(),
                );
            }
        }
        for r in &self.routes {
            if r.spec.host.trim().is_empty() {
                err(
                    &r.file,
                    "LLMRoute",
                    &r.meta,
                    "spec.host".into(),
                    "must not be empty".into(),
                );
            }
            if r.spec.rules.is_empty() {
                err(
                    &r.file,
                    "LLMRoute",
                    &r.meta,
                    "spec.rules".into(),
                    "needs at least one rule".into(),
                );
            }
            for (i, rule) in r.spec.rules.iter().enumerate() {
                if rule.backend_refs.is_empty() {
                    err(
                        &r.file,
                        "LLMRoute",
                        &r.meta,
                        format!("spec.rules[{i}].backendRefs"),
                        "needs at least one backend".into(),
                    );
                }
                for (j, b) in rule.backend_refs.iter().enumerate() {
                    if b.provider_host.trim().is_empty() {
                        err(
                            &r.file,
                            "LLMRoute",
                            &r.meta,
                            format!("spec.rules[{i}].backendRefs[{j}].providerHost"),
                            "must not be empty".into(),
                        );
                    }
                }
                for (j, m) in rule.matches.iter().enumerate() {
                    for (h, sm) in &m.headers {
                        if sm.exact.is_none() && sm.prefix.is_none() {
                            err(
                                &r.file,
                                "LLMRoute",
                                &r.meta,
                                format!("spec.rules[{i}].matches[{j}].headers.{h}"),
                                "needs exact or prefix".into(),
                            );
                        }
                    }
                }
            }
        }
        for p in &self.policies {
            let s = &p.spec;
            match (&s.action, &s.provider) {
                (Action::Custom, Some(r)) if !r.name.trim().is_empty() => {}
                (Action::Custom, _) => err(&p.file, "AuthorizationPolicy", &p.meta, "spec.provider.name".into(), "a CUSTOM policy names its external authorizer (an extensionProviders entry of the mesh config)".into()),
                (_, Some(_)) => err(&p.file, "AuthorizationPolicy", &p.meta, "spec.provider".into(), "only a CUSTOM policy names a provider; set action: CUSTOM or remove it".into()),
                _ => {}
            }
            if s.target_ref.is_some() {
                err(
                    &p.file,
                    "AuthorizationPolicy",
                    &p.meta,
                    "spec.targetRef".into(),
                    "not supported; use spec.selector".into(),
                );
            }
            for (i, rule) in s.rules.iter().flatten().enumerate() {
                for (j, f) in rule.from.iter().enumerate() {
                    let src = &f.source;
                    for (name, v) in [
                        ("ipBlocks", &src.ip_blocks),
                        ("notIpBlocks", &src.not_ip_blocks),
                        ("remoteIpBlocks", &src.remote_ip_blocks),
                        ("notRemoteIpBlocks", &src.not_remote_ip_blocks),
                    ] {
                        if v.is_some() {
                            err(&p.file, "AuthorizationPolicy", &p.meta, format!("spec.rules[{i}].from[{j}].source.{name}"), "not supported: the gateway matches on workload identity, not source addresses".into());
                        }
                    }
                }
                for (j, c) in rule.when.iter().enumerate() {
                    if !crate::resources::condition_key_supported(&c.key) {
                        err(
                            &p.file,
                            "AuthorizationPolicy",
                            &p.meta,
                            format!("spec.rules[{i}].when[{j}].key"),
                            format!("{:?} is not a supported condition key", c.key),
                        );
                    }
                    if c.values.is_none() && c.not_values.is_none() {
                        err(
                            &p.file,
                            "AuthorizationPolicy",
                            &p.meta,
                            format!("spec.rules[{i}].when[{j}]"),
                            "needs values or notValues".into(),
                        );
                    }
                }
                for (j, t) in rule.to.iter().enumerate() {
                    for (name, v) in [
                        ("ports", &t.operation.ports),
                        ("notPorts", &t.operation.not_ports),
                    ] {
                        for port in v.iter().flatten() {
                            if port.parse::<u16>().is_err() {
                                err(
                                    &p.file,
                                    "AuthorizationPolicy",
                                    &p.meta,
                                    format!("spec.rules[{i}].to[{j}].operation.{name}"),
                                    format!("{port:?} is not a port number"),
                                );
                            }
                        }
                    }
                }
            }
        }
        for a in &self.authentications {
            for (i, r) in a.spec.jwt_rules.iter().enumerate() {
                if r.issuer.trim().is_empty() {
                    err(
                        &a.file,
                        "RequestAuthentication",
                        &a.meta,
                        format!("spec.jwtRules[{i}].issuer"),
                        "must not be empty".into(),
                    );
                }
                match (&r.jwks, &r.jwks_uri) {
                    (None, None) => err(
                        &a.file,
                        "RequestAuthentication",
                        &a.meta,
                        format!("spec.jwtRules[{i}].jwks"),
                        "give jwks (inline) or jwksUri (https://, http:// or file://)".into(),
                    ),
                    (None, Some(uri)) if !jwks_uri_ok(uri) => err(
                        &a.file,
                        "RequestAuthentication",
                        &a.meta,
                        format!("spec.jwtRules[{i}].jwksUri"),
                        "expected an https://, http:// or file:// URI".into(),
                    ),
                    _ => {}
                }
                let header_names = r
                    .from_headers
                    .iter()
                    .map(|h| (format!("fromHeaders {:?}", h.name), h.name.as_str()))
                    .chain(
                        r.output_payload_to_header
                            .iter()
                            .map(|h| (format!("outputPayloadToHeader {h:?}"), h.as_str())),
                    )
                    .chain(
                        r.output_claim_to_headers
                            .iter()
                            .map(|c| (format!("outputClaimToHeaders {:?}", c.header), c.header.as_str())),
                    );
                for (what, name) in header_names {
                    if !valid_header_name(name) {
                        err(
                            &a.file,
                            "RequestAuthentication",
                            &a.meta,
                            format!("spec.jwtRules[{i}]"),
                            format!("{what} is not a valid HTTP header name"),
                        );
                    }
                }
                for c in &r.output_claim_to_headers {
                    if c.claim.trim().is_empty() {
                        err(
                            &a.file,
                            "RequestAuthentication",
                            &a.meta,
                            format!("spec.jwtRules[{i}].outputClaimToHeaders"),
                            format!("header {:?} names no claim", c.header),
                        );
                    }
                }
            }
        }
        for g in &self.gateways {
            if g.spec.servers.is_empty() {
                err(
                    &g.file,
                    "Gateway",
                    &g.meta,
                    "spec.servers".into(),
                    "needs at least one server".into(),
                );
            }
        }
        crate::budget::validate(&self.budgets, &mut out);
        out
    }
}

/// What a watcher compares to notice a change: every file of a directory
/// (and any extra files, such as mounted keys) with its mtime and size.
pub type Fingerprint = Vec<(PathBuf, Option<std::time::SystemTime>, u64)>;

pub fn fingerprint(dir: &Path, extra: &[PathBuf]) -> Fingerprint {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.extend(extra.iter().cloned());
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f).ok();
            let modified = meta.as_ref().and_then(|m| m.modified().ok());
            let len = meta.map(|m| m.len()).unwrap_or(0);
            (f, modified, len)
        })
        .collect()
}

/// Condition keys of `when` that the gateway evaluates.
pub fn condition_key_supported(key: &str) -> bool {
    let bracketed = |prefix: &str| {
        key.strip_prefix(prefix)
            .is_some_and(|r| r.ends_with(']') && r.len() > 1)
    };
    matches!(
        key,
        "source.principal"
            | "source.namespace"
            | "request.auth.principal"
            | "request.auth.audiences"
            | "request.auth.presenter"
            | "destination.port"
    ) || bracketed("request.headers[")
        || bracketed("request.auth.claims[")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEEDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples");

    #[test]
    fn the_seed_manifests_load_unchanged() {
        let (set, problems) = ResourceSet::load_dir(Path::new(SEEDS)).unwrap();
        assert!(problems.is_empty(), "{problems:#?}");
        let gw = &set.gateways[0];
        assert_eq!(
            (gw.meta.namespace(), gw.meta.name.as_str()),
            ("istio-system", "egress-gw")
        );
        assert_eq!(gw.spec.selector["istio"], "egressgateway");
        assert_eq!(gw.spec.servers[0].port.number, 80);
        assert_eq!(
            gw.spec.servers[0].tls.as_ref().unwrap().mode.as_deref(),
            Some("ISTIO_MUTUAL")
        );

        let p = &set.providers[0];
        assert_eq!(p.spec.host, "dashscope.aliyuncs.com");
        assert_eq!(p.spec.path, "/compatible-mode/v1/chat/completions");
        let oai = &p.spec.configs.default_config.open_ai_config;
        assert_eq!(oai.model.as_deref(), Some("qwen1.5-72b-chat"));
        assert_eq!(oai.stream, Some(false));
        assert_eq!(oai.api_key, "${API_KEY}");
        assert_eq!(
            p.spec.workload_selector.as_ref().unwrap().labels["istio"],
            "egressgateway"
        );

        let r = &set.routes[0];
        assert_eq!(r.spec.host, "dashscope.aliyuncs.com");
        assert_eq!(r.spec.gateways, ["mesh", "istio-system/egress-gw"]);
        assert_eq!(r.spec.rules[0].matches[0].gateways, ["mesh"]);
        assert_eq!(
            r.spec.rules[0].backend_refs[0].provider_host,
            "istio-egressgateway.istio-system.svc.cluster.local"
        );
        assert_eq!(
            r.spec.rules[1].backend_refs[0].provider_host,
            "dashscope.aliyuncs.com"
        );

        let a = &set.policies[0];
        assert_eq!(a.spec.action, Action::Deny);
        let rule = &a.spec.rules.as_ref().unwrap()[0];
        assert_eq!(
            rule.from[0].source.principals.as_deref(),
            Some(&["cluster.local/ns/default/sa/sleep".to_string()][..])
        );
        assert_eq!(
            rule.to[0].operation.hosts.as_deref(),
            Some(&["dashscope.aliyuncs.com".to_string()][..])
        );
    }

    fn load(text: &str) -> (ResourceSet, Vec<Problem>) {
        let mut set = ResourceSet::default();
        let mut problems = set.add_text(Path::new("bad.yaml"), text);
        problems.extend(set.validate());
        (set, problems)
    }

    #[test]
    fn missing_required_field_is_named_with_resource() {
        let (_, problems) = load("apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata: {name: r}\nspec:\n  rules: []\n");
        let p = &problems[0];
        assert_eq!(p.severity, Severity::Error);
        assert_eq!(p.resource.as_deref(), Some("LLMRoute default/r"));
        assert!(p.message.contains("host"), "{p}");
        assert!(
            p.to_string().starts_with("error: bad.yaml: LLMRoute default/r"),
            "{p}"
        );
    }

    #[test]
    fn unknown_policy_field_is_an_error_with_path() {
        let (_, problems) = load("apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: istio-system}\nspec:\n  rules:\n  - from:\n    - source:\n        principalz: [a]\n");
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert_eq!(
            problems[0].field.as_deref(),
            Some("spec.rules[0].from[0].source.principalz")
        );
        assert!(problems[0].message.contains("principalz"), "{}", problems[0]);
    }

    #[test]
    fn unknown_action_is_rejected() {
        let (_, problems) = load("apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  action: BLOCK\n");
        assert_eq!(problems[0].field.as_deref(), Some("spec.action"), "{problems:#?}");
    }

    #[test]
    fn custom_needs_a_provider_and_only_custom_has_one() {
        let (set, problems) = load("apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  action: CUSTOM\n  provider: {name: ext}\n  rules: [{to: [{operation: {paths: [/v1/*]}}]}]\n");
        assert!(problems.is_empty(), "{problems:#?}");
        assert_eq!(
            set.policies[0].spec.provider.as_ref().map(|p| p.name.as_str()),
            Some("ext")
        );
        let (_, problems) = load("apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  action: CUSTOM\n  rules: [{}]\n");
        assert_eq!(
            problems[0].field.as_deref(),
            Some("spec.provider.name"),
            "{problems:#?}"
        );
        let (_, problems) = load("apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  action: DENY\n  provider: {name: ext}\n  rules: [{}]\n");
        assert_eq!(
            problems[0].field.as_deref(),
            Some("spec.provider"),
            "{problems:#?}"
        );
    }

    #[test]
    fn ip_blocks_are_refused_not_ignored() {
        let (_, problems) = load("apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  action: CUSTOM\n  rules:\n  - from:\n    - source: {ipBlocks: [10.0.0.0/8]}\n    when:\n    - key: source.ip\n      values: [x]\n");
        let fields: Vec<_> = problems.iter().filter_map(|p| p.field.clone()).collect();
        assert!(
            fields.contains(&"spec.rules[0].from[0].source.ipBlocks".to_string()),
            "{fields:?}"
        );
        assert!(
            fields.contains(&"spec.rules[0].when[0].key".to_string()),
            "{fields:?}"
        );
    }

    #[test]
    fn unknown_kind_is_a_warning_and_skipped() {
        let (set, problems) = load("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {}\n---\napiVersion: networking.istio.io/v1beta1\nkind: Gateway\nmetadata: {name: g}\nspec:\n  servers: [{port: {number: 80}}]\n");
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].severity, Severity::Warning);
        assert_eq!(set.gateways.len(), 1);
    }

    #[test]
    fn wrong_api_group_and_bad_yaml_are_reported() {
        let (_, problems) = load("apiVersion: v1\nkind: LLMRoute\nmetadata: {name: r}\nspec: {}\n");
        assert_eq!(problems[0].field.as_deref(), Some("apiVersion"));
        let (_, problems) = load("kind: [unclosed\n");
        assert!(problems[0].message.contains("not valid YAML"), "{problems:?}");
    }

    #[test]
    fn empty_route_fields_are_reported() {
        let (_, problems) = load("apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata: {name: r}\nspec:\n  host: ''\n  rules:\n  - backendRefs: []\n");
        let fields: Vec<_> = problems.iter().filter_map(|p| p.field.clone()).collect();
        assert!(fields.contains(&"spec.host".to_string()), "{fields:?}");
        assert!(
            fields.contains(&"spec.rules[0].backendRefs".to_string()),
            "{fields:?}"
        );
    }

    #[test]
    fn api_key_is_redacted_in_debug() {
        let c = OpenAiConfig {
            model: None,
            stream: None,
            api_key: "sk-secret-value".into(),
        };
        assert!(!format!("{c:?}").contains("sk-secret"));
    }

    /// Fuzz target: any resource text, and the seed's manifests with a
    /// fuzzed splice. Parsing, validation and scoping never panic, and
    /// scoping keeps one route and one provider per host.
    #[test]
    fn fuzz_resource_parsing_validation_and_scoping() {
        let seed: String = [
            "dashscope-qwen.yaml",
            "dashscope-route.yaml",
            "egress-gw.yaml",
            "authpolicy.yaml",
        ]
        .iter()
        .map(|f| {
            std::fs::read_to_string(
                Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples")).join(f),
            )
            .unwrap()
        })
        .collect::<Vec<_>>()
        .join("\n---\n");
        let scope = crate::scope::Scope::new(["istio-system"]);
        bolero::check!()
            .with_type::<(u16, u8, Vec<u8>, bool)>()
            .with_iterations(crate::FUZZ_ITERATIONS)
            .for_each(|(at, len, splice, raw)| {
                let text = if *raw {
                    String::from_utf8_lossy(splice).into_owned()
                } else {
                    let bytes = seed.as_bytes();
                    let at = (*at as usize).min(bytes.len());
                    let end = (at + *len as usize).min(bytes.len());
                    let mut t = bytes[..at].to_vec();
                    t.extend_from_slice(splice);
                    t.extend_from_slice(&bytes[end..]);
                    String::from_utf8_lossy(&t).into_owned()
                };
                let mut set = ResourceSet::default();
                let _ = set.add_text(Path::new("fuzz.yaml"), &text);
                let _ = set.validate();
                let _ = crate::scope::admit(&mut set, &scope);
                let mut hosts: Vec<String> = set
                    .routes
                    .iter()
                    .map(|r| r.spec.host.to_ascii_lowercase())
                    .collect();
                let n = hosts.len();
                hosts.sort();
                hosts.dedup();
                assert_eq!(hosts.len(), n, "two accepted routes for one host");
                assert!(set.providers.iter().all(|p| scope.is_trusted(p.meta.namespace())));
            });
    }
}

//! CUSTOM authorization (Istio's ext_authz, Envoy's HTTP authorization
//! service protocol): for a request a CUSTOM policy matches, the gateway
//! asks the policy's authorizer — an `envoyExtAuthzHttp` entry of the mesh
//! config — before any DENY or ALLOW policy is looked at.
//!
//! The check is the original request's method and path (under
//! `pathPrefix`), with no body, carrying the headers
//! `includeRequestHeadersInCheck` selects (by default `authorization`), the
//! `includeAdditionalHeadersInCheck` ones, and the workload's SPIFFE
//! identity as Envoy forwards a peer certificate's:
//! `x-forwarded-client-cert: URI=spiffe://…` (a client's own header of that
//! name is never passed on). A 200 allows: `headersToUpstreamOnAllow` go to
//! the provider, `headersToDownstreamOnAllow` to the client. Anything else
//! denies with the authorizer's status, body and `headersToDownstreamOnDeny`
//! (all its headers when that is empty). When the authorizer cannot be
//! reached or answers too late: allowed if `failOpen`, else
//! `statusOnError`.
//!
//! `envoyExtAuthzGrpc` providers get Envoy's `Authorization/Check` gRPC
//! call (types from `envoy-types`): the request's method, path, host and
//! headers, and the workload's SPIFFE ID as the source peer's principal.
//! An OK status allows (the OK response's headers go to the provider, its
//! response headers to the client); a denial's status, headers and body go
//! to the client.

use std::{collections::HashMap, time::Duration};

use bytes::Bytes;
use envoy_types::pb::envoy::service::auth::v3::{
    self as auth, attribute_context, authorization_client::AuthorizationClient, check_response,
};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    header::{HeaderName, HeaderValue},
    HeaderMap, Method, Request, StatusCode,
};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use llm_egress_config::mesh_config::{ExtAuthzProtocol, ExtAuthzProvider, HttpSettings};

use super::authz::value_matches;
use crate::upstream::Resolver;

/// The largest authorizer answer read (a deny body is shown to the client).
const MAX_ANSWER: usize = 64 * 1024;

/// Headers that describe a connection or a body, never copied between
/// the client's request, the check and the answers.
const NEVER_COPIED: [&str; 9] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "proxy-connection",
    "te",
    "x-forwarded-client-cert",
];

/// The request being authorized, as the check describes it.
pub struct CheckInput<'a> {
    pub method: &'a Method,
    pub host: &'a str,
    /// Path and query of the original request.
    pub path_and_query: &'a str,
    pub headers: &'a HeaderMap,
    /// Peer principal, `cluster.local/ns/NS/sa/SA`.
    pub principal: Option<&'a str>,
    /// The start of the request body, read for authorizers that want it
    /// (`includeRequestBodyInCheck`), and whether it is the whole body.
    pub body: Option<(&'a [u8], bool)>,
}

/// The part of a request body one authorizer gets: at most its
/// `maxRequestBytes`, and whether that is less than the whole body.
fn check_body<'a>(provider: &ExtAuthzProvider, input: &CheckInput<'a>) -> Option<(&'a [u8], bool)> {
    let settings = provider.body?;
    let (buffered, complete) = input.body.unwrap_or((&[], true));
    let cut = buffered.len() > settings.max_request_bytes;
    Some((
        &buffered[..buffered.len().min(settings.max_request_bytes)],
        cut || !complete,
    ))
}

/// The header Envoy adds to a check that carries a body.
const PARTIAL_BODY_HEADER: &str = "x-envoy-auth-partial-body";

#[derive(Debug)]
pub enum Verdict {
    Allow {
        to_upstream: Vec<(HeaderName, HeaderValue)>,
        to_downstream: Vec<(HeaderName, HeaderValue)>,
    },
    Deny {
        status: StatusCode,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: Bytes,
    },
}

/// How a check ended, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied,
    /// The authorizer failed; `failOpen` let the request through.
    ErrorAllowed,
    /// The authorizer failed; `statusOnError` answered.
    ErrorDenied,
    /// The policy names no provider of the mesh config: fail closed.
    UnknownProvider,
    /// The body is larger than `maxRequestBytes` and partial messages are
    /// not allowed: 413, as Envoy answers.
    BodyTooLarge,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Allowed => "allow",
            Outcome::Denied => "deny",
            Outcome::ErrorAllowed => "error_fail_open",
            Outcome::ErrorDenied => "error",
            Outcome::UnknownProvider => "unknown_provider",
            Outcome::BodyTooLarge => "body_too_large",
        }
    }
}

type HttpClient = Client<HttpConnector<Resolver>, Full<Bytes>>;
type GrpcClient = AuthorizationClient<tonic::transport::Channel>;

/// The configured authorizers, by provider name.
pub struct ExtAuthz {
    providers: HashMap<String, ExtAuthzProvider>,
    client: HttpClient,
    /// One lazily connected HTTP/2 channel per gRPC provider.
    grpc: HashMap<String, GrpcClient>,
}

impl ExtAuthz {
    pub fn new(providers: Vec<ExtAuthzProvider>, resolver: Resolver) -> ExtAuthz {
        let mut http = HttpConnector::new_with_resolver(resolver.clone());
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        http.set_nodelay(true);
        let mut grpc = HashMap::new();
        for p in providers.iter().filter(|p| p.protocol == ExtAuthzProtocol::Grpc) {
            let Ok(endpoint) =
                tonic::transport::Endpoint::from_shared(format!("http://{}:{}", p.service, p.port))
            else {
                continue;
            };
            let mut connector = HttpConnector::new_with_resolver(resolver.clone());
            connector.set_connect_timeout(Some(Duration::from_secs(5)));
            connector.set_nodelay(true);
            let channel = endpoint.connect_with_connector_lazy(connector);
            grpc.insert(p.name.clone(), AuthorizationClient::new(channel));
        }
        ExtAuthz {
            providers: providers.into_iter().map(|p| (p.name.clone(), p)).collect(),
            client: Client::builder(TokioExecutor::new()).build(http),
            grpc,
        }
    }

    pub fn names(&self) -> Vec<&str> {
        let mut n: Vec<&str> = self.providers.keys().map(String::as_str).collect();
        n.sort();
        n
    }

    /// The most body any of `names` wants in its check (`None`: none does).
    pub fn body_wanted(&self, names: &[&str]) -> Option<usize> {
        names
            .iter()
            .filter_map(|n| self.providers.get(*n)?.body)
            .map(|b| b.max_request_bytes)
            .max()
    }

    /// Asks provider `name` about a request.
    pub async fn check(&self, name: &str, input: &CheckInput<'_>) -> (Verdict, Outcome) {
        let Some(provider) = self.providers.get(name) else {
            // Istio turns a CUSTOM policy with an unknown provider into a
            // deny of what it matches, never into an allow.
            return (deny_empty(StatusCode::FORBIDDEN), Outcome::UnknownProvider);
        };
        if let (Some(settings), Some((_, true))) = (provider.body, check_body(provider, input)) {
            if !settings.allow_partial_message {
                return (deny_empty(StatusCode::PAYLOAD_TOO_LARGE), Outcome::BodyTooLarge);
            }
        }
        let settings = match &provider.protocol {
            ExtAuthzProtocol::Http(s) => s,
            ExtAuthzProtocol::Grpc => return self.check_grpc(provider, input).await,
        };
        let request = match check_request(provider, settings, input) {
            Some(r) => r,
            None => return on_error(provider),
        };
        let answer = tokio::time::timeout(provider.timeout, async {
            let resp = self.client.request(request).await.ok()?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_ANSWER).collect().await.ok()?.to_bytes();
            Some((parts, body))
        })
        .await;
        let Ok(Some((parts, body))) = answer else {
            return on_error(provider);
        };
        if parts.status == StatusCode::OK {
            let to_upstream = select(&parts.headers, &settings.headers_to_upstream_on_allow, false);
            let to_downstream = select(&parts.headers, &settings.headers_to_downstream_on_allow, false);
            (
                Verdict::Allow {
                    to_upstream,
                    to_downstream,
                },
                Outcome::Allowed,
            )
        } else {
            // Only 200 allows; any other success or informational status
            // is a denial, and must not reach the client as a success.
            let status = if parts.status.is_success() || parts.status.is_informational() {
                StatusCode::FORBIDDEN
            } else {
                parts.status
            };
            (
                Verdict::Deny {
                    status,
                    headers: select(&parts.headers, &settings.headers_to_downstream_on_deny, true),
                    body,
                },
                Outcome::Denied,
            )
        }
    }
}

impl ExtAuthz {
    async fn check_grpc(&self, provider: &ExtAuthzProvider, input: &CheckInput<'_>) -> (Verdict, Outcome) {
        let Some(client) = self.grpc.get(&provider.name) else {
            return on_error(provider);
        };
        let mut client = client.clone();
        let request = grpc_check_request(provider, input);
        let answer = tokio::time::timeout(provider.timeout, client.check(request)).await;
        let Ok(Ok(answer)) = answer else {
            return on_error(provider);
        };
        grpc_verdict(answer.into_inner())
    }
}

/// The `CheckRequest` Envoy would send for `input`.
fn grpc_check_request(provider: &ExtAuthzProvider, input: &CheckInput) -> auth::CheckRequest {
    let mut headers = HashMap::new();
    let mut body = String::new();
    let mut raw_body = Vec::new();
    if let Some((bytes, partial)) = check_body(provider, input) {
        headers.insert(PARTIAL_BODY_HEADER.to_string(), partial.to_string());
        if provider.body.is_some_and(|b| b.pack_as_bytes) {
            raw_body = bytes.to_vec();
        } else {
            body = String::from_utf8_lossy(bytes).into_owned();
        }
    }
    for (name, value) in input.headers {
        // The partial-body flag is the gateway's to set, never a client's.
        if NEVER_COPIED.contains(&name.as_str()) || name == PARTIAL_BODY_HEADER {
            continue;
        }
        if let Ok(v) = value.to_str() {
            headers
                .entry(name.as_str().to_string())
                .and_modify(|all: &mut String| {
                    all.push(',');
                    all.push_str(v);
                })
                .or_insert_with(|| v.to_string());
        }
    }
    auth::CheckRequest {
        attributes: Some(auth::AttributeContext {
            source: Some(attribute_context::Peer {
                principal: input
                    .principal
                    .map(|p| format!("spiffe://{p}"))
                    .unwrap_or_default(),
                ..Default::default()
            }),
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    method: input.method.to_string(),
                    headers,
                    path: input.path_and_query.to_string(),
                    host: input.host.to_string(),
                    scheme: "http".into(),
                    protocol: "HTTP/1.1".into(),
                    size: input
                        .body
                        .filter(|(_, complete)| *complete)
                        .map_or(-1, |(b, _)| b.len() as i64),
                    body,
                    raw_body,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// Header options of an answer, as (name, value) pairs that are valid HTTP.
fn header_options(
    options: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption],
) -> Vec<(HeaderName, HeaderValue)> {
    options
        .iter()
        .filter_map(|o| o.header.as_ref())
        .filter_map(|h| {
            let name = HeaderName::from_bytes(h.key.as_bytes()).ok()?;
            let value = if h.raw_value.is_empty() {
                HeaderValue::from_str(&h.value).ok()?
            } else {
                HeaderValue::from_bytes(&h.raw_value).ok()?
            };
            (!NEVER_COPIED.contains(&name.as_str())).then_some((name, value))
        })
        .collect()
}

/// Allow when the status is OK (gRPC code 0), else deny as the answer says.
fn grpc_verdict(answer: auth::CheckResponse) -> (Verdict, Outcome) {
    let ok = answer.status.as_ref().is_some_and(|s| s.code == 0);
    match (ok, answer.http_response) {
        (true, Some(check_response::HttpResponse::OkResponse(r))) => (
            Verdict::Allow {
                to_upstream: header_options(&r.headers),
                to_downstream: header_options(&r.response_headers_to_add),
            },
            Outcome::Allowed,
        ),
        (true, _) => (
            Verdict::Allow {
                to_upstream: Vec::new(),
                to_downstream: Vec::new(),
            },
            Outcome::Allowed,
        ),
        (false, Some(check_response::HttpResponse::DeniedResponse(d))) => {
            let status = d
                .status
                .and_then(|s| u16::try_from(s.code).ok())
                .and_then(|c| StatusCode::from_u16(c).ok())
                .filter(|c| !c.is_success() && !c.is_informational())
                .unwrap_or(StatusCode::FORBIDDEN);
            (
                Verdict::Deny {
                    status,
                    headers: header_options(&d.headers),
                    body: Bytes::from(d.body),
                },
                Outcome::Denied,
            )
        }
        (false, _) => (deny_empty(StatusCode::FORBIDDEN), Outcome::Denied),
    }
}

fn deny_empty(status: StatusCode) -> Verdict {
    Verdict::Deny {
        status,
        headers: Vec::new(),
        body: Bytes::new(),
    }
}

fn on_error(provider: &ExtAuthzProvider) -> (Verdict, Outcome) {
    if provider.fail_open {
        (
            Verdict::Allow {
                to_upstream: Vec::new(),
                to_downstream: Vec::new(),
            },
            Outcome::ErrorAllowed,
        )
    } else {
        let status = StatusCode::from_u16(provider.status_on_error).unwrap_or(StatusCode::FORBIDDEN);
        (deny_empty(status), Outcome::ErrorDenied)
    }
}

fn name_selected(name: &str, patterns: &[String]) -> bool {
    patterns.iter().any(|p| value_matches(p, name))
}

/// The headers of `headers` that `patterns` select (all when `patterns` is
/// empty and `all_if_empty`), except those never copied.
fn select(headers: &HeaderMap, patterns: &[String], all_if_empty: bool) -> Vec<(HeaderName, HeaderValue)> {
    headers
        .iter()
        .filter(|(n, _)| !NEVER_COPIED.contains(&n.as_str()))
        .filter(|(n, _)| (all_if_empty && patterns.is_empty()) || name_selected(n.as_str(), patterns))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect()
}

/// The check request Envoy would send for `input`.
fn check_request(
    provider: &ExtAuthzProvider,
    settings: &HttpSettings,
    input: &CheckInput,
) -> Option<Request<Full<Bytes>>> {
    let uri = format!(
        "http://{}:{}{}{}",
        provider.service, provider.port, settings.path_prefix, input.path_and_query
    );
    let mut builder = Request::builder().method(input.method.clone()).uri(uri);
    let headers = builder.headers_mut()?;
    headers.insert(hyper::header::HOST, HeaderValue::from_str(input.host).ok()?);
    // Envoy's default allowed headers: authorization (and the pseudo
    // headers, which the method, path and Host carry here).
    let default = ["authorization".to_string()];
    let patterns: &[String] = if settings.include_request_headers.is_empty() {
        &default
    } else {
        &settings.include_request_headers
    };
    for (name, value) in input.headers {
        if !NEVER_COPIED.contains(&name.as_str())
            && name != PARTIAL_BODY_HEADER
            && name_selected(name.as_str(), patterns)
        {
            headers.append(name.clone(), value.clone());
        }
    }
    for (name, value) in &settings.additional_headers {
        let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) else {
            continue;
        };
        headers.insert(n, v);
    }
    if let Some(principal) = input.principal {
        if let Ok(v) = HeaderValue::from_str(&format!("URI=spiffe://{principal}")) {
            headers.insert("x-forwarded-client-cert", v);
        }
    }
    let body = match check_body(provider, input) {
        Some((bytes, partial)) => {
            headers.insert(
                PARTIAL_BODY_HEADER,
                HeaderValue::from_static(if partial { "true" } else { "false" }),
            );
            Bytes::copy_from_slice(bytes)
        }
        None => Bytes::new(),
    };
    builder.body(Full::new(body)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(settings: HttpSettings) -> ExtAuthzProvider {
        ExtAuthzProvider {
            name: "ext".into(),
            service: "authz.example".into(),
            port: 8000,
            timeout: Duration::from_secs(1),
            fail_open: false,
            status_on_error: 503,
            protocol: ExtAuthzProtocol::Http(settings),
            body: None,
        }
    }

    #[test]
    fn the_body_goes_to_authorizers_that_ask_cut_to_their_limit() {
        let mut p = provider(HttpSettings::default());
        p.body = Some(llm_egress_config::mesh_config::BodySettings {
            max_request_bytes: 5,
            allow_partial_message: true,
            pack_as_bytes: false,
        });
        let client = headers(&[("x-envoy-auth-partial-body", "false")]);
        let settings = HttpSettings {
            include_request_headers: vec!["x-envoy-*".into()],
            ..Default::default()
        };
        for (body, complete, sent, partial) in [
            (&b"hello world"[..], true, &b"hello"[..], "true"),
            (&b"hi"[..], true, &b"hi"[..], "false"),
            (&b"hi"[..], false, &b"hi"[..], "true"),
        ] {
            let input = CheckInput {
                method: &Method::POST,
                host: "h",
                path_and_query: "/",
                headers: &client,
                principal: None,
                body: Some((body, complete)),
            };
            let req = check_request(&p, &settings, &input).unwrap();
            assert_eq!(req.headers().get_all(PARTIAL_BODY_HEADER).iter().count(), 1);
            assert_eq!(req.headers()[PARTIAL_BODY_HEADER], partial);
            let grpc = grpc_check_request(&p, &input);
            let http = grpc.attributes.unwrap().request.unwrap().http.unwrap();
            assert_eq!(http.body.as_bytes(), sent);
            assert_eq!(http.headers[PARTIAL_BODY_HEADER], partial);
            let got = futures::executor::block_on(req.into_body().collect())
                .unwrap()
                .to_bytes();
            assert_eq!(&got[..], sent);
        }
        // packAsBytes: raw_body, not body.
        p.body = p.body.map(|b| llm_egress_config::mesh_config::BodySettings {
            pack_as_bytes: true,
            ..b
        });
        let input = CheckInput {
            method: &Method::POST,
            host: "h",
            path_and_query: "/",
            headers: &client,
            principal: None,
            body: Some((&[0xff, 0x00], true)),
        };
        let http = grpc_check_request(&p, &input)
            .attributes
            .unwrap()
            .request
            .unwrap()
            .http
            .unwrap();
        assert_eq!(
            (http.raw_body, http.body.as_str(), http.size),
            (vec![0xff, 0x00], "", 2)
        );
        // No body settings: nothing sent, no flag.
        p.body = None;
        let req = check_request(&p, &settings, &input).unwrap();
        assert!(req.headers().get(PARTIAL_BODY_HEADER).is_none());
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn the_check_carries_the_selected_headers_and_the_workload_not_the_clients_claims() {
        let settings = HttpSettings {
            path_prefix: "/check".into(),
            include_request_headers: vec!["x-ext-authz".into(), "x-team-*".into()],
            additional_headers: vec![("x-gateway".into(), "llm-egress".into())],
            ..Default::default()
        };
        let p = provider(settings.clone());
        let client = headers(&[
            ("x-ext-authz", "allow"),
            ("x-team-a", "1"),
            ("authorization", "Bearer jwt"),
            (
                "x-forwarded-client-cert",
                "URI=spiffe://cluster.local/ns/admin/sa/root",
            ),
            ("content-length", "10"),
            ("cookie", "c"),
        ]);
        let input = CheckInput {
            method: &Method::POST,
            host: "dashscope.aliyuncs.com",
            path_and_query: "/v1/chat/completions?x=1",
            headers: &client,
            principal: Some("cluster.local/ns/default/sa/sleep"),
            body: None,
        };
        let req = check_request(&p, &settings, &input).unwrap();
        assert_eq!(req.method(), Method::POST);
        assert_eq!(
            req.uri(),
            "http://authz.example:8000/check/v1/chat/completions?x=1"
        );
        let h = req.headers();
        assert_eq!(h["host"], "dashscope.aliyuncs.com");
        assert_eq!(h["x-ext-authz"], "allow");
        assert_eq!(h["x-team-a"], "1");
        assert_eq!(h["x-gateway"], "llm-egress");
        // Not selected by includeRequestHeadersInCheck.
        assert!(h.get("authorization").is_none() && h.get("cookie").is_none());
        assert!(h.get("content-length").is_none());
        // The gateway's own view of the peer, never the client's header.
        assert_eq!(h.get_all("x-forwarded-client-cert").iter().count(), 1);
        assert_eq!(
            h["x-forwarded-client-cert"],
            "URI=spiffe://cluster.local/ns/default/sa/sleep"
        );
    }

    #[test]
    fn by_default_the_check_carries_authorization() {
        let settings = HttpSettings::default();
        let p = provider(settings.clone());
        let client = headers(&[("authorization", "Bearer jwt"), ("x-other", "1")]);
        let input = CheckInput {
            method: &Method::GET,
            host: "h",
            path_and_query: "/v1/models",
            headers: &client,
            principal: None,
            body: None,
        };
        let req = check_request(&p, &settings, &input).unwrap();
        assert_eq!(req.headers()["authorization"], "Bearer jwt");
        assert!(req.headers().get("x-other").is_none());
        assert!(req.headers().get("x-forwarded-client-cert").is_none());
    }

    #[test]
    fn answer_headers_are_selected_and_connection_headers_never_pass() {
        let answer = headers(&[
            ("x-ext-authz-check-result", "denied"),
            ("x-other", "1"),
            ("content-length", "3"),
            ("connection", "close"),
        ]);
        let names =
            |v: Vec<(HeaderName, HeaderValue)>| v.into_iter().map(|(n, _)| n.to_string()).collect::<Vec<_>>();
        assert_eq!(
            names(select(&answer, &["x-ext-authz-*".into()], false)),
            ["x-ext-authz-check-result"]
        );
        assert_eq!(
            names(select(&answer, &[], true)),
            ["x-ext-authz-check-result", "x-other"]
        );
        assert!(select(&answer, &[], false).is_empty());
    }

    #[tokio::test]
    async fn unreachable_authorizer_fails_closed_with_status_on_error_or_open_when_asked() {
        let mut p = provider(HttpSettings::default());
        // A loopback port nothing listens on any more.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        p.service = "127.0.0.1".into();
        p.port = closed;
        p.timeout = Duration::from_millis(200);
        let ext = ExtAuthz::new(vec![p.clone()], Resolver::new(HashMap::new()));
        let h = HeaderMap::new();
        let input = CheckInput {
            method: &Method::GET,
            host: "h",
            path_and_query: "/",
            headers: &h,
            principal: None,
            body: None,
        };
        let (verdict, outcome) = ext.check("ext", &input).await;
        assert_eq!(outcome, Outcome::ErrorDenied);
        assert!(matches!(verdict, Verdict::Deny { status, .. } if status == StatusCode::SERVICE_UNAVAILABLE));
        p.fail_open = true;
        let ext = ExtAuthz::new(vec![p], Resolver::new(HashMap::new()));
        assert_eq!(ext.check("ext", &input).await.1, Outcome::ErrorAllowed);
        assert_eq!(ext.check("missing", &input).await.1, Outcome::UnknownProvider);
    }
}

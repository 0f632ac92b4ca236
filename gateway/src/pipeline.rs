//! The L7 request path, in order: JWT (RequestAuthentication) →
//! AuthorizationPolicy (CUSTOM, DENY, ALLOW) → LLMRoute → token budgets →
//! LLMProvider adaptation → upstream (failover) → response streamed back
//! with token accounting, the budgets' true-up and one access-log line.

use std::{convert::Infallible, sync::Arc, time::Instant};

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};

use crate::{
    config::{ConfigSource, Provider},
    limits::{self, BodyError, ClientDeadlines},
    llm::endpoint::{self, BodyKind, EndpointError},
    llm::provider::{self, BodyHeaders},
    llm::usage::{Extractor, Outcome, TappedBody},
    metrics::{
        BackendLabels, EjectionLabels, ExtAuthzLabels, GenAiLabels, Metrics, RequestLabels,
        TokenDetailLabels, TokenUsageLabels, UpstreamErrorLabels,
    },
    policy::authz::{self, Attributes, Decision},
    policy::budget::{self, Admission, Budgets, Caller, Cost, Reservation},
    policy::ext_authz::{CheckInput, ExtAuthz, Verdict},
    policy::jwks::JwksCache,
    policy::jwt,
    route,
    upstream::outlier::{self, Outliers},
    upstream::{self, Upstream, UpstreamError},
};

pub type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// Shared by every entry and request.
pub struct Gateway {
    pub config: Arc<ConfigSource>,
    /// The mesh config's external authorizers (CUSTOM policies).
    pub ext_authz: arc_swap::ArcSwap<ExtAuthz>,
    /// Issuers' keys for RequestAuthentication.
    pub jwks: Arc<JwksCache>,
    /// Providers failing in a row are skipped for a while.
    pub outliers: Outliers,
    /// Providers tried per request (failover), at least 1.
    pub max_attempts: usize,
    pub upstream: Upstream,
    /// Token budgets' counters (in process, or Redis across replicas).
    pub budgets: Arc<Budgets>,
    pub metrics: Arc<Metrics>,
    pub max_body: usize,
    /// Largest upload (multipart) streamed to a provider.
    pub max_upload: usize,
    pub deadlines: ClientDeadlines,
}

/// Who sent a request and how it arrived.
#[derive(Debug, Clone, Default)]
pub struct Source {
    pub principal: Option<String>,
    pub namespace: Option<String>,
    /// The original destination port (tunnel entry) or the listener's port.
    pub dest_port: Option<u16>,
    pub entry: &'static str,
}

fn local(status: StatusCode, text: &str) -> Response<Body> {
    let body = Full::new(Bytes::from(text.to_string()))
        .map_err(|e: Infallible| match e {})
        .boxed_unsync();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(body)
        .unwrap_or_else(|_| {
            Response::new(
                Full::new(Bytes::new())
                    .map_err(|e: Infallible| match e {})
                    .boxed_unsync(),
            )
        })
}

/// An error answer in OpenAI's shape, which SDKs parse and show.
/// An authorizer's denial, passed through: its status, headers and body.
fn authorizer_denial(
    status: StatusCode,
    headers: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>,
    body: Bytes,
) -> Response<Body> {
    let mut resp = Response::new(Full::new(body).map_err(|e: Infallible| match e {}).boxed_unsync());
    *resp.status_mut() = status;
    for (name, value) in headers {
        resp.headers_mut().append(name, value);
    }
    resp
}

fn openai_error(status: StatusCode, message: &str, kind: &str) -> Response<Body> {
    openai_error_coded(status, message, kind, status.as_u16().into())
}

fn openai_error_coded(
    status: StatusCode,
    message: &str,
    kind: &str,
    code: serde_json::Value,
) -> Response<Body> {
    let text = serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
        .to_string();
    let body = Full::new(Bytes::from(text))
        .map_err(|e: Infallible| match e {})
        .boxed_unsync();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .unwrap_or_else(|_| local(status, message))
}

/// A token budget's refusal, as OpenAI answers a rate limit: SDKs honour
/// `Retry-After` when they retry.
fn budget_refusal(message: &str, retry_after: Option<std::time::Duration>) -> Response<Body> {
    let mut resp = openai_error_coded(
        StatusCode::TOO_MANY_REQUESTS,
        message,
        "tokens",
        "rate_limit_exceeded".into(),
    );
    if let Some(wait) = retry_after {
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        resp.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(seconds.max(1)));
    }
    resp
}

/// Tokens a request spent: the usage the provider reported; nothing when it
/// served nothing; all that was reserved when a served answer reported no
/// usage or ran past its limit; and when the client left a stream before
/// the usage arrived, the prompt's bound and a bound of the output it was
/// sent (its bytes; a token is at least one). A non-streamed answer the
/// client left is charged in full: the provider finished it.
fn spent(outcome: &Outcome, served: bool, streamed: bool, r: &Reservation) -> u64 {
    match outcome.usage {
        Some(u) => u.prompt_tokens.saturating_add(u.completion_tokens),
        None if !served => 0,
        None if outcome.finished || outcome.overran || !streamed => r.reserved(),
        None => r
            .prompt()
            .saturating_add(outcome.completion_bytes)
            .min(r.reserved()),
    }
}

/// One access-log record; written once per request.
struct Access<'a> {
    source: &'a Source,
    method: &'a Method,
    host: &'a str,
    path: &'a str,
    provider: &'a str,
    model: &'a str,
    /// `gen_ai.operation.name`, once the endpoint is known.
    operation: &'a str,
}

impl Gateway {
    /// The answer to a request body that could not be read, and why.
    fn body_failure(&self, e: &BodyError) -> (StatusCode, &'static str) {
        match e {
            BodyError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "body too large"),
            BodyError::Stalled(_) | BodyError::TooSlow(_) => {
                self.metrics.client_timeout("body");
                (StatusCode::REQUEST_TIMEOUT, "body stalled")
            }
            BodyError::Read => (StatusCode::BAD_REQUEST, "body read"),
        }
    }

    fn note_failure(&self, provider: &Provider, retry_after: Option<std::time::Duration>) {
        if self.outliers.failure(&provider.name, retry_after) {
            tracing::warn!(
                provider = provider.name,
                ?retry_after,
                "provider ejected (failing); others serve meanwhile"
            );
            self.metrics
                .backend_ejections
                .get_or_create(&EjectionLabels {
                    provider: provider.name.clone(),
                })
                .inc();
        }
    }

    fn record(
        &self,
        a: &Access,
        code: StatusCode,
        started: Instant,
        outcome: Option<&Outcome>,
        reason: &str,
    ) {
        let principal = a.source.principal.as_deref().unwrap_or("-");
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                principal: principal.to_string(),
                host: a.host.to_string(),
                provider: a.provider.to_string(),
                model: a.model.to_string(),
                code: code.as_u16(),
            })
            .inc();
        let elapsed = started.elapsed();
        let usage = outcome.and_then(|o| o.usage);
        let response_model = outcome.and_then(|o| o.response_model.as_deref()).unwrap_or("-");
        let ttft = outcome
            .and_then(|o| o.first_chunk_at)
            .map(|t| t.saturating_duration_since(started));
        let labels = GenAiLabels {
            gen_ai_operation_name: a.operation.to_string(),
            gen_ai_provider_name: a.provider.to_string(),
            gen_ai_request_model: a.model.to_string(),
            gen_ai_response_model: response_model.to_string(),
            error_type: if code.is_success() {
                String::new()
            } else {
                code.as_u16().to_string()
            },
            principal: principal.to_string(),
        };
        self.metrics
            .request_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        if let Some(t) = ttft {
            self.metrics
                .time_to_first_token
                .get_or_create(&labels)
                .observe(t.as_secs_f64());
            // After the first token, the rest of the stream per token.
            if let Some(u) = usage.filter(|u| u.completion_tokens > 1) {
                let rest = elapsed.saturating_sub(t).as_secs_f64() / (u.completion_tokens - 1) as f64;
                self.metrics
                    .time_per_output_token
                    .get_or_create(&labels)
                    .observe(rest);
            }
        }
        if let Some(u) = usage {
            for (kind, n) in [("input", u.prompt_tokens), ("output", u.completion_tokens)] {
                self.metrics
                    .token_usage
                    .get_or_create(&TokenUsageLabels {
                        gen_ai_operation_name: labels.gen_ai_operation_name.clone(),
                        gen_ai_provider_name: labels.gen_ai_provider_name.clone(),
                        gen_ai_request_model: labels.gen_ai_request_model.clone(),
                        gen_ai_response_model: labels.gen_ai_response_model.clone(),
                        gen_ai_token_type: kind,
                        principal: principal.to_string(),
                    })
                    .observe(n as f64);
            }
        }
        if let Some(d) = outcome.and_then(|o| o.details) {
            for (kind, n) in [
                ("cached_input", d.cached_input),
                ("reasoning_output", d.reasoning_output),
            ] {
                if n > 0 {
                    self.metrics
                        .token_details
                        .get_or_create(&TokenDetailLabels {
                            principal: principal.to_string(),
                            gen_ai_request_model: a.model.to_string(),
                            kind,
                        })
                        .inc_by(n);
                }
            }
        }
        tracing::info!(
            target: "access",
            entry = a.source.entry,
            principal,
            method = %a.method,
            host = a.host,
            path = a.path,
            operation = a.operation,
            provider = a.provider,
            model = a.model,
            response_model,
            status = code.as_u16(),
            prompt_tokens = usage.map(|u| u.prompt_tokens),
            completion_tokens = usage.map(|u| u.completion_tokens),
            ttft_ms = ttft.map(|t| t.as_millis() as u64),
            duration_ms = elapsed.as_millis() as u64,
            reason,
            "request"
        );
    }

    pub async fn handle(
        self: Arc<Self>,
        source: Arc<Source>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        let cfg = self.config.current();
        let (mut parts, body) = req.into_parts();
        let mut body = limits::Prefixed::new(body);
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| parts.uri.authority().map(|a| a.to_string()))
            .unwrap_or_default();
        let path = parts.uri.path().to_string();
        let mut access = Access {
            source: &source,
            method: &parts.method,
            host: &host,
            path: &path,
            provider: "-",
            model: "-",
            operation: "-",
        };
        let fail = |this: &Gateway, access: &Access, code: StatusCode, text: &str, reason: &str| {
            this.record(access, code, started, None, reason);
            Ok(local(code, text))
        };
        if host.is_empty() {
            return fail(
                &self,
                &access,
                StatusCode::BAD_REQUEST,
                "missing Host header\n",
                "no host",
            );
        }

        let jwt = match jwt::authenticate(
            &cfg.authentications,
            &parts.headers,
            parts.uri.query(),
            &self.jwks,
        ) {
            Ok(j) => j,
            Err(e) => {
                return fail(
                    &self,
                    &access,
                    StatusCode::UNAUTHORIZED,
                    "Jwt verification fails",
                    &e,
                )
            }
        };
        // What a verified token says goes on under the output headers, and
        // a client's own values under those names never pass: policies and
        // authorizers judge what was verified (Istio's jwt_authn runs first).
        for name in jwt::output_headers(&cfg.authentications) {
            parts.headers.remove(&name);
        }
        let mut query = parts.uri.query().map(str::to_string);
        if let Some(j) = &jwt {
            if let Some(h) = &j.remove_header {
                parts.headers.remove(h);
            }
            for (name, value) in &j.add_headers {
                parts.headers.insert(name.clone(), value.clone());
            }
            if let Some(p) = &j.remove_param {
                query = jwt::without_param(query.as_deref(), p);
            }
        }
        let path_and_query = match &query {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        };
        let attrs = Attributes {
            principal: source.principal.as_deref(),
            namespace: source.namespace.as_deref(),
            request_principal: jwt.as_ref().map(|j| j.principal.as_str()),
            claims: jwt.as_ref().map(|j| &j.claims),
            host: &host,
            port: source.dest_port,
            method: Some(parts.method.as_str()),
            path: Some(&path),
            headers: Some(&parts.headers),
        };
        // CUSTOM, then DENY, then ALLOW (Istio's order).
        let mut from_authorizers = Vec::new();
        let mut to_client = Vec::new();
        let providers = authz::custom_providers(&cfg.policies, &attrs);
        if !providers.is_empty() {
            let ext_authz = self.ext_authz.load();
            // includeRequestBodyInCheck: the body's start is read ahead
            // (and sent on unchanged).
            let mut complete = None;
            if let Some(max) = ext_authz.body_wanted(&providers) {
                match body.buffer(max, self.deadlines.body_idle).await {
                    Ok(c) => complete = Some(c),
                    Err(e) => {
                        let (code, reason) = self.body_failure(&e);
                        return fail(&self, &access, code, &format!("{e}\n"), reason);
                    }
                }
            }
            let input = CheckInput {
                method: &parts.method,
                host: &host,
                path_and_query: &path_and_query,
                headers: &parts.headers,
                principal: source.principal.as_deref(),
                body: complete.map(|c| (body.buffered(), c)),
            };
            for name in providers {
                let (verdict, outcome) = ext_authz.check(name, &input).await;
                self.metrics
                    .ext_authz_checks
                    .get_or_create(&ExtAuthzLabels {
                        provider: name.to_string(),
                        result: outcome.label(),
                    })
                    .inc();
                match verdict {
                    Verdict::Allow {
                        to_upstream,
                        to_downstream,
                    } => {
                        from_authorizers.extend(to_upstream);
                        to_client.extend(to_downstream);
                    }
                    Verdict::Deny {
                        status,
                        headers,
                        body,
                    } => {
                        let reason = format!("CUSTOM provider {name}: {}", outcome.label());
                        self.record(&access, status, started, None, &reason);
                        return Ok(authorizer_denial(status, headers, body));
                    }
                }
            }
        }
        if let Decision::Deny(why) = authz::evaluate(&cfg.policies, &attrs) {
            return fail(&self, &access, StatusCode::FORBIDDEN, "RBAC: access denied", &why);
        }

        let candidates = match route::candidates(
            &cfg,
            &host,
            &parts.headers,
            |total| rand::random_range(0..total),
            |name| self.outliers.is_ejected(name),
        ) {
            Ok(c) if !c.is_empty() => c,
            Ok(_) => return fail(&self, &access, StatusCode::NOT_FOUND, "no backend\n", "no route"),
            Err(e) => {
                return fail(
                    &self,
                    &access,
                    StatusCode::NOT_FOUND,
                    &format!("{e}\n"),
                    "no route",
                )
            }
        };
        let primary = candidates[0];
        access.provider = &primary.name;
        let endpoint = match endpoint::resolve(&parts.method, &path, query.as_deref(), &primary.path) {
            Ok(e) => e,
            Err(e) => {
                let (code, reason) = match e {
                    EndpointError::Unknown { .. } => (StatusCode::NOT_FOUND, "unknown endpoint"),
                    EndpointError::Method { .. } => (StatusCode::METHOD_NOT_ALLOWED, "method"),
                };
                self.record(&access, code, started, None, reason);
                return Ok(openai_error(code, &e.to_string(), "invalid_request_error"));
            }
        };
        access.operation = endpoint.operation.name();
        // JSON bodies are read (bounded, with deadlines) once, and adapted
        // for each provider tried; uploads stream through (bounded by
        // --max-upload-body) to one provider only, as they cannot be replayed.
        let mut upload = None;
        let raw = match endpoint.body {
            BodyKind::None => None,
            BodyKind::Opaque => {
                upload = Some(http_body_util::Limited::new(body, self.max_upload).boxed());
                None
            }
            BodyKind::Json => match limits::read_body(body, self.max_body, self.deadlines.body_idle).await {
                Ok(b) => Some(b),
                Err(e) => {
                    let (code, reason) = self.body_failure(&e);
                    return fail(&self, &access, code, &format!("{e}\n"), reason);
                }
            },
        };
        // Token budgets: the most this request can cost is reserved before
        // any provider sees it.
        let mut reservation = None;
        let mut completion_guard = None;
        let mut inject_limit = None;
        if let (false, Some(raw)) = (cfg.budgets.is_empty(), &raw) {
            let mut cost = match Cost::of(raw, endpoint.operation) {
                Ok(cost) => cost,
                Err(e) => {
                    return fail(
                        &self,
                        &access,
                        StatusCode::BAD_REQUEST,
                        &format!("{e}\n"),
                        "bad body",
                    )
                }
            };
            if cost.model.is_none() && endpoint.operation == endpoint::Operation::Chat {
                cost.model = primary.model.clone();
            }
            let caller = Caller {
                principal: source.principal.as_deref(),
                namespace: source.namespace.as_deref(),
                request_principal: jwt.as_ref().map(|j| j.principal.as_str()),
            };
            match self.budgets.admit(&cfg.budgets, &caller, &cost).await {
                Admission::Free => {}
                Admission::Reserved {
                    reservation: r,
                    completion_limit,
                    inject_limit: inject,
                } => {
                    reservation = Some(r);
                    completion_guard = cost.generates.then_some(completion_limit);
                    inject_limit = inject.and_then(|n| Some((budget::limit_field(endpoint.operation)?, n)));
                }
                Admission::Refused { message, retry_after } => {
                    self.record(
                        &access,
                        StatusCode::TOO_MANY_REQUESTS,
                        started,
                        None,
                        "token budget",
                    );
                    return Ok(budget_refusal(&message, retry_after));
                }
                Admission::Unavailable { message } => {
                    let code = StatusCode::SERVICE_UNAVAILABLE;
                    self.record(&access, code, started, None, "budget store unavailable");
                    let mut resp =
                        openai_error_coded(code, &message, "server_error", "budget_store_unavailable".into());
                    resp.headers_mut()
                        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
                    return Ok(resp);
                }
            }
        }
        // Headers an authorizer adds go up like the client's own: the
        // provider's key still replaces any credential among them.
        for (name, value) in from_authorizers {
            parts.headers.insert(name, value);
        }
        let attempts = if upload.is_some() {
            1
        } else {
            candidates.len().min(self.max_attempts)
        };
        let mut served = None;
        for (i, provider) in candidates.iter().copied().take(attempts).enumerate() {
            let last = i + 1 == attempts;
            access.provider = &provider.name;
            let endpoint = match endpoint::resolve(&parts.method, &path, query.as_deref(), &provider.path) {
                Ok(e) => e,
                Err(_) if !last => continue,
                Err(e) => {
                    return fail(
                        &self,
                        &access,
                        StatusCode::NOT_FOUND,
                        &format!("{e}\n"),
                        "unknown endpoint",
                    )
                }
            };
            let (body, model, hide_usage_chunk, body_headers) = match (&raw, upload.take()) {
                (_, Some(stream)) => (stream, None, false, BodyHeaders::Passthrough),
                (None, None) => (upstream::full(Bytes::new()), None, false, BodyHeaders::None),
                (Some(raw), None) => match provider::adapt_body(raw, provider, &endpoint, inject_limit) {
                    Ok(a) => {
                        let len = a.body.len();
                        (
                            upstream::full(a.body),
                            a.model,
                            a.hide_usage_chunk,
                            BodyHeaders::Json(len),
                        )
                    }
                    Err(e) => {
                        return fail(
                            &self,
                            &access,
                            StatusCode::BAD_REQUEST,
                            &format!("{e}\n"),
                            "bad body",
                        )
                    }
                },
            };
            let uri = match provider::upstream_uri(provider, &endpoint.upstream_path) {
                Ok(u) => u,
                Err(_) => {
                    return fail(
                        &self,
                        &access,
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "provider address is not valid\n",
                        "provider uri",
                    )
                }
            };
            let headers = match provider::adapt_headers(&parts.headers, provider, body_headers) {
                Ok(h) => h,
                // Never echo the header: it would carry the key.
                Err(_) => {
                    return fail(
                        &self,
                        &access,
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the provider's API key cannot be sent as a header\n",
                        "key header",
                    )
                }
            };
            let mut up = Request::new(body);
            *up.method_mut() = parts.method.clone();
            *up.uri_mut() = uri;
            *up.headers_mut() = headers;
            let attempt = |result: &'static str| {
                self.metrics
                    .backend_attempts
                    .get_or_create(&BackendLabels {
                        provider: provider.name.clone(),
                        result,
                    })
                    .inc();
            };
            // Once a provider may have the request, it may bill it: a
            // reservation dropped from here on (the client leaving, a
            // timeout) is charged in full.
            if let Some(r) = reservation.as_mut() {
                r.mark_sent(true);
            }
            match self.upstream.send(up).await {
                Ok(r) => {
                    let limited = r.status() == StatusCode::TOO_MANY_REQUESTS;
                    if r.status().is_server_error() || limited {
                        // A refusal is not billed.
                        if let Some(r) = reservation.as_mut() {
                            r.mark_sent(false);
                        }
                        let wait = outlier::retry_after(r.headers()).filter(|_| limited);
                        self.note_failure(provider, wait);
                        // Failover only before any byte of an answer reached
                        // the client: this head is dropped unread.
                        if !last {
                            attempt(if limited { "rate_limited" } else { "server_error" });
                            continue;
                        }
                        attempt("failed_last");
                    } else {
                        attempt("served");
                        self.outliers.success(&provider.name);
                    }
                    served = Some((provider, endpoint, model, hide_usage_chunk, r));
                    break;
                }
                Err(e) => {
                    if let (Some(r), UpstreamError::Connect(_)) = (reservation.as_mut(), &e) {
                        r.mark_sent(false);
                    }
                    attempt(e.reason());
                    self.note_failure(provider, None);
                    self.metrics
                        .upstream_errors
                        .get_or_create(&UpstreamErrorLabels {
                            provider: provider.name.clone(),
                            reason: e.reason(),
                        })
                        .inc();
                    if last {
                        let code = e.status();
                        return fail(
                            &self,
                            &access,
                            code,
                            &format!("upstream {}: {e}\n", provider.host),
                            e.reason(),
                        );
                    }
                }
            }
        }
        let Some((provider, endpoint, model, hide_usage_chunk, resp)) = served else {
            return fail(
                &self,
                &access,
                StatusCode::BAD_GATEWAY,
                "no provider answered\n",
                "no backend",
            );
        };
        let model = model.unwrap_or_else(|| "-".into());
        let (mut rparts, rbody) = resp.into_parts();
        for h in [
            "connection",
            "keep-alive",
            "transfer-encoding",
            "upgrade",
            "proxy-connection",
        ] {
            rparts.headers.remove(h);
        }
        for (name, value) in to_client {
            rparts.headers.append(name, value);
        }
        let extractor = Extractor::for_content_type(
            rparts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|c| c.to_str().ok()),
        );
        let code = rparts.status;
        let stream = extractor.is_stream();
        let (this, src) = (self.clone(), source.clone());
        let (method, host, path, pname, model) = (
            parts.method.clone(),
            host.clone(),
            path.clone(),
            provider.name.clone(),
            model.clone(),
        );
        let operation = endpoint.operation.name();
        let tapped = TappedBody::new(rbody, extractor, move |outcome| {
            let a = Access {
                source: &src,
                method: &method,
                host: &host,
                path: &path,
                provider: &pname,
                model: &model,
                operation,
            };
            if let Some(r) = reservation {
                let tokens = spent(&outcome, code.is_success(), stream, &r);
                r.settle(tokens);
            }
            this.record(
                &a,
                code,
                started,
                Some(&outcome),
                if outcome.overran {
                    "ran past its token budget"
                } else if outcome.finished {
                    ""
                } else {
                    "client went away"
                },
            );
        });
        // The usage chunk the gateway asked for is the client's only if it
        // asked too; an error answer passes as it is.
        let mut tapped = tapped;
        if code.is_success() {
            if hide_usage_chunk {
                rparts.headers.remove(header::CONTENT_LENGTH);
                tapped = tapped.hiding_usage_chunk();
            }
            // A provider that ignores the limit it was sent is cut off at
            // an event boundary, with an error event.
            if let (Some(limit), true) = (completion_guard, stream) {
                rparts.headers.remove(header::CONTENT_LENGTH);
                tapped = tapped.limiting_completion(limit);
            }
        }
        Ok(Response::from_parts(rparts, tapped.boxed_unsync()))
    }
}

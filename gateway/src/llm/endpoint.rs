//! Which OpenAI endpoint a request is for, and where it goes at the
//! provider. A provider's `path` names its chat-completions endpoint (as in
//! ASM, e.g. `/compatible-mode/v1/chat/completions`); the part before
//! `/chat/completions` is its API base, and every endpoint goes to its own
//! path under that base. Clients may call the provider's own paths (an SDK
//! with `base_url` set to `http://<host>/compatible-mode/v1`), OpenAI's
//! `/v1/...`, or `/` (the seed's curl), which is chat completions.

use hyper::Method;

/// What a request does, in OpenTelemetry GenAI terms where they exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Chat,
    TextCompletion,
    Embeddings,
    Responses,
    Models,
    Moderations,
    Images,
    Audio,
    Files,
}

impl Operation {
    /// `gen_ai.operation.name`.
    pub fn name(self) -> &'static str {
        match self {
            Operation::Chat => "chat",
            Operation::TextCompletion => "text_completion",
            Operation::Embeddings => "embeddings",
            Operation::Responses => "generate_content",
            Operation::Models => "models",
            Operation::Moderations => "moderations",
            Operation::Images => "images",
            Operation::Audio => "audio",
            Operation::Files => "files",
        }
    }
}

/// How the body of a request is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// No body (GET, DELETE).
    None,
    /// A JSON object, read (bounded) and adapted.
    Json,
    /// Multipart (audio, files): streamed through as the client sends it,
    /// never buffered whole.
    Opaque,
}

/// A request resolved against a provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub operation: Operation,
    pub body: BodyKind,
    /// Path and query at the provider.
    pub upstream_path: String,
    /// Streamed answers report token usage (chat and text completions).
    pub streams_usage: bool,
}

/// The endpoints served, relative to the API base: (method, path, op, body).
/// `{id}` is one path segment.
const ENDPOINTS: &[(&str, &str, Operation, BodyKind)] = &[
    ("POST", "/chat/completions", Operation::Chat, BodyKind::Json),
    ("POST", "/completions", Operation::TextCompletion, BodyKind::Json),
    ("POST", "/embeddings", Operation::Embeddings, BodyKind::Json),
    ("POST", "/responses", Operation::Responses, BodyKind::Json),
    ("GET", "/responses/{id}", Operation::Responses, BodyKind::None),
    ("DELETE", "/responses/{id}", Operation::Responses, BodyKind::None),
    ("GET", "/models", Operation::Models, BodyKind::None),
    ("GET", "/models/{id}", Operation::Models, BodyKind::None),
    ("POST", "/moderations", Operation::Moderations, BodyKind::Json),
    ("POST", "/images/generations", Operation::Images, BodyKind::Json),
    ("POST", "/audio/speech", Operation::Audio, BodyKind::Json),
    (
        "POST",
        "/audio/transcriptions",
        Operation::Audio,
        BodyKind::Opaque,
    ),
    ("POST", "/audio/translations", Operation::Audio, BodyKind::Opaque),
    ("POST", "/files", Operation::Files, BodyKind::Opaque),
    ("GET", "/files", Operation::Files, BodyKind::None),
    ("GET", "/files/{id}", Operation::Files, BodyKind::None),
    ("GET", "/files/{id}/content", Operation::Files, BodyKind::None),
    ("DELETE", "/files/{id}", Operation::Files, BodyKind::None),
];

/// For error messages: what this gateway serves.
pub fn supported() -> String {
    let mut out: Vec<String> = ENDPOINTS.iter().map(|(m, p, _, _)| format!("{m} {p}")).collect();
    out.insert(0, "POST / (chat completions)".into());
    out.join(", ")
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointError {
    #[error("{method} {path} is not an endpoint this gateway serves; paths are relative to the provider's API base {base} (or /v1): {supported}")]
    Unknown {
        method: String,
        path: String,
        base: String,
        supported: String,
    },
    #[error("{method} is not allowed on {path}: use {allowed}")]
    Method {
        method: String,
        path: String,
        allowed: String,
    },
}

fn segment_ok(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
}

fn matches_template(template: &str, path: &str) -> bool {
    let (mut t, mut p) = (template.split('/'), path.split('/'));
    loop {
        match (t.next(), p.next()) {
            (None, None) => return true,
            (Some("{id}"), Some(seg)) if segment_ok(seg) => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// The provider's API base: its chat path without `/chat/completions`.
pub fn api_base(provider_path: &str) -> Option<&str> {
    provider_path.strip_suffix("/chat/completions")
}

/// Resolves a client's request against the provider whose chat endpoint is
/// `provider_path`.
pub fn resolve(
    method: &Method,
    path: &str,
    query: Option<&str>,
    provider_path: &str,
) -> Result<Endpoint, EndpointError> {
    let with_query = |p: String| match query {
        Some(q) => format!("{p}?{q}"),
        None => p,
    };
    let base = api_base(provider_path);
    let unknown = || EndpointError::Unknown {
        method: method.to_string(),
        path: path.to_string(),
        base: base.unwrap_or(provider_path).to_string(),
        supported: supported(),
    };
    if path == "/" || path == provider_path {
        if *method != Method::POST {
            return Err(EndpointError::Method {
                method: method.to_string(),
                path: path.to_string(),
                allowed: "POST".into(),
            });
        }
        return Ok(Endpoint {
            operation: Operation::Chat,
            body: BodyKind::Json,
            upstream_path: with_query(provider_path.to_string()),
            streams_usage: true,
        });
    }
    // A provider whose path is not a chat-completions endpoint serves only `/`.
    let base = base.ok_or_else(unknown)?;
    let relative = path
        .strip_prefix(base)
        .filter(|r| r.starts_with('/'))
        .or_else(|| path.strip_prefix("/v1").filter(|r| r.starts_with('/')))
        .ok_or_else(unknown)?;
    let mut allowed = Vec::new();
    for (m, template, op, body) in ENDPOINTS {
        if matches_template(template, relative) {
            if method.as_str() != *m {
                allowed.push(*m);
                continue;
            }
            return Ok(Endpoint {
                operation: *op,
                body: *body,
                upstream_path: with_query(format!("{base}{relative}")),
                streams_usage: matches!(op, Operation::Chat | Operation::TextCompletion),
            });
        }
    }
    if !allowed.is_empty() {
        return Err(EndpointError::Method {
            method: method.to_string(),
            path: path.to_string(),
            allowed: allowed.join(" or "),
        });
    }
    Err(unknown())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DASHSCOPE: &str = "/compatible-mode/v1/chat/completions";

    fn up(method: Method, path: &str, query: Option<&str>) -> Result<(Operation, String), EndpointError> {
        resolve(&method, path, query, DASHSCOPE).map(|e| (e.operation, e.upstream_path))
    }

    #[test]
    fn every_endpoint_goes_to_its_own_path_under_the_provider_base() {
        for (client, want) in [
            (
                "/compatible-mode/v1/chat/completions",
                "/compatible-mode/v1/chat/completions",
            ),
            ("/v1/chat/completions", "/compatible-mode/v1/chat/completions"),
            ("/compatible-mode/v1/embeddings", "/compatible-mode/v1/embeddings"),
            ("/v1/embeddings", "/compatible-mode/v1/embeddings"),
            (
                "/compatible-mode/v1/completions",
                "/compatible-mode/v1/completions",
            ),
            ("/compatible-mode/v1/responses", "/compatible-mode/v1/responses"),
        ] {
            assert_eq!(up(Method::POST, client, None).unwrap().1, want, "{client}");
        }
        assert_eq!(
            up(Method::GET, "/compatible-mode/v1/models", None).unwrap(),
            (Operation::Models, "/compatible-mode/v1/models".into())
        );
        assert_eq!(
            up(Method::GET, "/v1/models/qwen-max", Some("a=1&b=2")).unwrap().1,
            "/compatible-mode/v1/models/qwen-max?a=1&b=2"
        );
        assert!(up(Method::POST, "/embeddings", None).is_err(), "no base, no /v1");
    }

    #[test]
    fn the_seed_root_is_chat_and_keeps_its_query() {
        let e = resolve(&Method::POST, "/", Some("x=1"), DASHSCOPE).unwrap();
        assert_eq!(e.operation, Operation::Chat);
        assert_eq!(e.upstream_path, "/compatible-mode/v1/chat/completions?x=1");
        assert!(e.streams_usage);
    }

    #[test]
    fn unknown_paths_and_methods_are_refused_clearly() {
        let err = up(Method::POST, "/compatible-mode/v1/fine_tuning/jobs", None).unwrap_err();
        assert!(err.to_string().contains("POST /embeddings"), "{err}");
        assert!(matches!(
            up(Method::GET, "/compatible-mode/v1/embeddings", None),
            Err(EndpointError::Method { .. })
        ));
        assert!(matches!(
            up(Method::GET, "/", None),
            Err(EndpointError::Method { .. })
        ));
        for bad in [
            "/compatible-mode/v1/models/../../admin",
            "/compatible-mode/v1/models/",
            "/elsewhere/v1/models",
        ] {
            assert!(up(Method::GET, bad, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_provider_path_that_is_not_a_chat_endpoint_serves_only_the_root() {
        let e = resolve(&Method::POST, "/", None, "/api/generate").unwrap();
        assert_eq!(e.upstream_path, "/api/generate");
        assert!(resolve(&Method::POST, "/v1/embeddings", None, "/api/generate").is_err());
    }
}

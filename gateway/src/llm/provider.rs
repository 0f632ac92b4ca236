//! Adapting a client's request to its provider: the endpoint's path under
//! the provider's base, its model and stream defaults where a chat body has
//! none, usage asked for in streams, the gateway's key in place of whatever
//! credentials the client sent.

use bytes::Bytes;
use hyper::{
    header::{self, HeaderMap, HeaderName, HeaderValue},
    Uri,
};

use crate::{
    config::Provider,
    llm::{
        endpoint::{Endpoint, Operation},
        json,
    },
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdaptError {
    #[error("the request body is not JSON ({0}); send an OpenAI-style JSON object")]
    NotJson(String),
    #[error("the request body must be a JSON object")]
    NotObject,
    #[error(
        "the request body gives `{0}` more than once, or spelled in another case; give it once, as `{0}`"
    )]
    Ambiguous(&'static str),
    #[error("`{0}` must be a positive whole number (or null) when a token budget applies to the request")]
    NotCount(&'static str),
}

/// Top-level fields the gateway reads, sets or prices. A body may give
/// each once, spelled exactly so: providers' parsers differ on repeated
/// keys (first or last wins) and some match keys loosely (Go's
/// `encoding/json` ignores case, camelCase aliases drop the underscore:
/// `json::top_level`), and either would let a provider read a model, a
/// stream flag or a limit other than the one the gateway read, priced or
/// set.
pub const GUARDED: [&str; 8] = [
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "best_of",
];

/// Why a body that the scan of `json::top_level` refused is not a JSON
/// object, in the words of a parse into `Value`.
pub fn not_an_object(body: &[u8]) -> AdaptError {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Err(e) => AdaptError::NotJson(e.to_string()),
        Ok(_) => AdaptError::NotObject,
    }
}

/// Headers never forwarded upstream: every credential a client may send
/// (replaced by the provider key), identity metadata, and hop-by-hop headers.
const DROPPED: [&str; 22] = [
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "x-forwarded-client-cert",
    // They choose which account the gateway's key acts in.
    "openai-organization",
    "openai-project",
    "x-dashscope-workspace",
    "anthropic-organization",
    "cookie",
    "forwarded",
    "x-forwarded-for",
    "host",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "content-length",
];

/// A JSON request as it goes to the provider.
#[derive(Debug, PartialEq)]
pub struct Adapted {
    pub body: Bytes,
    pub model: Option<String>,
    pub stream: bool,
    /// The gateway asked for the usage chunk the client did not: remove it
    /// from what the client receives.
    pub hide_usage_chunk: bool,
}

/// Adapts a JSON body for `endpoint`. Chat completions get the provider's
/// `model` and `stream` where the body has none (ASM's defaults). A
/// streamed chat or text completion always asks for usage
/// (`stream_options.include_usage`), so that tokens are counted; when the
/// client did not ask, `hide_usage_chunk` says so. Bodies that need no
/// change go upstream byte for byte.
///
/// `limit` (field, tokens) is set when the request has no completion limit
/// and a token budget reserved one: the provider then never generates more.
pub fn adapt_body(
    body: &Bytes,
    p: &Provider,
    endpoint: &Endpoint,
    limit: Option<(&str, u64)>,
) -> Result<Adapted, AdaptError> {
    match adapt_in_place(body, p, endpoint, limit) {
        Some(adapted) => adapted,
        None => adapt_value(body, p, endpoint, limit),
    }
}

/// `adapt_value` without building the body as a `Value`: only the fields
/// it reads are built, the fields to add go in after the opening brace,
/// and the client's bytes follow unchanged. A body that gives a `GUARDED`
/// field ambiguously is refused. `None` where this cannot give the same
/// answer as `adapt_value`, which then decides: a body that does not parse
/// (its error is reported from there), a field the adapter reads that
/// comes twice, a budget limit the body already has, or `stream_options`
/// that exist but lack `include_usage`. Fields are only ever added when
/// absent, so the result never holds a key twice.
fn adapt_in_place(
    body: &Bytes,
    p: &Provider,
    endpoint: &Endpoint,
    limit: Option<(&str, u64)>,
) -> Option<Result<Adapted, AdaptError>> {
    // The fields read here, and the budget's limit field (added if absent).
    let names = [
        Some("model"),
        Some("stream"),
        Some("stream_options"),
        limit.map(|(field, _)| field),
    ];
    let top = json::top_level(body, names, &GUARDED).ok()?;
    if let Some(g) = top.ambiguous {
        return Some(Err(AdaptError::Ambiguous(GUARDED[g])));
    }
    if top.repeated {
        return None;
    }
    let [model, stream, stream_options, limit_given] = &top.values;
    let mut added = Vec::new();
    if let Some((field, tokens)) = limit {
        if limit_given.is_some() {
            return None;
        }
        added.push((serde_json::to_string(field).ok()?, tokens.to_string()));
    }
    let chat = endpoint.operation == Operation::Chat;
    let model = match (model, &p.model) {
        (Some(m), _) => m.as_str().map(str::to_string),
        (None, Some(m)) if chat => {
            added.push(("\"model\"".into(), serde_json::to_string(m).ok()?));
            Some(m.clone())
        }
        (None, _) => None,
    };
    let stream = match (stream, p.stream) {
        (Some(s), _) => s.as_bool().unwrap_or(false),
        (None, Some(s)) if chat => {
            added.push(("\"stream\"".into(), s.to_string()));
            s
        }
        (None, _) => false,
    };
    let mut hide_usage_chunk = false;
    if endpoint.streams_usage && stream {
        match stream_options {
            None => {
                added.push(("\"stream_options\"".into(), r#"{"include_usage":true}"#.into()));
                hide_usage_chunk = true;
            }
            Some(options) => {
                if options.get("include_usage").and_then(|u| u.as_bool()) != Some(true) {
                    return None;
                }
            }
        }
    }
    let body = if added.is_empty() {
        body.clone()
    } else {
        // The parse accepted an object: its first non-blank byte is `{`.
        let open = body.iter().position(|&b| b == b'{')? + 1;
        let mut out = Vec::with_capacity(body.len() + 64);
        out.extend_from_slice(&body[..open]);
        for (i, (key, value)) in added.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(key.as_bytes());
            out.push(b':');
            out.extend_from_slice(value.as_bytes());
        }
        if top.keys > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&body[open..]);
        Bytes::from(out)
    };
    Some(Ok(Adapted {
        body,
        model,
        stream,
        hide_usage_chunk,
    }))
}

/// The same adaptation over a parsed `Value`: every case.
fn adapt_value(
    body: &Bytes,
    p: &Provider,
    endpoint: &Endpoint,
    limit: Option<(&str, u64)>,
) -> Result<Adapted, AdaptError> {
    let mut v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| AdaptError::NotJson(e.to_string()))?;
    let obj = v.as_object_mut().ok_or(AdaptError::NotObject)?;
    let mut changed = false;
    if let Some((field, tokens)) = limit {
        obj.insert(field.into(), tokens.into());
        changed = true;
    }
    if endpoint.operation == Operation::Chat {
        if !obj.contains_key("model") {
            if let Some(m) = &p.model {
                obj.insert("model".into(), m.clone().into());
                changed = true;
            }
        }
        if !obj.contains_key("stream") {
            if let Some(s) = p.stream {
                obj.insert("stream".into(), s.into());
                changed = true;
            }
        }
    }
    let model = obj.get("model").and_then(|m| m.as_str()).map(str::to_string);
    let stream = obj.get("stream").and_then(|s| s.as_bool()).unwrap_or(false);
    let mut hide_usage_chunk = false;
    if endpoint.streams_usage && stream {
        let asked = obj
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(|u| u.as_bool())
            == Some(true);
        if !asked {
            let options = obj
                .entry("stream_options")
                .or_insert_with(|| serde_json::Value::Object(Default::default()));
            if !options.is_object() {
                *options = serde_json::Value::Object(Default::default());
            }
            if let Some(o) = options.as_object_mut() {
                o.insert("include_usage".into(), true.into());
            }
            hide_usage_chunk = true;
            changed = true;
        }
    }
    let body = if changed {
        Bytes::from(serde_json::to_vec(&v).map_err(|e| AdaptError::NotJson(e.to_string()))?)
    } else {
        body.clone()
    };
    Ok(Adapted {
        body,
        model,
        stream,
        hide_usage_chunk,
    })
}

/// The upstream URI: `https://<provider host><path and query>`.
pub fn upstream_uri(p: &Provider, path_and_query: &str) -> Result<Uri, hyper::http::Error> {
    Uri::builder()
        .scheme("https")
        .authority(p.host.as_str())
        .path_and_query(path_and_query)
        .build()
}

/// What a request's body is, for its headers upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyHeaders {
    /// Adapted JSON of this length.
    Json(usize),
    /// Streamed as the client sent it: its content type stays.
    Passthrough,
    None,
}

/// Upstream headers from the client's: drops credentials, tunnel and
/// hop-by-hop headers, then sets Host and the key, and the body's type.
pub fn adapt_headers(
    client: &HeaderMap,
    p: &Provider,
    body: BodyHeaders,
) -> Result<HeaderMap, header::InvalidHeaderValue> {
    // Headers the client nominates as hop-by-hop go too.
    let nominated: Vec<String> = client
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::new();
    for (name, value) in client {
        let n = name.as_str();
        if DROPPED.contains(&n) || n.starts_with("x-llm-egress-") || nominated.iter().any(|t| t == n) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out.insert(header::HOST, HeaderValue::from_str(&p.host)?);
    let mut auth = HeaderValue::from_str(&format!("Bearer {}", p.key.expose()))?;
    auth.set_sensitive(true);
    out.insert(header::AUTHORIZATION, auth);
    match body {
        BodyHeaders::Json(len) => {
            out.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            out.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        // The length comes from the body itself (hyper sets it, or chunks).
        BodyHeaders::Passthrough => {}
        BodyHeaders::None => {
            out.remove(header::CONTENT_TYPE);
        }
    }
    out.remove(HeaderName::from_static("accept-encoding"));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::Secret;

    fn provider() -> Provider {
        Provider {
            name: "istio-system/dashscope-qwen".into(),
            host: "dashscope.aliyuncs.com".into(),
            path: "/compatible-mode/v1/chat/completions".into(),
            model: Some("qwen1.5-72b-chat".into()),
            stream: Some(false),
            key: Secret::new("sk-gateway"),
        }
    }

    fn endpoint(method: hyper::Method, path: &str) -> Endpoint {
        crate::llm::endpoint::resolve(&method, path, None, &provider().path).unwrap()
    }

    fn chat() -> Endpoint {
        endpoint(hyper::Method::POST, "/")
    }

    fn adapt(
        body: &[u8],
        p: &Provider,
        endpoint: &Endpoint,
        limit: Option<(&str, u64)>,
    ) -> Result<Adapted, AdaptError> {
        adapt_body(&Bytes::copy_from_slice(body), p, endpoint, limit)
    }

    /// The same upstream JSON (as a `Value` reads it), model, stream and
    /// usage flag, or the same error.
    fn assert_same_adaptation(
        got: Result<Adapted, AdaptError>,
        want: Result<Adapted, AdaptError>,
        case: &str,
    ) {
        match (got, want) {
            (Ok(got), Ok(want)) => {
                let parse = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).expect("JSON");
                assert_eq!(parse(&got.body), parse(&want.body), "{case}");
                assert_eq!(
                    (got.model, got.stream, got.hide_usage_chunk),
                    (want.model, want.stream, want.hide_usage_chunk),
                    "{case}"
                );
            }
            (got, want) => assert_eq!(got, want, "{case}"),
        }
    }

    #[test]
    fn fills_model_and_stream_only_when_missing() {
        let a = adapt(
            br#"{"messages":[{"role":"user","content":"hi"}]}"#,
            &provider(),
            &chat(),
            None,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v["model"], "qwen1.5-72b-chat");
        assert_eq!(v["stream"], false);
        assert_eq!(v["messages"][0]["content"], "hi");
        assert_eq!((a.model.as_deref(), a.stream), (Some("qwen1.5-72b-chat"), false));
        assert!(!a.hide_usage_chunk);

        let a = adapt(
            br#"{"model":"qwen-max","stream":true,"messages":[]}"#,
            &provider(),
            &chat(),
            None,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v["model"], "qwen-max");
        assert_eq!(v["stream"], true);
        assert_eq!((a.model.as_deref(), a.stream), (Some("qwen-max"), true));
    }

    #[test]
    fn streams_always_ask_for_usage_and_remember_whether_the_client_did() {
        // Not asked: asked upstream, hidden from the client.
        let a = adapt(
            br#"{"model":"m","stream":true,"stream_options":{"other":1},"messages":[]}"#,
            &provider(),
            &chat(),
            None,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["other"], 1);
        assert!(a.hide_usage_chunk);
        // Asked: unchanged, byte for byte.
        let asked = br#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
        let a = adapt(asked, &provider(), &chat(), None).unwrap();
        assert_eq!(&a.body[..], &asked[..]);
        assert!(!a.hide_usage_chunk);
        // Text completions too; embeddings keep their body and model as sent.
        let completions = endpoint(hyper::Method::POST, "/v1/completions");
        assert!(
            adapt(
                br#"{"model":"m","prompt":"x","stream":true}"#,
                &provider(),
                &completions,
                None
            )
            .unwrap()
            .hide_usage_chunk
        );
        let embeddings = endpoint(hyper::Method::POST, "/v1/embeddings");
        let body = br#"{"input":"x"}"#;
        let a = adapt(body, &provider(), &embeddings, None).unwrap();
        assert_eq!(
            &a.body[..],
            &body[..],
            "the chat model is not forced on embeddings"
        );
        assert_eq!(a.model, None);
    }

    #[test]
    fn a_budget_limit_is_set_when_the_request_has_none() {
        let a = adapt(
            br#"{"model":"m","messages":[]}"#,
            &provider(),
            &chat(),
            Some(("max_tokens", 40)),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v["max_tokens"], 40);
    }

    #[test]
    fn added_fields_go_before_the_clients_bytes_which_stay_as_sent() {
        let sent = br#" { "z" : 1, "messages":[{"content":"\u00e9 x"}], "a":[ ] } "#;
        let a = adapt(sent, &provider(), &chat(), Some(("max_tokens", 7))).unwrap();
        let text = std::str::from_utf8(&a.body).unwrap();
        let (front, rest) = text.split_once('{').unwrap();
        assert_eq!(front, " ");
        assert!(
            rest.ends_with(r#" "z" : 1, "messages":[{"content":"\u00e9 x"}], "a":[ ] } "#),
            "the client's fields were rewritten: {text}"
        );
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v["max_tokens"], 7);
        assert_eq!(v["model"], "qwen1.5-72b-chat");
        assert_eq!(v["stream"], false);
        assert_eq!(v["messages"][0]["content"], "\u{e9} x");
        // An empty object gets no stray comma.
        let a = adapt(b"{}", &provider(), &chat(), None).unwrap();
        assert_eq!(&a.body[..], br#"{"model":"qwen1.5-72b-chat","stream":false}"#);
    }

    /// The in-place adapter must say what the `Value` one says, or leave
    /// the body to it: same fields upstream, same model, stream and usage
    /// flag, same errors.
    #[test]
    fn in_place_and_value_adaptation_agree() {
        let nested = |depth: usize| format!(r#"{{"a":{}{}}}"#, "[".repeat(depth), "]".repeat(depth));
        let deep = [nested(126), nested(127), nested(128), nested(400)];
        let bodies: Vec<&str> = [
            "{}",
            " {\n} ",
            r#"{"messages":[]}"#,
            r#"{"model":"m","messages":[]}"#,
            r#"{"mod\u0065l":"escaped key","stream":true}"#,
            r#"{"model":7,"stream":"true"}"#,
            r#"{"model":"m\"q","stream":true}"#,
            r#"{"stream":true}"#,
            r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            r#"{"stream":true,"stream_options":{"include_usage":false,"x":1}}"#,
            r#"{"stream":true,"stream_options":null}"#,
            r#"{"stream":true,"stream_options":[1]}"#,
            r#"{"max_tokens":5,"messages":[]}"#,
            r#"{"max_output_tokens":5,"input":"x"}"#,
            r#"{"nested":{"model":"inner","stream":true}}"#,
            r#"{"a":1} x"#,
            r#"{"a":1,}"#,
            r#"{"a":"\ud800"}"#,
            r#"{"a":1e400}"#,
            r#"{"a":18446744073709551616}"#,
            "[1]",
            "\"s\"",
            "",
        ]
        .into_iter()
        .chain(deep.iter().map(String::as_str))
        .collect();
        let mut no_defaults = provider();
        no_defaults.model = None;
        no_defaults.stream = None;
        let mut streaming = provider();
        streaming.stream = Some(true);
        let endpoints = [
            chat(),
            endpoint(hyper::Method::POST, "/v1/completions"),
            endpoint(hyper::Method::POST, "/v1/embeddings"),
            endpoint(hyper::Method::POST, "/v1/responses"),
        ];
        let limits = [None, Some(("max_tokens", 40)), Some(("max_output_tokens", 9))];
        let mut in_place = 0;
        for body in &bodies {
            let bytes = Bytes::copy_from_slice(body.as_bytes());
            for p in [provider(), no_defaults.clone(), streaming.clone()] {
                for e in &endpoints {
                    for limit in limits {
                        let want = adapt_value(&bytes, &p, e, limit);
                        let got = adapt_body(&bytes, &p, e, limit);
                        in_place += usize::from(adapt_in_place(&bytes, &p, e, limit).is_some());
                        let case = format!("{body} / {:?} / {limit:?}", e.operation);
                        assert_same_adaptation(got, want, &case);
                    }
                }
            }
        }
        assert!(in_place > 100, "the in-place path was taken {in_place} times");
    }

    /// Against a provider whose parser keeps the first of two keys, or
    /// matches keys ignoring case, each of these would have it read a
    /// limit, a choice count or a model the gateway did not.
    #[test]
    fn bodies_that_give_a_guarded_field_twice_or_in_another_case_are_refused() {
        for (body, field) in [
            (r#"{"model":"a","stream":true,"model":"b"}"#, "model"),
            (r#"{"mod\u0065l":"a","model":"b"}"#, "model"),
            (r#"{"MODEL":"expensive","messages":[]}"#, "model"),
            (r#"{"model":"m","MAX_TOKENS":100000,"messages":[]}"#, "max_tokens"),
            (
                r#"{"model":"m","max_tokens":100000,"max_tokens":1}"#,
                "max_tokens",
            ),
            (
                r#"{"max_completion_tokens":100000,"max_completion_tokens":null}"#,
                "max_completion_tokens",
            ),
            (r#"{"n":8,"n":1}"#, "n"),
            (r#"{"model":"m","max_to\u212Aens":100000}"#, "max_tokens"),
            ("{\"\u{17f}tream\":true}", "stream"),
            (r#"{"maxTokens":100000}"#, "max_tokens"),
            (r#"{"best-of":8}"#, "best_of"),
            (r#"{"Best_Of":8}"#, "best_of"),
            (r#"{"stream":false,"Stream":true}"#, "stream"),
            (r#"{"stream_options":{},"STREAM_OPTIONS":{}}"#, "stream_options"),
            (
                r#"{"max_output_tokens":1,"Max_Output_Tokens":9}"#,
                "max_output_tokens",
            ),
        ] {
            for limit in [None, Some(("max_tokens", 40))] {
                assert_eq!(
                    adapt(body.as_bytes(), &provider(), &chat(), limit),
                    Err(AdaptError::Ambiguous(field)),
                    "{body}"
                );
            }
        }
        // Nested objects are the provider's to read; other keys may repeat.
        for body in [
            r#"{"model":"m","messages":[{"role":"user","Model":1,"model":2}]}"#,
            r#"{"model":"m","user":"a","user":"b","Models":1}"#,
        ] {
            assert!(
                adapt(body.as_bytes(), &provider(), &chat(), None).is_ok(),
                "{body}"
            );
        }
    }

    /// Fuzz target: objects made of the keys the gateway guards (in every
    /// spelling), others, and values of every kind. Never panics; refuses
    /// exactly the bodies that give a guarded key twice or in another
    /// case; otherwise says what the `Value` adaptation says, and what goes
    /// upstream gives each guarded key at most once, spelled exactly.
    #[test]
    fn fuzz_adapt_body() {
        // (spelling, the guarded name it is, whether exactly)
        const KEYS: [(&str, Option<&str>, bool); 17] = [
            ("model", Some("model"), true),
            ("MODEL", Some("model"), false),
            (r"mod\u0065l", Some("model"), true),
            ("stream", Some("stream"), true),
            ("Stream", Some("stream"), false),
            ("stream_options", Some("stream_options"), true),
            ("max_tokens", Some("max_tokens"), true),
            ("MAX_TOKENS", Some("max_tokens"), false),
            (r"max_to\u212aens", Some("max_tokens"), false),
            ("\u{17f}tream", Some("stream"), false),
            ("maxTokens", Some("max_tokens"), false),
            ("max_output_tokens", Some("max_output_tokens"), true),
            ("max_completion_tokens", Some("max_completion_tokens"), true),
            ("n", Some("n"), true),
            ("N", Some("n"), false),
            ("messages", None, true),
            ("x", None, true),
        ];
        const VALUES: [&str; 11] = [
            r#""m""#,
            "true",
            "false",
            "null",
            "7",
            "1e5",
            r#""8""#,
            "{}",
            r#"{"include_usage":true}"#,
            r#"{"include_usage":false,"model":"inner"}"#,
            r#"[{"role":"user","content":"\u00e9"}]"#,
        ];
        let streaming = Provider {
            stream: Some(true),
            ..provider()
        };
        let endpoints = [chat(), endpoint(hyper::Method::POST, "/v1/responses")];
        bolero::check!()
            .with_type::<(Vec<(u8, u8)>, u8)>()
            .with_iterations(crate::FUZZ_ITERATIONS)
            .for_each(|(pairs, choice)| {
                let pairs = &pairs[..pairs.len().min(6)];
                let fields: Vec<String> = pairs
                    .iter()
                    .map(|(k, v)| {
                        format!(
                            r#""{}":{}"#,
                            KEYS[*k as usize % KEYS.len()].0,
                            VALUES[*v as usize % VALUES.len()]
                        )
                    })
                    .collect();
                let body = Bytes::from(format!("{{{}}}", fields.join(",")));
                let mut given: Vec<&str> = Vec::new();
                let mut ambiguous = false;
                for (k, _) in pairs {
                    if let (_, Some(name), exact) = KEYS[*k as usize % KEYS.len()] {
                        ambiguous |= !exact || given.contains(&name);
                        given.push(name);
                    }
                }
                let p = if choice & 1 == 0 {
                    provider()
                } else {
                    streaming.clone()
                };
                let e = &endpoints[usize::from(choice & 2 != 0)];
                let limit = (choice & 4 != 0).then_some(("max_tokens", 40));
                let got = adapt_body(&body, &p, e, limit);
                let case = String::from_utf8_lossy(&body).into_owned();
                if ambiguous {
                    assert!(matches!(got, Err(AdaptError::Ambiguous(_))), "{case}: {got:?}");
                    return;
                }
                if let Ok(got) = &got {
                    let up = json::top_level(&got.body, [None::<&str>; 0], &GUARDED).expect("JSON upstream");
                    assert_eq!(up.ambiguous, None, "{case} went up as {:?}", got.body);
                }
                assert_same_adaptation(got, adapt_value(&body, &p, e, limit), &case);
            });
    }

    #[test]
    fn rejects_bodies_that_are_not_json_objects() {
        assert!(matches!(
            adapt(b"hello", &provider(), &chat(), None),
            Err(AdaptError::NotJson(_))
        ));
        assert_eq!(
            adapt(b"[1,2]", &provider(), &chat(), None),
            Err(AdaptError::NotObject)
        );
    }

    #[test]
    fn client_credentials_and_tunnel_headers_are_replaced() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer sk-client-own".parse().unwrap());
        h.insert(
            "x-llm-egress-workload",
            "spiffe://cluster.local/ns/kube-system/sa/admin".parse().unwrap(),
        );
        h.insert("host", "dashscope.aliyuncs.com".parse().unwrap());
        h.insert("x-request-id", "abc".parse().unwrap());
        h.insert("connection", "keep-alive, X-Hop".parse().unwrap());
        for (name, value) in [
            ("x-api-key", "sk-client-x"),
            ("api-key", "sk-client-azure"),
            ("x-goog-api-key", "sk-client-goog"),
            ("proxy-authorization", "Basic c2stY2xpZW50"),
            (
                "x-forwarded-client-cert",
                "By=spiffe://x;URI=spiffe://cluster.local/ns/a/sa/b",
            ),
            ("x-llm-egress-node", "node-9"),
            ("openai-organization", "org-attacker"),
            ("openai-project", "proj-attacker"),
            ("x-dashscope-workspace", "ws-attacker"),
            ("x-hop", "sk-client-hop"),
        ] {
            h.insert(HeaderName::from_static(name), value.parse().unwrap());
        }
        let out = adapt_headers(&h, &provider(), BodyHeaders::Json(42)).unwrap();
        for name in [
            "x-api-key",
            "api-key",
            "x-goog-api-key",
            "proxy-authorization",
            "x-forwarded-client-cert",
            "x-llm-egress-node",
            "openai-organization",
            "openai-project",
            "x-dashscope-workspace",
            "x-hop",
        ] {
            assert!(out.get(name).is_none(), "{name} reached the provider");
        }
        assert!(!format!("{out:?}").contains("sk-client"));
        assert_eq!(out["authorization"], "Bearer sk-gateway");
        assert_eq!(out.get_all("authorization").iter().count(), 1);
        assert!(out.get("x-llm-egress-workload").is_none());
        assert!(out.get("connection").is_none());
        assert_eq!(out["host"], "dashscope.aliyuncs.com");
        assert_eq!(out["x-request-id"], "abc");
        assert_eq!(out["content-length"], "42");
    }

    #[test]
    fn uri_is_provider_host_and_path() {
        assert_eq!(
            upstream_uri(&provider(), "/compatible-mode/v1/models?limit=2")
                .unwrap()
                .to_string(),
            "https://dashscope.aliyuncs.com/compatible-mode/v1/models?limit=2"
        );
    }
}

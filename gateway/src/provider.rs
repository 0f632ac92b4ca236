//! Adapting a client's request to its provider: the provider's path, its
//! model and stream defaults where the body has none, the gateway's key in
//! place of whatever credentials the client sent.

use bytes::Bytes;
use hyper::{
    header::{self, HeaderMap, HeaderName, HeaderValue},
    Uri,
};

use crate::config::Provider;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdaptError {
    #[error("the request body is not JSON ({0}); send an OpenAI-style JSON object")]
    NotJson(String),
    #[error("the request body must be a JSON object")]
    NotObject,
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

/// Fills `model` and `stream` from the provider when the body lacks them.
/// Returns the new body and the effective model and stream flag.
pub fn adapt_body(body: &[u8], p: &Provider) -> Result<(Bytes, Option<String>, bool), AdaptError> {
    let mut v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| AdaptError::NotJson(e.to_string()))?;
    let obj = v.as_object_mut().ok_or(AdaptError::NotObject)?;
    if !obj.contains_key("model") {
        if let Some(m) = &p.model {
            obj.insert("model".into(), m.clone().into());
        }
    }
    if !obj.contains_key("stream") {
        if let Some(s) = p.stream {
            obj.insert("stream".into(), s.into());
        }
    }
    let model = obj.get("model").and_then(|m| m.as_str()).map(str::to_string);
    let stream = obj.get("stream").and_then(|s| s.as_bool()).unwrap_or(false);
    let bytes = serde_json::to_vec(&v).map_err(|e| AdaptError::NotJson(e.to_string()))?;
    Ok((Bytes::from(bytes), model, stream))
}

/// The upstream URI: `https://<provider host><provider path>`.
pub fn upstream_uri(p: &Provider) -> Result<Uri, hyper::http::Error> {
    Uri::builder()
        .scheme("https")
        .authority(p.host.as_str())
        .path_and_query(p.path.as_str())
        .build()
}

/// Upstream headers from the client's: drops credentials, tunnel and
/// hop-by-hop headers, then sets Host, the key, and the content type.
pub fn adapt_headers(
    client: &HeaderMap,
    p: &Provider,
    body_len: usize,
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
    out.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    out.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
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

    #[test]
    fn fills_model_and_stream_only_when_missing() {
        let (b, model, stream) =
            adapt_body(br#"{"messages":[{"role":"user","content":"hi"}]}"#, &provider()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["model"], "qwen1.5-72b-chat");
        assert_eq!(v["stream"], false);
        assert_eq!(v["messages"][0]["content"], "hi");
        assert_eq!((model.as_deref(), stream), (Some("qwen1.5-72b-chat"), false));

        let (b, model, stream) = adapt_body(
            br#"{"model":"qwen-max","stream":true,"messages":[]}"#,
            &provider(),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["model"], "qwen-max");
        assert_eq!(v["stream"], true);
        assert_eq!((model.as_deref(), stream), (Some("qwen-max"), true));
    }

    #[test]
    fn rejects_bodies_that_are_not_json_objects() {
        assert!(matches!(
            adapt_body(b"hello", &provider()),
            Err(AdaptError::NotJson(_))
        ));
        assert_eq!(adapt_body(b"[1,2]", &provider()), Err(AdaptError::NotObject));
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
        let out = adapt_headers(&h, &provider(), 42).unwrap();
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
            upstream_uri(&provider()).unwrap().to_string(),
            "https://dashscope.aliyuncs.com/compatible-mode/v1/chat/completions"
        );
    }
}

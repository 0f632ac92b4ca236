//! RequestAuthentication: JWT validation against the issuers' keys
//! (`jwks.rs`: inline, `file://` or fetched from `jwksUri`). As in Istio, a
//! request without a token passes through without a request principal; a
//! request with an invalid token is rejected with 401. The token is read
//! from `fromHeaders` (default `Authorization: Bearer`) or `fromParams`; its
//! header is removed before the provider unless `forwardOriginalToken`, and
//! `outputPayloadToHeader` / `outputClaimToHeaders` pass what was verified
//! on. A workload whose SDK sends its JWT as the "API key" is covered by the
//! default location: the token is verified, then the provider key replaces it.

use hyper::{
    header::{HeaderName, HeaderValue},
    HeaderMap,
};
use jsonwebtoken::{decode, decode_header, DecodingKey, Validation};
use llm_egress_config::resources::{JwtRule, Named, RequestAuthenticationSpec};

use super::jwks::JwksCache;

#[derive(Debug, Clone, PartialEq)]
pub struct JwtInfo {
    /// `iss/sub`, Istio's request principal.
    pub principal: String,
    pub claims: serde_json::Value,
    /// The token's header, to remove before the provider (no
    /// `forwardOriginalToken`).
    pub remove_header: Option<HeaderName>,
    /// `outputPayloadToHeader` and `outputClaimToHeaders`.
    pub add_headers: Vec<(HeaderName, HeaderValue)>,
    /// The query parameter the token came in, to remove before the provider
    /// (no `forwardOriginalToken`).
    pub remove_param: Option<String>,
}

/// Every header name a RequestAuthentication writes what it verified to:
/// a client's own values under these names never pass.
pub fn output_headers(policies: &[Named<RequestAuthenticationSpec>]) -> Vec<HeaderName> {
    policies
        .iter()
        .flat_map(|p| p.spec.jwt_rules.iter())
        .flat_map(|r| {
            r.output_payload_to_header
                .iter()
                .chain(r.output_claim_to_headers.iter().map(|c| &c.header))
        })
        .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
        .collect()
}

/// `query` without parameter `name` (`None` when nothing is left).
pub fn without_param(query: Option<&str>, name: &str) -> Option<String> {
    let kept: Vec<&str> = query?
        .split('&')
        .filter(|pair| pair.split_once('=').map_or(*pair, |(k, _)| k) != name)
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

enum Location {
    Header(String),
    Param(String),
}

fn token_from(headers: &HeaderMap, query: Option<&str>, rule: &JwtRule) -> Option<(String, Location)> {
    let locations: Vec<(String, String)> = if rule.from_headers.is_empty() && rule.from_params.is_empty() {
        vec![("authorization".into(), "Bearer ".into())]
    } else {
        rule.from_headers
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.prefix.clone().unwrap_or_default()))
            .collect()
    };
    let from_header = locations.iter().find_map(|(name, prefix)| {
        let v = headers.get(name.as_str())?.to_str().ok()?;
        v.strip_prefix(prefix.as_str())
            .map(|t| (t.trim().to_string(), Location::Header(name.clone())))
    });
    from_header.or_else(|| {
        let query = query?;
        rule.from_params.iter().find_map(|param| {
            query.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                (k == param && !v.is_empty()).then(|| (v.to_string(), Location::Param(param.clone())))
            })
        })
    })
}

/// A claim as a header value: strings as they are, numbers and booleans
/// printed; other shapes are not sent.
fn claim_value(v: &serde_json::Value) -> Option<HeaderValue> {
    let text = match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::Bool(b) => b.to_string(),
        _ => return None,
    };
    HeaderValue::from_str(&text).ok()
}

/// Validates the request's token, if it has one.
pub fn authenticate(
    policies: &[Named<RequestAuthenticationSpec>],
    headers: &HeaderMap,
    query: Option<&str>,
    keys: &JwksCache,
) -> Result<Option<JwtInfo>, String> {
    let rules: Vec<&JwtRule> = policies.iter().flat_map(|p| p.spec.jwt_rules.iter()).collect();
    let Some((token, location)) = rules.iter().find_map(|r| token_from(headers, query, r)) else {
        return Ok(None);
    };
    let header = decode_header(&token).map_err(|e| format!("malformed token: {e}"))?;
    // Find the rule for the token's issuer, then verify with its keys.
    let unverified: serde_json::Value = jsonwebtoken::dangerous::insecure_decode(&token)
        .map_err(|e| format!("malformed token: {e}"))?
        .claims;
    let iss = unverified
        .get("iss")
        .and_then(|i| i.as_str())
        .ok_or("token has no issuer")?;
    let rule = rules
        .iter()
        .find(|r| r.issuer == iss)
        .ok_or_else(|| format!("issuer {iss:?} is not trusted"))?;
    let set = keys.keys(rule)?;
    let candidates: Vec<_> = match &header.kid {
        Some(kid) => set
            .keys
            .iter()
            .filter(|k| k.common.key_id.as_deref() == Some(kid.as_str()))
            .collect(),
        None => set.keys.iter().collect(),
    };
    let mut validation = Validation::new(header.alg);
    validation.set_issuer(&[iss]);
    if rule.audiences.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(&rule.audiences);
    }
    let mut last = "no matching key".to_string();
    for jwk in candidates {
        let key = match DecodingKey::from_jwk(jwk) {
            Ok(k) => k,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        match decode::<serde_json::Value>(&token, &key, &validation) {
            Ok(data) => {
                let sub = data
                    .claims
                    .get("sub")
                    .and_then(|s| s.as_str())
                    .unwrap_or_default()
                    .to_string();
                let mut add_headers = Vec::new();
                if let Some(name) = &rule.output_payload_to_header {
                    // The payload as the token carries it: base64url JSON.
                    let payload = token.split('.').nth(1).unwrap_or_default();
                    if let (Ok(n), Ok(v)) = (
                        HeaderName::from_bytes(name.as_bytes()),
                        HeaderValue::from_str(payload),
                    ) {
                        add_headers.push((n, v));
                    }
                }
                for c in &rule.output_claim_to_headers {
                    let (Ok(n), Some(v)) = (
                        HeaderName::from_bytes(c.header.as_bytes()),
                        data.claims.get(&c.claim).and_then(claim_value),
                    ) else {
                        continue;
                    };
                    add_headers.push((n, v));
                }
                let (remove_header, remove_param) = match (&location, rule.forward_original_token) {
                    (_, true) => (None, None),
                    (Location::Header(name), false) => (HeaderName::from_bytes(name.as_bytes()).ok(), None),
                    (Location::Param(name), false) => (None, Some(name.clone())),
                };
                return Ok(Some(JwtInfo {
                    principal: format!("{iss}/{sub}"),
                    claims: data.claims,
                    remove_header,
                    add_headers,
                    remove_param,
                }));
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!("token verification failed: {last}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use llm_egress_config::resources::{Meta, ResourceSet};
    use std::path::Path;

    const SECRET_B64: &str = "c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seS0xMjM0NTY3ODkw";

    fn policy() -> Vec<Named<RequestAuthenticationSpec>> {
        let jwks = format!(
            "{{\"keys\":[{{\"kty\":\"oct\",\"kid\":\"k1\",\"alg\":\"HS256\",\"k\":\"{}\"}}]}}",
            SECRET_B64.trim_end_matches('=')
        );
        let yaml = format!(
            "apiVersion: security.istio.io/v1beta1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: istio-system}}\nspec:\n  jwtRules:\n  - issuer: https://idp.example\n    audiences: [llm]\n    jwks: '{jwks}'\n"
        );
        let mut set = ResourceSet::default();
        assert!(set.add_text(Path::new("j.yaml"), &yaml).is_empty());
        let _ = Meta::default();
        set.authentications
    }

    fn token(claims: serde_json::Value) -> String {
        use base64_like::decode_b64url;
        let key = decode_b64url(SECRET_B64);
        let mut h = Header::new(jsonwebtoken::Algorithm::HS256);
        h.kid = Some("k1".into());
        encode(&h, &claims, &EncodingKey::from_secret(&key)).unwrap()
    }

    mod base64_like {
        // Standard base64 of an ASCII test secret; decoding by table keeps
        // the test free of another dependency.
        pub fn decode_b64url(s: &str) -> Vec<u8> {
            const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let mut out = Vec::new();
            let mut acc = 0u32;
            let mut bits = 0;
            for c in s.bytes().filter(|c| *c != b'=') {
                let v = T.iter().position(|t| *t == c).unwrap() as u32;
                acc = (acc << 6) | v;
                bits += 6;
                if bits >= 8 {
                    bits -= 8;
                    out.push((acc >> bits) as u8);
                }
            }
            out
        }
    }

    fn keys() -> JwksCache {
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        JwksCache::new(
            crate::policy::jwks::JwksSettings {
                refresh: std::time::Duration::from_secs(60),
                timeout: std::time::Duration::from_secs(1),
            },
            tls,
            crate::upstream::Resolver::new(Default::default()),
        )
    }

    fn headers(tok: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("authorization", format!("Bearer {tok}").parse().unwrap());
        h
    }

    #[test]
    fn valid_token_gives_request_principal_and_claims() {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let t = token(
            serde_json::json!({"iss": "https://idp.example", "sub": "alice", "aud": "llm", "exp": exp, "groups": ["ops"]}),
        );
        let info = authenticate(&policy(), &headers(&t), None, &keys())
            .unwrap()
            .unwrap();
        assert_eq!(info.principal, "https://idp.example/alice");
        assert_eq!(info.claims["groups"][0], "ops");
    }

    #[test]
    fn a_token_parameter_is_removed_and_output_headers_are_known() {
        assert_eq!(
            without_param(Some("a=1&access_token=t&b=2"), "access_token").as_deref(),
            Some("a=1&b=2")
        );
        assert_eq!(without_param(Some("access_token=t"), "access_token"), None);
        assert_eq!(without_param(None, "access_token"), None);
        let yaml = "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: j, namespace: istio-system}\nspec:\n  jwtRules:\n  - issuer: i\n    jwks: '{\"keys\": []}'\n    outputPayloadToHeader: x-payload\n    outputClaimToHeaders: [{header: x-role, claim: role}]\n";
        let mut set = ResourceSet::default();
        assert!(set.add_text(Path::new("j.yaml"), yaml).is_empty());
        let names: Vec<String> = output_headers(&set.authentications)
            .iter()
            .map(|h| h.to_string())
            .collect();
        assert_eq!(names, ["x-payload", "x-role"]);
    }

    #[test]
    fn no_token_passes_without_principal() {
        assert_eq!(
            authenticate(&policy(), &HeaderMap::new(), None, &keys()).unwrap(),
            None
        );
    }

    #[test]
    fn bad_tokens_are_rejected() {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let wrong_aud =
            token(serde_json::json!({"iss": "https://idp.example", "sub": "a", "aud": "other", "exp": exp}));
        assert!(authenticate(&policy(), &headers(&wrong_aud), None, &keys()).is_err());
        let wrong_iss =
            token(serde_json::json!({"iss": "https://evil", "sub": "a", "aud": "llm", "exp": exp}));
        assert!(authenticate(&policy(), &headers(&wrong_iss), None, &keys())
            .unwrap_err()
            .contains("not trusted"));
        let expired =
            token(serde_json::json!({"iss": "https://idp.example", "sub": "a", "aud": "llm", "exp": 1000}));
        assert!(authenticate(&policy(), &headers(&expired), None, &keys()).is_err());
        assert!(authenticate(&policy(), &headers("not.a.jwt"), None, &keys()).is_err());
    }
}

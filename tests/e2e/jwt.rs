//! RequestAuthentication with a remote `jwksUri`, as Istio does it: keys
//! fetched from a real HTTPS endpoint, cached, refreshed; tokens of an
//! issuer whose keys were never fetched are rejected; rotation is picked up;
//! one fetch per refresh, not per request. And the token's journey: from
//! headers or query parameters, removed before the provider unless
//! forwarded, claims and payload passed on, the provider key in place of a
//! JWT sent as the SDK's "API key".

use std::{path::PathBuf, time::Duration};

use base64::Engine;
use hyper::StatusCode;
use jsonwebtoken::{encode, EncodingKey, Header};
use llm_egress_mesh::{certs, identity::SpiffeId};
use llm_egress_tests::{
    env,
    gateway_lab::*,
    process::{eventually, Daemon, Place},
};

const IDP: &str = "idp.test";
const IDP_PORT: u16 = 8443;

fn secret(kid: &str) -> Vec<u8> {
    format!("test-secret-of-{kid}-0123456789abcdef").into_bytes()
}

fn jwks(kid: &str) -> String {
    let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret(kid));
    format!(r#"{{"keys":[{{"kty":"oct","kid":"{kid}","alg":"HS256","k":"{k}"}}]}}"#)
}

fn token(kid: &str, sub: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let mut h = Header::new(jsonwebtoken::Algorithm::HS256);
    h.kid = Some(kid.into());
    let claims = serde_json::json!({"iss": format!("https://{IDP}"), "sub": sub, "aud": "llm", "exp": exp, "team": "ops"});
    encode(&h, &claims, &EncodingKey::from_secret(&secret(kid))).unwrap()
}

fn request_authentication() -> String {
    format!(
        r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: istio-system}}
spec:
  selector:
    matchLabels: {{istio: egressgateway}}
  jwtRules:
  - issuer: https://{IDP}
    audiences: [llm]
    jwksUri: https://{IDP}:{IDP_PORT}/.well-known/jwks.json
    fromHeaders:
    - {{name: authorization, prefix: "Bearer "}}
    - {{name: x-jwt-assertion}}
    fromParams: [access_token]
    outputPayloadToHeader: x-jwt-payload
    outputClaimToHeaders:
    - {{header: x-jwt-team, claim: team}}
"#
    )
}

struct Idp {
    daemon: Option<Daemon>,
    jwks: PathBuf,
    log: PathBuf,
}

impl Idp {
    fn new(lab: &GatewayLab) -> Idp {
        let ca = certs::Pem {
            cert: std::fs::read_to_string(lab.certs().join("ca.pem")).unwrap(),
            key: std::fs::read_to_string(lab.certs().join("ca-key.pem")).unwrap(),
        };
        let pem = certs::issue(
            &ca,
            &SpiffeId::parse("spiffe://idp.test/keys").unwrap(),
            &[IDP.to_string()],
        )
        .unwrap();
        certs::write(&lab.certs(), "idp", &pem).unwrap();
        let jwks = lab.dir.path().join("jwks.json");
        write_atomically(&jwks, &self::jwks("k1"));
        Idp {
            daemon: None,
            jwks,
            log: lab.dir.path().join("jwks-fetches.log"),
        }
    }

    fn start(&mut self, lab: &GatewayLab) {
        self.daemon = Some(Daemon::start(
            "idp",
            &Place::default(),
            &env::tests_bin("llm-egress-test-jwks"),
            &[
                "--listen".into(),
                format!("{}:{IDP_PORT}", lab.ip),
                "--cert".into(),
                lab.certs().join("idp.pem").display().to_string(),
                "--key".into(),
                lab.certs().join("idp-key.pem").display().to_string(),
                "--jwks".into(),
                self.jwks.display().to_string(),
                "--log".into(),
                self.log.display().to_string(),
            ],
            lab.dir.path(),
        ));
    }

    fn fetches(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .count()
    }
}

/// The seed's request as default/sleep with extra headers and a query.
async fn call(lab: &GatewayLab, path: &str, extra: &[(&str, String)]) -> (StatusCode, String) {
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, _, body) = call_as(lab, "sleep", path, &extra).await;
    (status, body)
}

fn bearer(t: &str) -> Vec<(&'static str, String)> {
    vec![("authorization", format!("Bearer {t}"))]
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_jwks_is_fetched_cached_refreshed_and_never_guessed() {
    let mut lab = GatewayLab::new();
    let mut idp = Idp::new(&lab);
    lab.extra_args.extend([
        "--resolve".into(),
        format!("{IDP}={}", lab.ip),
        "--jwks-refresh".into(),
        "3".into(),
    ]);
    lab.restart_gateway();
    lab.apply("jwt.yaml", &request_authentication());

    // The endpoint is down: a valid token is rejected, never let through.
    let k1 = token("k1", "alice");
    eventually(
        "tokens refused while no keys were ever fetched",
        Duration::from_secs(10),
        || async {
            let (s, b) = call(&lab, "/", &bearer(&k1)).await;
            (s == StatusCode::UNAUTHORIZED)
                .then_some(())
                .ok_or(format!("{s} {b}"))
        },
    )
    .await;
    let reached = lab.provider_requests().len();
    assert_eq!(call(&lab, "/", &bearer(&k1)).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        lab.provider_requests().len(),
        reached,
        "a refused token reaches nothing"
    );

    // Up: accepted once the keys are fetched (the retry backs off).
    idp.start(&lab);
    eventually(
        "the token accepted once the keys are fetched",
        Duration::from_secs(40),
        || async {
            let (s, b) = call(&lab, "/", &bearer(&k1)).await;
            (s == StatusCode::OK).then_some(()).ok_or(format!("{s} {b}"))
        },
    )
    .await;

    // Many requests, about one fetch: keys are cached, not fetched per request.
    let before = idp.fetches();
    for _ in 0..30 {
        assert_eq!(call(&lab, "/", &bearer(&k1)).await.0, StatusCode::OK);
    }
    let during = idp.fetches() - before;
    assert!(
        during <= 2,
        "{during} fetches for 30 requests: keys must be cached between refreshes"
    );

    // Rotation: the new key is picked up at the next refresh, the old one dropped.
    write_atomically(&idp.jwks, &jwks("k2"));
    let k2 = token("k2", "alice");
    eventually(
        "the rotated key picked up by a refresh",
        Duration::from_secs(15),
        || async {
            let (s, b) = call(&lab, "/", &bearer(&k2)).await;
            (s == StatusCode::OK).then_some(()).ok_or(format!("{s} {b}"))
        },
    )
    .await;
    assert_eq!(call(&lab, "/", &bearer(&k1)).await.0, StatusCode::UNAUTHORIZED);

    // The endpoint goes away: the last good keys stay in use.
    if let Some(mut d) = idp.daemon.take() {
        d.stop();
    }
    eventually("a refresh to fail", Duration::from_secs(15), || async {
        lab.gateway_logs()
            .contains("JWKS fetch failed")
            .then_some(())
            .ok_or_else(|| "no failed fetch logged yet".to_string())
    })
    .await;
    assert_eq!(call(&lab, "/", &bearer(&k2)).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_is_read_where_configured_and_what_was_verified_goes_on() {
    let mut lab = GatewayLab::new();
    let mut idp = Idp::new(&lab);
    lab.extra_args
        .extend(["--resolve".into(), format!("{IDP}={}", lab.ip)]);
    lab.restart_gateway();
    idp.start(&lab);
    lab.apply("jwt.yaml", &request_authentication());
    let t = token("k1", "bob");
    eventually(
        "the RequestAuthentication in force",
        Duration::from_secs(10),
        || async {
            let (s, b) = call(&lab, "/", &[("x-jwt-assertion", "not.a.token".into())]).await;
            (s == StatusCode::UNAUTHORIZED)
                .then_some(())
                .ok_or(format!("{s} {b}"))
        },
    )
    .await;
    eventually("the keys fetched", Duration::from_secs(20), || async {
        let (s, b) = call(&lab, "/", &[("x-jwt-assertion", t.clone())]).await;
        (s == StatusCode::OK).then_some(()).ok_or(format!("{s} {b}"))
    })
    .await;
    let seen = lab.provider_requests().pop().unwrap();
    let headers = &seen["headers"];
    assert!(
        headers.get("x-jwt-assertion").is_none(),
        "the token's header is removed (no forwardOriginalToken): {headers}"
    );
    assert_eq!(headers["x-jwt-team"], "ops");
    assert_eq!(headers["x-jwt-payload"], t.split('.').nth(1).unwrap());

    // An SDK sending its JWT as the API key: verified, then replaced by the provider key.
    let (s, _) = call(&lab, "/", &bearer(&t)).await;
    assert_eq!(s, StatusCode::OK);
    let seen = lab.provider_requests().pop().unwrap();
    assert_eq!(seen["authorized"], true, "the provider got its key, not the JWT");
    assert_eq!(seen["headers"]["x-jwt-team"], "ops");

    // A client cannot forge what a token says: its own value of an output
    // header is replaced by the verified claim, or dropped without a token.
    let mut forged = bearer(&t);
    forged.push(("x-jwt-team", "admin".into()));
    assert_eq!(call(&lab, "/", &forged).await.0, StatusCode::OK);
    assert_eq!(
        lab.provider_requests().pop().unwrap()["headers"]["x-jwt-team"],
        "ops"
    );
    assert_eq!(
        call(&lab, "/", &[("x-jwt-team", "admin".into())]).await.0,
        StatusCode::OK
    );
    let seen = lab.provider_requests().pop().unwrap();
    assert!(
        seen["headers"].get("x-jwt-team").is_none(),
        "a forged claim header passed: {seen}"
    );

    // From a query parameter, which is removed before the provider (the
    // user's token is not the provider's business); a bad one is refused.
    let (s, _) = call(&lab, &format!("/?access_token={t}&keep=1"), &[]).await;
    assert_eq!(s, StatusCode::OK);
    let seen = lab.provider_requests().pop().unwrap();
    assert_eq!(seen["query"], "keep=1", "{seen}");
    let (s, _) = call(&lab, "/?access_token=not.a.token", &[]).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

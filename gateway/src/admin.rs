//! Admin endpoint: `/healthz`, `/readyz` (with reload problems and
//! warnings), `/metrics`.

use std::sync::Arc;

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};

use crate::pipeline::Gateway;

pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(gw)
}

async fn readyz(State(gw): State<Arc<Gateway>>) -> impl IntoResponse {
    let st = gw.config.status();
    let mut body = String::from(if st.loaded {
        "ready\n"
    } else {
        "not ready: no configuration loaded\n"
    });
    for e in &st.last_errors {
        body.push_str(&format!(
            "last reload rejected (serving the previous configuration): {e}\n"
        ));
    }
    for w in &st.warnings {
        body.push_str(&format!("{w}\n"));
    }
    for e in gw.config.watch_errors() {
        body.push_str(&format!(
            "Kubernetes watch failing (serving what was last seen): {e}\n"
        ));
    }
    (
        if st.loaded {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        body,
    )
}

async fn metrics(State(gw): State<Arc<Gateway>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        gw.metrics.encode(),
    )
}

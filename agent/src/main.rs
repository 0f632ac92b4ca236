//! llm-egress node agent: captures enrolled workloads' connections to LLM
//! hosts with eBPF and forwards them with the workload's identity.

mod admin;
mod config;
mod fairness;
mod kube_pods;
mod loader;
mod metrics;
mod preflight;
mod proxy;
mod registry;
mod routes;
mod status;
mod targets;
mod uplink;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use llm_egress_config::{kube_watch, scope::Scope, source::ResourceSource};

use crate::{
    config::{Config, FileConfig, Mode, Overrides, WorkloadsFrom},
    registry::{Registry, StaticFileSource, WorkloadSource},
};

#[derive(Parser)]
#[command(
    name = "llm-egress-agent",
    version,
    about = "llm-egress node agent: eBPF capture of LLM traffic from enrolled workloads"
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

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Attach capture (or reuse a pinned one) and run the capture proxy.
    Run(Box<RunArgs>),
    /// Print targets, enrolled workloads and counters of a running agent.
    Status(StatusArgs),
    /// Detach the kernel programs and remove everything pinned under bpffs.
    Uninstall(UninstallArgs),
}

#[derive(Args)]
struct RunArgs {
    /// YAML configuration file; flags override its fields.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// cgroup v2 directory the programs attach to (default /sys/fs/cgroup).
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    /// Directory on a bpffs where maps and links are pinned (default /sys/fs/bpf/llm-egress).
    #[arg(long)]
    bpffs: Option<PathBuf>,
    /// Address the capture proxy listens on (repeatable; default the advertised port on 0.0.0.0, or on dual-stack [::] when an IPv6 address is advertised).
    #[arg(long = "proxy-listen")]
    proxy_listen: Vec<SocketAddr>,
    /// Proxy address as workloads reach it, e.g. the node IP (repeatable: one IPv4, one IPv6).
    #[arg(long = "proxy-advertise")]
    proxy_advertise: Vec<SocketAddr>,
    /// LLM host to capture (repeatable); names are resolved, IP literals used as they are.
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// Destination port to capture on every host (repeatable; default 80 and 443).
    #[arg(long = "port")]
    ports: Vec<u16>,
    /// Static workload file: YAML list of {namespace, serviceAccount, name, cgroupPath}.
    #[arg(long)]
    workloads: Option<PathBuf>,
    /// Enroll this node's Pods labelled (or in a namespace labelled) llm-egress.io/capture=enabled, and read LLMRoutes, from the Kubernetes API.
    #[arg(long)]
    kubernetes: bool,
    /// kubeconfig for --kubernetes (default: the pod's service account, then $KUBECONFIG).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Probe endpoint for the kubelet (/healthz, /readyz: a status and one word, nothing about workloads); off when not given.
    #[arg(long)]
    health_listen: Option<SocketAddr>,
    /// Also serve /metrics (which names this node's workloads and destinations) on --health-listen, for a scraper that cannot reach loopback.
    #[arg(long, requires = "health_listen")]
    health_metrics: bool,
    /// Admin endpoint address (/healthz, /readyz, /metrics, /status; default 127.0.0.1:15021). Keep it on loopback: /status lists recent connections.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// What to do with captured connections (default tunnel).
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// Directory of LLMRoute resources: their hosts are captured, their `mesh` rule names the gateway.
    #[arg(long)]
    resources: Option<PathBuf>,
    /// Tunnel address of an egress gateway, NAME=IP:PORT or NAME=HOST:PORT, NAME as in a mesh rule's providerHost (repeatable).
    #[arg(long = "gateway-address", value_parser = parse_gateway)]
    gateway_addresses: Vec<(String, String)>,
    /// The agent's certificate (PEM) for the tunnel's mTLS.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// The agent's private key (PEM).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// CA certificates the gateway's certificate must chain to (PEM).
    #[arg(long)]
    trust_bundle: Option<PathBuf>,
    /// SPIFFE ID the gateway's certificate must carry (default spiffe://<trust domain>/ns/istio-system/sa/istio-egressgateway-service-account).
    #[arg(long)]
    gateway_identity: Option<String>,
    /// File holding this agent's projected service-account token (audience llm-egress-gateway), sent so the gateway can bind the agent to its node; re-read when it changes.
    #[arg(long)]
    node_token_file: Option<PathBuf>,
    /// SPIFFE trust domain of workload identities (default cluster.local).
    #[arg(long)]
    trust_domain: Option<String>,
    /// Node name: whose Pods --kubernetes watches, and sent with each tunnelled connection (default: the host name).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Namespace trusted with LLMProviders, as given to the gateway (repeatable; default istio-system): routes from other namespaces are captured only for providers' hosts.
    #[arg(long = "trusted-namespace")]
    trusted_namespaces: Vec<String>,
    /// Mount a bpffs on the parent of --bpffs when none is mounted there (nodes without one, e.g. kind).
    #[arg(long)]
    mount_bpffs: bool,
    /// Captured connections one pod may hold at once; more are closed at once and counted (rejected{reason="workload_limit"}), so one pod cannot use up the node's tunnel (16384 streams).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections_per_workload: u32,
    /// Seconds to let open connections finish after SIGTERM.
    #[arg(long, default_value_t = 10)]
    drain_seconds: u64,
}

fn parse_gateway(s: &str) -> Result<(String, String), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=IP:PORT or NAME=HOST:PORT"))?;
    config::check_gateway_address(addr)?;
    Ok((name.to_ascii_lowercase(), addr.to_string()))
}

#[derive(Args)]
struct StatusArgs {
    /// Admin endpoint of the running agent.
    #[arg(long, default_value = config::DEFAULT_ADMIN)]
    admin: SocketAddr,
    /// Print the raw JSON document instead of a summary.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct UninstallArgs {
    /// Pin directory the agent was run with.
    #[arg(long, default_value = config::DEFAULT_BPFFS)]
    bpffs: PathBuf,
}

/// An error with the exit code it maps to: 1 runtime, 2 configuration,
/// 3 permissions, 4 host environment.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            code: 1,
            error: e.into(),
        }
    }
}

fn fail(code: u8, error: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code,
        error: error.into(),
    }
}

/// A proxy holds one descriptor per captured connection: lift the soft
/// open-files limit (often 1024) to the hard one.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out pointer; setrlimit only with values getrlimit gave.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    raise_nofile_limit();
    llm_egress_mesh::process::init_logging(matches!(cli.log_format, LogFormat::Json));
    let runtime = match llm_egress_mesh::process::runtime(cli.worker_threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(*args).await,
            Command::Status(args) => status::print(args.admin, args.json).await.map_err(Failure::from),
            Command::Uninstall(args) => uninstall(args),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}

fn uninstall(args: UninstallArgs) -> Result<(), Failure> {
    preflight::check_capabilities().map_err(|e| fail(e.exit_code() as u8, e))?;
    if !args.bpffs.exists() {
        println!(
            "nothing pinned at {}; capture is not installed",
            args.bpffs.display()
        );
        return Ok(());
    }
    let done = loader::uninstall(&args.bpffs)?;
    println!(
        "detached {} program link(s) and removed {} map(s) from {}",
        done.links,
        done.maps,
        args.bpffs.display()
    );
    Ok(())
}

async fn run(args: RunArgs) -> Result<(), Failure> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path).map_err(|e| fail(2, e))?,
        None => FileConfig::default(),
    };
    let overrides = Overrides {
        cgroup_root: args.cgroup_root,
        bpffs: args.bpffs,
        listen: args.proxy_listen,
        advertise: args.proxy_advertise,
        hosts: args.hosts,
        ports: args.ports,
        workloads_file: args.workloads,
        kubernetes: args.kubernetes,
        kubeconfig: args.kubeconfig,
        admin: args.admin,
        mode: args.mode,
        resources: args.resources,
        gateways: args.gateway_addresses,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        trust_bundle: args.trust_bundle,
        trust_domain: args.trust_domain,
        node_name: args.node_name,
        trusted_namespaces: args.trusted_namespaces,
        gateway_identity: args.gateway_identity,
        node_token_file: args.node_token_file,
    };
    let cfg = Config::resolve(file, overrides).map_err(|e| fail(2, e))?;

    let env_fail = |e: preflight::PreflightError| fail(e.exit_code() as u8, e);
    preflight::check_capabilities().map_err(env_fail)?;
    preflight::check_bpf().map_err(env_fail)?;
    preflight::check_cgroup_root(&cfg.cgroup_root).map_err(env_fail)?;
    if let Err(e) = preflight::check_bpffs(&cfg.bpffs) {
        if !args.mount_bpffs {
            return Err(env_fail(e));
        }
        let at = preflight::mount_bpffs(&cfg.bpffs).map_err(env_fail)?;
        tracing::info!(path = %at.display(), "no bpffs was mounted; mounted one (--mount-bpffs)");
        preflight::check_bpffs(&cfg.bpffs).map_err(env_fail)?;
    }

    // A bad workload file is a configuration error at startup; later it only
    // keeps the last good list.
    let (mut source, resources): (Box<dyn WorkloadSource>, Option<ResourceSource>) = match &cfg.workloads {
        WorkloadsFrom::Static(file) => (
            Box::new(StaticFileSource::new(file.clone())),
            cfg.resources.clone().map(ResourceSource::Dir),
        ),
        WorkloadsFrom::Kubernetes { kubeconfig } => {
            let client = kube_watch::client(kubeconfig.as_deref())
                .await
                .map_err(|e| fail(2, e))?;
            let pods =
                kube_pods::KubePodSource::start(client.clone(), &cfg.node_name, cfg.cgroup_root.clone());
            let resources = match &cfg.resources {
                Some(dir) => ResourceSource::Dir(dir.clone()),
                None => {
                    // Providers too: a tenant's route is captured only for a provider's host.
                    let kube = kube_watch::KubeResources::start(
                        client,
                        &[kube_watch::LLM_ROUTE, kube_watch::LLM_PROVIDER],
                        None,
                    );
                    kube.wait_synced(Duration::from_secs(30))
                        .await
                        .map_err(|e| fail(2, e))?;
                    ResourceSource::Kube(kube)
                }
            };
            tracing::info!(node = %cfg.node_name, "enrolling this node's Pods labelled {}=enabled (or in a namespace so labelled)", kube_pods::CAPTURE_LABEL);
            (Box::new(pods), Some(resources))
        }
    };
    let initial = source.poll().map_err(|e| fail(2, e))?;
    let scope = Scope::new(cfg.trusted_namespaces.iter().cloned());
    let routes = Arc::new(routes::Routes::new(resources, scope).map_err(|problems| {
        let list: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        fail(
            2,
            anyhow::anyhow!("LLMRoute resources are not valid:\n  {}", list.join("\n  ")),
        )
    })?);
    let uplink = match &cfg.tunnel {
        Some(t) => Some(Arc::new(
            uplink::Uplink::new(t).map_err(|e| fail(2, anyhow::anyhow!("agent TLS: {e}")))?,
        )),
        None => None,
    };

    // Bind before touching the kernel so that a busy port fails cleanly.
    let mut listeners = Vec::new();
    for addr in &cfg.listen {
        let l = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr} for the capture proxy (is another agent running?)")
        })?;
        listeners.push(l);
    }
    let admin_listener = tokio::net::TcpListener::bind(cfg.admin)
        .await
        .with_context(|| format!("cannot listen on {} for the admin endpoint", cfg.admin))?;

    let capture = Arc::new(
        loader::Capture::install(&cfg.cgroup_root, &cfg.bpffs, cfg.advertise_v4, cfg.advertise_v6)
            .with_context(|| format!("installing capture on cgroup {}", cfg.cgroup_root.display()))?,
    );
    // Loading parsed the kernel's BTF and the programs' ELF (megabytes,
    // now freed): give them back rather than keep them for the agent's
    // life. The first trim runs at once.
    tokio::spawn(llm_egress_mesh::process::release_freed_memory());
    tracing::info!(
        attachment = ?capture.attachment, cgroup_root = %cfg.cgroup_root.display(), pin_dir = %cfg.bpffs.display(),
        advertise_v4 = ?cfg.advertise_v4, advertise_v6 = ?cfg.advertise_v6, "capture installed"
    );

    let registry = Arc::new(Registry::new(cfg.cgroup_root.clone(), source.as_ref()));
    let _ = registry.apply(Ok(initial), source.problems(), &capture);

    let targets = Arc::new(targets::Targets::new(
        &capture_hosts(&cfg.hosts, &routes.table()),
        cfg.ports.clone(),
    ));
    let metrics = Arc::new(metrics::Metrics::new(capture.clone()));
    let parts = proxy::ProxyParts {
        routes: routes.clone(),
        uplink,
        trust_domain: cfg.trust_domain.clone(),
        node_name: cfg.node_name.clone(),
        workload_limit: fairness::WorkloadLimit::new(args.max_connections_per_workload as usize),
    };
    let proxy = Arc::new(proxy::Proxy::new(
        capture.clone(),
        registry.clone(),
        targets.clone(),
        metrics.clone(),
        cfg.mode,
        parts,
    ));
    {
        // LLMRoute changes add or remove capture targets.
        let (routes, targets, extra) = (routes.clone(), targets.clone(), cfg.hosts.clone());
        let mut changes = routes.changes();
        tokio::spawn(async move {
            loop {
                match changes.as_mut() {
                    Some(rx) => {
                        let _ = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
                    }
                    None => tokio::time::sleep(Duration::from_secs(1)).await,
                }
                // Off the async workers: parsing 10,000s of resources takes
                // most of a second, and captured connections on the same
                // worker would stall for it.
                let checking = routes.clone();
                match tokio::task::spawn_blocking(move || checking.check()).await {
                    Ok(Some(table)) => targets.set_hosts(&capture_hosts(&extra, &table)),
                    Ok(None) => {}
                    Err(e) => {
                        routes.forget_stamp();
                        tracing::error!(error = %e, "checking the LLMRoute resources failed; keeping the previous routes and retrying");
                    }
                }
            }
        });
    }

    tokio::spawn(
        registry
            .clone()
            .run(source, capture.clone(), Duration::from_secs(1)),
    );
    tokio::spawn(targets.clone().run(capture.clone(), cfg.resolve));
    let admin_state = Arc::new(admin::AdminState {
        proxy: proxy.clone(),
        cgroup_root: cfg.cgroup_root.clone(),
        listen: cfg.listen.clone(),
        advertise: cfg.advertise_v4.into_iter().chain(cfg.advertise_v6).collect(),
        listening: false.into(),
    });
    let mut accept_loops = Vec::new();
    for l in listeners {
        tracing::info!(listen = %l.local_addr()?, mode = ?cfg.mode, "capture proxy listening");
        accept_loops.push(tokio::spawn(proxy.clone().serve(l)));
    }
    admin_state
        .listening
        .store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(admin = %cfg.admin, "admin endpoint listening");
    if let Some(addr) = args.health_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--health-listen)"))?;
        tracing::info!(health = %addr, metrics = args.health_metrics, "health endpoint listening");
        let router = admin::health_router(admin_state.clone(), args.health_metrics);
        tokio::spawn(async move {
            if let Err(e) = axum::serve(l, router).await {
                tracing::error!(error = %e, "health endpoint failed");
            }
        });
    }
    let admin = axum::serve(admin_listener, admin::router(admin_state));

    tokio::select! {
        r = admin => r.context("admin endpoint failed")?,
        _ = llm_egress_mesh::process::shutdown_signal() => {
            // Stop accepting, then let open connections finish.
            for l in &accept_loops {
                l.abort();
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(args.drain_seconds);
            while metrics.active.get() > 0 && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tracing::info!(open = metrics.active.get(), "shutting down; capture stays attached (pinned) and fails closed until an agent runs again");
        }
    }
    Ok(())
}

/// Hosts to capture: the configured ones plus every LLMRoute host.
fn capture_hosts(configured: &[String], table: &routes::RouteTable) -> Vec<String> {
    let mut hosts = configured.to_vec();
    hosts.extend(table.hosts().into_iter().filter(|h| !configured.contains(h)));
    hosts
}

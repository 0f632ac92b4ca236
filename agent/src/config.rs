//! Agent configuration: a YAML file, overridden field by field by flags.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use llm_egress_mesh::identity::SpiffeId;
use serde::Deserialize;

/// What the capture proxy does with a captured connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Tunnel each connection to the egress gateway over HTTP/2 mTLS, tagged
    /// with the workload's identity.
    #[default]
    Tunnel,
    /// Forward the bytes to the original destination (debugging; no gateway).
    Direct,
}

/// The YAML file given by `--config`. Every field is optional: flags fill in
/// or override. Unknown fields are errors so that typos do not go unnoticed.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileConfig {
    pub cgroup_root: Option<PathBuf>,
    pub bpffs: Option<PathBuf>,
    #[serde(default)]
    pub proxy: ProxyFileConfig,
    #[serde(default)]
    pub hosts: Vec<String>,
    pub ports: Option<Vec<u16>>,
    #[serde(default)]
    pub workloads: WorkloadsFileConfig,
    pub admin: Option<SocketAddr>,
    pub mode: Option<Mode>,
    /// Directory of LLMRoute resources: hosts to capture and, from each
    /// route's `mesh` rule, the gateway to tunnel to.
    pub resources: Option<PathBuf>,
    /// Gateway names (a mesh rule's providerHost) → tunnel address
    /// (`IP:PORT`, or `HOST:PORT` resolved at every connection).
    #[serde(default)]
    pub gateways: BTreeMap<String, String>,
    #[serde(default)]
    pub tls: TlsFileConfig,
    pub trust_domain: Option<String>,
    pub node_name: Option<String>,
    /// Namespaces trusted with LLMProviders, as given to the gateway
    /// (routes elsewhere may only route providers' hosts).
    pub trusted_namespaces: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TlsFileConfig {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    /// SPIFFE ID the gateway's certificate must carry.
    pub gateway_identity: Option<String>,
    /// Projected service-account token sent to bind this agent to its node.
    pub node_token_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProxyFileConfig {
    #[serde(default)]
    pub listen: Vec<SocketAddr>,
    #[serde(default)]
    pub advertise: Vec<SocketAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadsFileConfig {
    /// Path of a static workload file (see `registry`).
    #[serde(rename = "static")]
    pub static_file: Option<PathBuf>,
    /// Enroll this node's Pods by label, and read LLMRoutes, from the Kubernetes API.
    #[serde(default)]
    pub kubernetes: bool,
    /// kubeconfig for `kubernetes` (default: the pod's service account, then $KUBECONFIG).
    pub kubeconfig: Option<PathBuf>,
}

/// Where the agent learns which workloads to capture.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkloadsFrom {
    Static(PathBuf),
    Kubernetes { kubeconfig: Option<PathBuf> },
}

/// The effective configuration after merging file and flags.
#[derive(Debug, Clone)]
pub struct Config {
    pub cgroup_root: PathBuf,
    pub bpffs: PathBuf,
    pub listen: Vec<SocketAddr>,
    pub advertise_v4: Option<SocketAddr>,
    pub advertise_v6: Option<SocketAddr>,
    pub hosts: Vec<String>,
    pub ports: Vec<u16>,
    pub workloads: WorkloadsFrom,
    pub admin: SocketAddr,
    pub mode: Mode,
    pub resolve: ResolveTiming,
    pub resources: Option<PathBuf>,
    /// Set in tunnel mode.
    pub tunnel: Option<TunnelConfig>,
    pub trust_domain: String,
    pub node_name: String,
    pub trusted_namespaces: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct TunnelConfig {
    pub tls: llm_egress_mesh::tls::TlsFiles,
    pub gateways: BTreeMap<String, String>,
    /// The gateway must present this SPIFFE ID (its DNS name alone is not enough).
    pub gateway_identity: SpiffeId,
    pub node_token_file: Option<PathBuf>,
}

/// Bounds on how often targets are re-resolved: the record's TTL, clamped.
#[derive(Debug, Clone, Copy)]
pub struct ResolveTiming {
    pub min_refresh: Duration,
    pub max_refresh: Duration,
    pub retry: Duration,
}

impl Default for ResolveTiming {
    fn default() -> Self {
        ResolveTiming {
            min_refresh: Duration::from_secs(5),
            max_refresh: Duration::from_secs(300),
            retry: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {field}: {message}")]
    Invalid { field: &'static str, message: String },
}

/// Values given on the command line; `None`/empty means "not given".
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub cgroup_root: Option<PathBuf>,
    pub bpffs: Option<PathBuf>,
    pub listen: Vec<SocketAddr>,
    pub advertise: Vec<SocketAddr>,
    pub hosts: Vec<String>,
    pub ports: Vec<u16>,
    pub workloads_file: Option<PathBuf>,
    pub kubernetes: bool,
    pub kubeconfig: Option<PathBuf>,
    pub admin: Option<SocketAddr>,
    pub mode: Option<Mode>,
    pub resources: Option<PathBuf>,
    pub gateways: Vec<(String, String)>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub trust_bundle: Option<PathBuf>,
    pub trust_domain: Option<String>,
    pub node_name: Option<String>,
    pub trusted_namespaces: Vec<String>,
    pub gateway_identity: Option<String>,
    pub node_token_file: Option<PathBuf>,
}

pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup";
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/llm-egress";
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15021";
/// The gateway's service account in a default install (its SPIFFE ID is
/// what agents expect by default).
pub const DEFAULT_GATEWAY_SERVICE_ACCOUNT: &str = "istio-egressgateway-service-account";
/// The gateway's and Istio's root namespace in a default install.
pub const DEFAULT_TRUSTED_NAMESPACE: &str = "istio-system";

/// A tunnel address: `IP:PORT`, `[IPv6]:PORT` or `HOST:PORT`.
pub fn check_gateway_address(addr: &str) -> Result<(), String> {
    if addr.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("{addr:?} needs a port: HOST:PORT or IP:PORT"))?;
    let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'));
    if !port_ok || !host_ok {
        return Err(format!("{addr:?} is not HOST:PORT or IP:PORT"));
    }
    Ok(())
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
        if text.trim().is_empty() {
            return Ok(FileConfig::default());
        }
        serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }
}

impl Config {
    /// Merges flags over the file and checks the result.
    pub fn resolve(file: FileConfig, flags: Overrides) -> Result<Config, ConfigError> {
        let pick = |flag: Vec<SocketAddr>, file: Vec<SocketAddr>| if flag.is_empty() { file } else { flag };
        let listen = pick(flags.listen, file.proxy.listen);
        let advertise = pick(flags.advertise, file.proxy.advertise);
        let hosts = if flags.hosts.is_empty() {
            file.hosts
        } else {
            flags.hosts
        };
        let ports = if flags.ports.is_empty() {
            file.ports.unwrap_or_else(|| vec![80, 443])
        } else {
            flags.ports
        };

        let invalid = |field, message: String| ConfigError::Invalid { field, message };

        let mut advertise_v4 = None;
        let mut advertise_v6 = None;
        for addr in advertise {
            let slot = if addr.is_ipv4() {
                &mut advertise_v4
            } else {
                &mut advertise_v6
            };
            if slot.is_some() {
                return Err(invalid(
                    "proxy.advertise",
                    format!(
                        "more than one {} address; give at most one IPv4 and one IPv6 address",
                        if addr.is_ipv4() { "IPv4" } else { "IPv6" }
                    ),
                ));
            }
            if addr.ip().is_unspecified() || addr.port() == 0 {
                return Err(invalid(
                    "proxy.advertise",
                    format!("{addr} is not an address workloads can connect to; give the node IP as seen from pods and a non-zero port"),
                ));
            }
            *slot = Some(addr);
        }
        if advertise_v4.is_none() && advertise_v6.is_none() {
            return Err(invalid(
                "proxy.advertise",
                "missing: give the proxy address as seen from workloads (--proxy-advertise 10.0.0.1:15001)"
                    .into(),
            ));
        }
        let listen = if listen.is_empty() {
            // One socket per advertised port; with IPv6 a dual-stack [::]
            // socket serves both families.
            let mut ports: Vec<u16> = advertise_v4
                .iter()
                .chain(&advertise_v6)
                .map(|a| a.port())
                .collect();
            ports.dedup();
            let ip: std::net::IpAddr = if advertise_v6.is_some() {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            };
            ports.into_iter().map(|p| SocketAddr::new(ip, p)).collect()
        } else {
            listen
        };
        let resources = flags.resources.or(file.resources);
        let kubernetes = flags.kubernetes || file.workloads.kubernetes;
        if hosts.is_empty() && resources.is_none() && !kubernetes {
            return Err(invalid(
                "hosts",
                "no LLM hosts to capture; list at least one (--host dashscope.aliyuncs.com) or give LLMRoute resources (--resources DIR)".into(),
            ));
        }
        for host in &hosts {
            if host.trim().is_empty() || host.contains('/') || host.contains(' ') {
                return Err(invalid(
                    "hosts",
                    format!("{host:?} is not a host name or IP address"),
                ));
            }
        }
        if ports.is_empty() || ports.contains(&0) {
            return Err(invalid("ports", "ports must be non-empty and non-zero".into()));
        }
        let workloads_file = flags.workloads_file.or(file.workloads.static_file);
        let workloads = match (kubernetes, workloads_file) {
            (true, Some(_)) => {
                return Err(invalid(
                    "workloads",
                    "give either a static workload file (--workloads) or --kubernetes, not both".into(),
                ))
            }
            (true, None) => WorkloadsFrom::Kubernetes {
                kubeconfig: flags.kubeconfig.or(file.workloads.kubeconfig),
            },
            (false, Some(f)) => WorkloadsFrom::Static(f),
            (false, None) => {
                return Err(invalid(
                    "workloads.static",
                    "missing: give the static workload file (--workloads FILE), or --kubernetes to enroll this node's Pods by label".into(),
                ))
            }
        };

        let mode = flags.mode.or(file.mode).unwrap_or_default();
        let mut gateways = file.gateways;
        gateways.extend(flags.gateways);
        for (name, addr) in &gateways {
            check_gateway_address(addr).map_err(|why| invalid("gateways", format!("{name}: {why}")))?;
        }
        let tunnel = match mode {
            Mode::Direct => None,
            Mode::Tunnel => {
                let need = |v: Option<PathBuf>, field: &'static str, flag: &str| {
                    v.ok_or_else(|| {
                        invalid(
                            field,
                            format!("missing: tunnel mode needs the agent's mTLS files ({flag})"),
                        )
                    })
                };
                let tls = llm_egress_mesh::tls::TlsFiles {
                    cert: need(flags.tls_cert.or(file.tls.cert), "tls.cert", "--tls-cert")?,
                    key: need(flags.tls_key.or(file.tls.key), "tls.key", "--tls-key")?,
                    ca: need(flags.trust_bundle.or(file.tls.ca), "tls.ca", "--trust-bundle")?,
                };
                if gateways.is_empty() {
                    return Err(invalid(
                        "gateways",
                        "missing: map the egress gateway's name to its tunnel address (--gateway-address istio-egressgateway.istio-system.svc.cluster.local=10.0.0.5:15008)".into(),
                    ));
                }
                let trust_domain = flags
                    .trust_domain
                    .clone()
                    .or(file.trust_domain.clone())
                    .unwrap_or_else(|| "cluster.local".into());
                let gateway_identity = match flags.gateway_identity.or(file.tls.gateway_identity) {
                    Some(id) => {
                        SpiffeId::parse(&id).map_err(|e| invalid("tls.gatewayIdentity", e.to_string()))?
                    }
                    None => {
                        SpiffeId::workload(&trust_domain, "istio-system", DEFAULT_GATEWAY_SERVICE_ACCOUNT)
                    }
                };
                Some(TunnelConfig {
                    tls,
                    gateways,
                    gateway_identity,
                    node_token_file: flags.node_token_file.or(file.tls.node_token_file),
                })
            }
        };
        let node_name = flags.node_name.or(file.node_name);
        if kubernetes && node_name.is_none() {
            return Err(invalid(
                "nodeName",
                "missing: --kubernetes watches the Pods of this node; give --node-name (the DaemonSet sets NODE_NAME from spec.nodeName)".into(),
            ));
        }
        let node_name = node_name
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());

        Ok(Config {
            resources,
            tunnel,
            trust_domain: flags
                .trust_domain
                .or(file.trust_domain)
                .unwrap_or_else(|| "cluster.local".into()),
            node_name,
            trusted_namespaces: if flags.trusted_namespaces.is_empty() {
                file.trusted_namespaces
                    .unwrap_or_else(|| vec![DEFAULT_TRUSTED_NAMESPACE.into()])
            } else {
                flags.trusted_namespaces
            },
            cgroup_root: flags
                .cgroup_root
                .or(file.cgroup_root)
                .unwrap_or_else(|| DEFAULT_CGROUP_ROOT.into()),
            bpffs: flags.bpffs.or(file.bpffs).unwrap_or_else(|| DEFAULT_BPFFS.into()),
            listen,
            advertise_v4,
            advertise_v6,
            hosts,
            ports,
            workloads,
            admin: flags
                .admin
                .or(file.admin)
                .unwrap_or_else(|| DEFAULT_ADMIN.parse().expect("constant address")),
            mode,
            resolve: ResolveTiming::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
cgroupRoot: /sys/fs/cgroup/unified
bpffs: /sys/fs/bpf/test
proxy:
  listen: ["0.0.0.0:15001", "[::]:15001"]
  advertise: ["10.0.0.1:15001", "[fd00::1]:15001"]
hosts: [dashscope.aliyuncs.com, api.openai.com]
workloads:
  static: /etc/llm-egress/workloads.yaml
admin: 127.0.0.1:9000
mode: direct
"#;

    fn parse(text: &str) -> Result<FileConfig, ConfigError> {
        FileConfig::parse(Path::new("agent.yaml"), text)
    }

    #[test]
    fn full_file_parses_and_resolves() {
        let cfg = Config::resolve(parse(FULL).unwrap(), Overrides::default()).unwrap();
        assert_eq!(cfg.cgroup_root, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(cfg.listen.len(), 2);
        assert_eq!(cfg.advertise_v4, Some("10.0.0.1:15001".parse().unwrap()));
        assert_eq!(cfg.advertise_v6, Some("[fd00::1]:15001".parse().unwrap()));
        assert_eq!(cfg.hosts, ["dashscope.aliyuncs.com", "api.openai.com"]);
        assert_eq!(cfg.ports, [80, 443]);
        assert_eq!(cfg.admin, "127.0.0.1:9000".parse().unwrap());
    }

    #[test]
    fn flags_override_file() {
        let flags = Overrides {
            hosts: vec!["llm.example.test".into()],
            advertise: vec!["10.9.9.9:1".parse().unwrap()],
            ports: vec![8080],
            ..Default::default()
        };
        let cfg = Config::resolve(parse(FULL).unwrap(), flags).unwrap();
        assert_eq!(cfg.hosts, ["llm.example.test"]);
        assert_eq!(cfg.ports, [8080]);
        assert_eq!(cfg.advertise_v4, Some("10.9.9.9:1".parse().unwrap()));
        assert_eq!(cfg.advertise_v6, None);
    }

    #[test]
    fn unknown_field_is_named() {
        let err = parse("hosts: [a]\nproxxy: {}\n").unwrap_err().to_string();
        assert!(err.contains("agent.yaml"), "{err}");
        assert!(err.contains("proxxy"), "{err}");
    }

    #[test]
    fn wrong_type_names_field() {
        let err = parse("proxy:\n  advertise: [not-an-address]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("advertise"), "{err}");
    }

    #[test]
    fn missing_advertise_is_reported() {
        let err = Config::resolve(
            parse("mode: direct\nhosts: [a]\nworkloads: {static: /w}\n").unwrap(),
            Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("proxy.advertise"), "{err}");
    }

    #[test]
    fn unspecified_advertise_is_rejected() {
        let err = Config::resolve(
            parse("mode: direct\nhosts: [a]\nworkloads: {static: /w}\nproxy: {advertise: [\"0.0.0.0:15001\"]}\n").unwrap(),
            Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not an address workloads can connect to"), "{err}");
    }

    #[test]
    fn two_ipv4_advertise_addresses_are_rejected() {
        let flags = Overrides {
            advertise: vec!["10.0.0.1:1".parse().unwrap(), "10.0.0.2:1".parse().unwrap()],
            ..Default::default()
        };
        let err = Config::resolve(
            parse("mode: direct\nhosts: [a]\nworkloads: {static: /w}\n").unwrap(),
            flags,
        )
        .unwrap_err();
        assert!(err.to_string().contains("more than one IPv4"), "{err}");
    }

    #[test]
    fn no_hosts_is_reported() {
        let err = Config::resolve(
            parse("workloads: {static: /w}\nproxy: {advertise: [\"10.0.0.1:15001\"]}\n").unwrap(),
            Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("hosts"), "{err}");
    }

    #[test]
    fn listen_defaults_to_advertised_port() {
        let cfg = Config::resolve(
            parse("mode: direct\nhosts: [a]\nworkloads: {static: /w}\nproxy: {advertise: [\"10.0.0.1:16000\"]}\n").unwrap(),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(cfg.listen, vec!["0.0.0.0:16000".parse::<SocketAddr>().unwrap()]);
    }

    #[test]
    fn listen_is_dual_stack_with_ipv6() {
        let flags = Overrides {
            advertise: vec![
                "10.0.0.1:15001".parse().unwrap(),
                "[fd00::1]:15001".parse().unwrap(),
            ],
            ..Default::default()
        };
        let cfg = Config::resolve(
            parse("mode: direct\nhosts: [a]\nworkloads: {static: /w}\n").unwrap(),
            flags,
        )
        .unwrap();
        assert_eq!(cfg.listen, vec!["[::]:15001".parse::<SocketAddr>().unwrap()]);
    }

    #[test]
    fn the_documented_example_config_is_valid() {
        let text = include_str!("../../deploy/agent/agent.yaml");
        let cfg = Config::resolve(parse(text).unwrap(), Overrides::default()).unwrap();
        assert_eq!(cfg.mode, Mode::Tunnel);
        assert_eq!(cfg.resources, Some(PathBuf::from("deploy/examples")));
        assert_eq!(cfg.trusted_namespaces, ["istio-system"]);
        let tunnel = cfg.tunnel.unwrap();
        assert!(tunnel
            .gateways
            .contains_key("istio-egressgateway.istio-system.svc.cluster.local"));
        assert_eq!(
            tunnel.gateway_identity.to_string(),
            "spiffe://cluster.local/ns/istio-system/sa/istio-egressgateway-service-account"
        );
        assert_eq!(cfg.ports, [80, 443]);
    }

    #[test]
    fn a_bad_gateway_identity_is_a_configuration_error() {
        let text = include_str!("../../deploy/agent/agent.yaml")
            .replace("gatewayIdentity: spiffe://", "gatewayIdentity: https://");
        let err = Config::resolve(parse(&text).unwrap(), Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("tls.gatewayIdentity"), "{err}");
    }

    #[test]
    fn empty_file_is_all_defaults() {
        let file = parse("  \n").unwrap();
        assert!(file.hosts.is_empty());
    }
}

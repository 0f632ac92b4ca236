//! The node fixture's cluster DNS, standing in for CoreDNS (not packaged
//! here): answers `<service>.<namespace>.svc.<domain>` with the Service's
//! ClusterIP from the API server, and `--alias NAME=TARGET` names with
//! TARGET's answer (the test provider stands in for a provider's public
//! name). Anything else is NXDOMAIN: nothing is forwarded, so no lookup
//! leaves the node.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

use anyhow::Context;
use clap::Parser;
use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{rdata::A, Name, RData, Record, RecordType},
};
use k8s_openapi::api::core::v1::Service;
use kube::{api::Api, runtime::watcher, Client, ResourceExt};
use llm_egress_config::kube_watch::{spawn_reflector, Watched};

#[derive(Parser)]
#[command(about = "Cluster DNS for the llm-egress node fixture: Services' ClusterIPs, and aliases")]
struct Args {
    /// UDP address to answer on (the kubelet's clusterDNS).
    #[arg(long)]
    listen: SocketAddr,
    /// Kubeconfig for reading Services.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// The cluster domain.
    #[arg(long, default_value = "cluster.local")]
    domain: String,
    /// NAME=TARGET: answer NAME as TARGET (a Service name) is answered (repeatable).
    #[arg(long = "alias", value_parser = parse_alias)]
    aliases: Vec<(String, String)>,
}

fn parse_alias(s: &str) -> Result<(String, String), String> {
    let (name, target) = s
        .split_once('=')
        .ok_or_else(|| format!("--alias {s:?}: expected NAME=TARGET"))?;
    Ok((normalize(name), normalize(target)))
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Seconds resolvers may cache an answer: short, as Services come and go.
const TTL: u32 = 5;

struct Zone {
    domain: String,
    aliases: HashMap<String, String>,
    services: Watched<Service>,
}

impl Zone {
    /// The address `name` stands for: `Ok(None)` for a known name without
    /// an IPv4 address (headless), `Err(())` for an unknown name.
    fn lookup(&self, name: &str) -> Result<Option<Ipv4Addr>, ()> {
        let name = self.aliases.get(name).map(String::as_str).unwrap_or(name);
        let suffix = format!(".svc.{}", self.domain);
        let (service, namespace) = name
            .strip_suffix(&suffix)
            .and_then(|rest| rest.split_once('.'))
            .ok_or(())?;
        let found = self
            .services
            .store
            .state()
            .into_iter()
            .find(|s| s.name_any() == service && s.namespace().as_deref() == Some(namespace))
            .ok_or(())?;
        Ok(found
            .spec
            .as_ref()
            .and_then(|s| s.cluster_ip.as_deref())
            .and_then(|ip| ip.parse::<IpAddr>().ok())
            .and_then(|ip| match ip {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            }))
    }

    fn answer(&self, query: &Message) -> Message {
        let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
        reply.metadata.message_type = MessageType::Response;
        reply.metadata.authoritative = true;
        reply.metadata.recursion_desired = query.metadata.recursion_desired;
        let Some(q) = query.queries.first() else {
            reply.metadata.response_code = ResponseCode::FormErr;
            return reply;
        };
        reply.add_query(q.clone());
        let name = normalize(&q.name().to_ascii());
        match self.lookup(&name) {
            Err(()) => reply.metadata.response_code = ResponseCode::NXDomain,
            Ok(Some(ip)) if q.query_type() == RecordType::A => {
                let owner: Name = q.name().clone();
                reply.add_answer(Record::from_rdata(owner, TTL, RData::A(A(ip))));
            }
            // A known name: no records of this type (NODATA), so the
            // resolver goes on with the A answer.
            Ok(_) => {}
        }
        reply
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let kubeconfig = kube::config::Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading {}", args.kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    let client = Client::try_from(config)?;
    let (tx, _changed) = tokio::sync::watch::channel(0u64);
    let services = spawn_reflector(
        "Services".into(),
        Api::<Service>::all(client),
        watcher::Config::default(),
        (),
        tx,
    );
    let zone = Arc::new(Zone {
        domain: normalize(&args.domain),
        aliases: args.aliases.into_iter().collect(),
        services,
    });
    let socket = tokio::net::UdpSocket::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    println!("answering on {}", args.listen);
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from) = socket.recv_from(&mut buf).await?;
        let Ok(query) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        if query.metadata.message_type != MessageType::Query {
            continue;
        }
        if let Ok(bytes) = zone.answer(&query).to_vec() {
            let _ = socket.send_to(&bytes, from).await;
        }
    }
}

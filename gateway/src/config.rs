//! The gateway's configuration: the resources of a directory, compiled for
//! this gateway (its namespace and labels), swapped in atomically on change.
//! An invalid change keeps the last good configuration and is reported.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use llm_egress_config::{
    resources::{LlmProviderSpec, Named, Problem, RequestAuthenticationSpec, ResourceSet, Severity},
    scope::Scope,
    source::{ResourceSource, Stamp},
};

use crate::{
    policy::{budget::Budget, index::PolicyIndex},
    route::Routes,
    secrets::{self, KeyPolicy, Secret},
};

/// Who this gateway is, for selectors and policy scoping.
#[derive(Debug, Clone)]
pub struct GatewayIdentity {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// Istio's root namespace: its policies apply to every workload.
    pub root_namespace: String,
    /// More namespaces trusted with providers (and keys), beyond the
    /// gateway's own and the root namespace.
    pub trusted_namespaces: Vec<String>,
    /// Where provider keys may come from.
    pub keys: KeyPolicy,
}

impl GatewayIdentity {
    /// Which namespaces may publish what (see `llm_egress_config::scope`).
    pub fn scope(&self) -> Scope {
        Scope::new(
            [self.namespace.clone(), self.root_namespace.clone()]
                .into_iter()
                .chain(self.trusted_namespaces.iter().cloned()),
        )
    }
}

/// A provider with its key resolved.
#[derive(Debug, Clone)]
pub struct Provider {
    pub name: String,
    pub host: String,
    pub path: String,
    pub model: Option<String>,
    pub stream: Option<bool>,
    pub key: Secret,
}

/// Everything a request needs, derived from one consistent resource set.
#[derive(Debug, Default)]
pub struct Compiled {
    /// `namespace/name` of the Gateway resources that select this gateway.
    pub gateway_names: Vec<String>,
    pub routes: Routes,
    /// By provider host.
    pub providers: BTreeMap<String, Provider>,
    /// Policies that apply to this gateway, in file order, indexed by peer.
    pub policies: PolicyIndex,
    pub authentications: Vec<Named<RequestAuthenticationSpec>>,
    /// Token budgets, from every namespace (a tenant's binds only its own).
    pub budgets: Vec<Budget>,
    /// Warnings kept for `/readyz` and `validate`.
    pub warnings: Vec<Problem>,
}

fn selects(selector: Option<&BTreeMap<String, String>>, labels: &BTreeMap<String, String>) -> bool {
    selector.is_none_or(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// Compiles a resource set for `me`; errors mean the set must not be used.
pub fn compile(
    set: ResourceSet,
    mut problems: Vec<Problem>,
    me: &GatewayIdentity,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Compiled, Vec<Problem>> {
    let scoped = |ns: &str| ns == me.namespace || ns == me.root_namespace;
    let mut compiled = Compiled::default();
    for g in &set.gateways {
        if !g.spec.selector.is_empty() && selects(Some(&g.spec.selector), &me.labels) {
            compiled
                .gateway_names
                .push(format!("{}/{}", g.meta.namespace(), g.meta.name));
        }
    }
    for p in set.providers {
        if !selects(p.spec.workload_selector.as_ref().map(|s| &s.labels), &me.labels) {
            continue;
        }
        let cfg = &p.spec.configs.default_config.open_ai_config;
        match secrets::resolve(&cfg.api_key, &me.keys, &env) {
            Ok(key) => {
                let LlmProviderSpec { host, path, .. } = p.spec.clone();
                compiled.providers.insert(
                    host.to_ascii_lowercase(),
                    Provider {
                        name: format!("{}/{}", p.meta.namespace(), p.meta.name),
                        host,
                        path,
                        model: cfg.model.clone(),
                        stream: cfg.stream,
                        key,
                    },
                );
            }
            Err(e) => problems.push(Problem {
                severity: Severity::Error,
                file: p.file.clone(),
                resource: Some(format!("LLMProvider {}/{}", p.meta.namespace(), p.meta.name)),
                field: Some("spec.configs.defaultConfig.openAIConfig.apiKey".into()),
                message: e.to_string(),
            }),
        }
    }
    compiled.routes = Routes::new(set.routes, &compiled.gateway_names);
    compiled.policies = PolicyIndex::new(
        set.policies
            .into_iter()
            .filter(|p| {
                scoped(p.meta.namespace())
                    && selects(p.spec.selector.as_ref().map(|s| &s.match_labels), &me.labels)
            })
            .collect(),
    );
    compiled.authentications = set
        .authentications
        .into_iter()
        .filter(|a| {
            scoped(a.meta.namespace())
                && selects(a.spec.selector.as_ref().map(|s| &s.match_labels), &me.labels)
        })
        .collect();
    let scope = me.scope();
    compiled.budgets = set
        .budgets
        .iter()
        .filter_map(|b| Budget::compile(b, scope.is_trusted(b.meta.namespace())))
        .collect();
    if problems.iter().any(|p| p.severity == Severity::Error) {
        return Err(problems);
    }
    compiled.warnings = problems;
    Ok(compiled)
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReloadStatus {
    pub loaded: bool,
    pub reloads: u64,
    pub failures: u64,
    /// Problems of the last failed attempt (empty once a load succeeds).
    pub last_errors: Vec<String>,
    pub warnings: Vec<String>,
}

pub struct ConfigSource {
    source: ResourceSource,
    me: GatewayIdentity,
    current: ArcSwap<Compiled>,
    status: Mutex<ReloadStatus>,
    /// The resources (and referenced key files) as last loaded.
    stamp: Mutex<Stamp>,
    key_files: Mutex<Vec<PathBuf>>,
}

/// Loaded and compiled resources, and the key files they read.
pub type Loaded = (Compiled, Vec<PathBuf>);

/// Loads and compiles the resources once. From the API, `${NAME}` keys come
/// from the watched Secret only; from a directory, from the environment.
pub fn load(source: &ResourceSource, me: &GatewayIdentity) -> Result<Loaded, Vec<Problem>> {
    let (set, problems) = source.load(&me.scope())?;
    let key_files = set
        .providers
        .iter()
        .filter_map(|p| secrets::referenced_file(&p.spec.configs.default_config.open_ai_config.api_key))
        .collect();
    let kube = source.kube();
    compile(set, problems, me, |k| match kube {
        Some(kr) => kr.secret_value(k),
        None => std::env::var(k).ok(),
    })
    .map(|c| (c, key_files))
}

impl ConfigSource {
    /// From a directory the first load must succeed. From the API the gateway
    /// starts anyway, not ready, until a configuration compiles: a bad
    /// resource must not keep a restarted gateway down.
    pub fn new(source: ResourceSource, me: GatewayIdentity) -> Result<Arc<ConfigSource>, Vec<Problem>> {
        let stamp = source.stamp(&[]);
        let (compiled, key_files, status) = match load(&source, &me) {
            Ok((compiled, key_files)) => {
                let status = ReloadStatus {
                    loaded: true,
                    warnings: compiled.warnings.iter().map(|w| w.to_string()).collect(),
                    ..Default::default()
                };
                for w in &compiled.warnings {
                    tracing::warn!(problem = %w, "configuration warning");
                }
                (compiled, key_files, status)
            }
            Err(problems) if source.kube().is_some() => {
                for p in &problems {
                    tracing::error!(problem = %p, "configuration from the Kubernetes API is not valid; not ready until it is");
                }
                let status = ReloadStatus {
                    failures: 1,
                    last_errors: problems.iter().map(|p| p.to_string()).collect(),
                    ..Default::default()
                };
                (Compiled::default(), Vec::new(), status)
            }
            Err(problems) => return Err(problems),
        };
        let stamp = if key_files.is_empty() {
            stamp
        } else {
            source.stamp(&key_files)
        };
        Ok(Arc::new(ConfigSource {
            source,
            me,
            current: ArcSwap::from_pointee(compiled),
            status: Mutex::new(status),
            stamp: Mutex::new(stamp),
            key_files: Mutex::new(key_files),
        }))
    }

    pub fn current(&self) -> Arc<Compiled> {
        self.current.load_full()
    }

    pub fn status(&self) -> ReloadStatus {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Kubernetes collections that currently fail to watch (what was last
    /// seen stays in force).
    pub fn watch_errors(&self) -> Vec<String> {
        self.source.kube().map(|k| k.watch_errors()).unwrap_or_default()
    }

    /// Reloads if anything changed. Returns `Some(ok)` when it tried.
    pub fn check(&self) -> Option<bool> {
        let key_files = self.key_files.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let now = self.source.stamp(&key_files);
        {
            let mut stamp = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
            if *stamp == now {
                return None;
            }
            *stamp = now;
        }
        // Loaded before the status is locked: `/readyz` reads the status
        // from an async worker while a large configuration loads.
        let loaded = load(&self.source, &self.me);
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        match loaded {
            Ok((compiled, key_files)) => {
                status.loaded = true;
                status.reloads += 1;
                status.last_errors.clear();
                status.warnings = compiled.warnings.iter().map(|w| w.to_string()).collect();
                tracing::info!(
                    policies = compiled.policies.len(),
                    routes = compiled.routes.len(),
                    providers = compiled.providers.len(),
                    "configuration reloaded"
                );
                self.current.store(Arc::new(compiled));
                *self.key_files.lock().unwrap_or_else(|p| p.into_inner()) = key_files;
                Some(true)
            }
            Err(problems) => {
                status.failures += 1;
                status.last_errors = problems.iter().map(|p| p.to_string()).collect();
                for p in &problems {
                    tracing::error!(problem = %p, "configuration change rejected; keeping the last good configuration");
                }
                Some(false)
            }
        }
    }

    /// Checks every `period`, and at once when the API reports a change;
    /// writes per-object verdicts to the API's resources.
    /// `on_result` gets whether a change was applied and how long reading,
    /// checking and compiling took.
    pub fn watch(self: &Arc<Self>, period: Duration, on_result: impl Fn(bool, Duration) + Send + 'static) {
        let this = Arc::downgrade(self);
        let mut changes = self.source.kube().map(|k| k.subscribe());
        tokio::spawn(async move {
            loop {
                match changes.as_mut() {
                    Some(rx) => {
                        // Coalesce bursts (a list after a restart is many events).
                        let _ = tokio::time::timeout(period, rx.changed()).await;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    None => tokio::time::sleep(period).await,
                }
                let Some(this) = this.upgrade() else { return };
                let started = std::time::Instant::now();
                // Off the async workers: reading and compiling 10,000s of
                // resources takes most of a second, and requests on the same
                // worker would wait for it.
                let checking = this.clone();
                let checked = match tokio::task::spawn_blocking(move || checking.check()).await {
                    Ok(checked) => checked,
                    Err(e) => {
                        // Forget the stamp so that the next tick tries again.
                        *this.stamp.lock().unwrap_or_else(|p| p.into_inner()) = Stamp::Unknown;
                        tracing::error!(error = %e, "checking the configuration failed; keeping the last good configuration and retrying");
                        None
                    }
                };
                if let Some(ok) = checked {
                    on_result(ok, started.elapsed());
                }
                if let Some(kube) = this.source.kube() {
                    kube.report().await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    pub fn seed_identity() -> GatewayIdentity {
        GatewayIdentity {
            namespace: "istio-system".into(),
            labels: BTreeMap::from([("istio".into(), "egressgateway".into())]),
            root_namespace: "istio-system".into(),
            trusted_namespaces: Vec::new(),
            keys: KeyPolicy::default(),
        }
    }

    const SEEDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples");

    #[test]
    fn seed_compiles_for_the_egress_gateway() {
        let (set, problems) = ResourceSet::load_dir(Path::new(SEEDS)).unwrap();
        let c = compile(set, problems, &seed_identity(), |k| {
            (k == "API_KEY").then(|| "sk-seed".into())
        })
        .unwrap();
        assert_eq!(c.gateway_names, ["istio-system/egress-gw"]);
        let p = &c.providers["dashscope.aliyuncs.com"];
        assert_eq!(p.key.expose(), "sk-seed");
        assert_eq!(p.model.as_deref(), Some("qwen1.5-72b-chat"));
        assert_eq!(c.policies.len(), 1);
    }

    #[test]
    fn missing_key_fails_compilation_and_names_the_field() {
        let (set, problems) = ResourceSet::load_dir(Path::new(SEEDS)).unwrap();
        let errs = compile(set, problems, &seed_identity(), |_| None).unwrap_err();
        assert_eq!(
            errs[0].field.as_deref(),
            Some("spec.configs.defaultConfig.openAIConfig.apiKey")
        );
        assert!(errs[0].message.contains("API_KEY"));
    }

    #[test]
    fn a_tenant_provider_is_left_out_before_its_key_is_ever_looked_up() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["egress-gw.yaml", "dashscope-qwen.yaml", "dashscope-route.yaml"] {
            std::fs::copy(Path::new(SEEDS).join(f), dir.path().join(f)).unwrap();
        }
        std::fs::write(
            dir.path().join("tenant.yaml"),
            "apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMProvider\nmetadata: {name: exfil, namespace: team-a}\nspec:\n  host: attacker.example\n  configs: {defaultConfig: {openAIConfig: {apiKey: '${HOME}'}}}\n---\napiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata: {name: exfil, namespace: team-a}\nspec:\n  host: attacker.example\n  rules: [{backendRefs: [{providerHost: attacker.example}]}]\n",
        )
        .unwrap();
        let looked_up = Mutex::new(Vec::new());
        let (set, problems) = ResourceSource::Dir(dir.path().to_owned())
            .load(&seed_identity().scope())
            .unwrap();
        let c = compile(set, problems, &seed_identity(), |k| {
            looked_up.lock().unwrap().push(k.to_string());
            (k == "API_KEY").then(|| "sk-seed".into())
        })
        .unwrap();
        assert_eq!(*looked_up.lock().unwrap(), ["API_KEY"]);
        assert_eq!(c.providers.keys().collect::<Vec<_>>(), ["dashscope.aliyuncs.com"]);
        assert_eq!(c.routes.len(), 1);
        let warnings: Vec<String> = c.warnings.iter().map(|w| w.to_string()).collect();
        assert!(
            warnings.iter().any(|w| w.contains("LLMProvider team-a/exfil")),
            "{warnings:?}"
        );
        assert!(
            warnings.iter().any(|w| w.contains("LLMRoute team-a/exfil")),
            "{warnings:?}"
        );
    }

    #[test]
    fn policies_of_other_gateways_and_namespaces_do_not_apply() {
        let mut set = ResourceSet::default();
        let p = set.add_text(
            Path::new("p.yaml"),
            "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: other-sel, namespace: istio-system}\nspec:\n  selector: {matchLabels: {istio: ingressgateway}}\n  action: DENY\n  rules: [{}]\n---\napiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: other-ns, namespace: default}\nspec:\n  action: DENY\n  rules: [{}]\n---\napiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: mine, namespace: istio-system}\nspec:\n  action: DENY\n  rules: [{}]\n",
        );
        let c = compile(set, p, &seed_identity(), |_| None).unwrap();
        let names: Vec<_> = c.policies.iter().map(|p| p.meta.name.as_str()).collect();
        assert_eq!(names, ["mine"]);
    }

    #[test]
    fn invalid_change_keeps_last_good_configuration() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            Path::new(SEEDS).join("egress-gw.yaml"),
            dir.path().join("egress-gw.yaml"),
        )
        .unwrap();
        // In the trusted namespace: a route there needs no provider to be accepted.
        let route = std::fs::read_to_string(Path::new(SEEDS).join("dashscope-route.yaml")).unwrap();
        let route = route.replace(
            "name: dashscope-route",
            "name: dashscope-route\n  namespace: istio-system",
        );
        std::fs::write(dir.path().join("dashscope-route.yaml"), route).unwrap();
        let src = ConfigSource::new(ResourceSource::Dir(dir.path().to_owned()), seed_identity()).unwrap();
        assert_eq!(src.check(), None);
        std::fs::write(dir.path().join("bad.yaml"), "apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata: {name: x}\nspec: {rules: []}\n").unwrap();
        assert_eq!(src.check(), Some(false));
        assert_eq!(src.current().routes.len(), 1);
        let st = src.status();
        assert_eq!(st.failures, 1);
        assert!(st.last_errors[0].contains("bad.yaml"), "{st:?}");
        std::fs::remove_file(dir.path().join("bad.yaml")).unwrap();
        std::fs::copy(
            Path::new(SEEDS).join("authpolicy.yaml"),
            dir.path().join("authpolicy.yaml"),
        )
        .unwrap();
        assert_eq!(src.check(), Some(true));
        assert_eq!(src.current().policies.len(), 1);
        assert!(src.status().last_errors.is_empty());
    }
}

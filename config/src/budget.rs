//! `LLMTokenBudget` (llm-egress.io/v1alpha1): how many tokens a set of
//! callers may spend per window, charged before a request is forwarded.
//!
//! ```yaml
//! apiVersion: llm-egress.io/v1alpha1
//! kind: LLMTokenBudget
//! metadata: {name: team-a, namespace: istio-system}
//! spec:
//!   selector:
//!     namespaces: [team-a]
//!   tokens: 100000
//!   window: 1h
//!   per: Principal
//!   defaultMaxTokens: 1024
//! ```
//!
//! A budget outside the trusted namespaces applies only to the workloads of
//! its own namespace (the gateway enforces that), so a tenant can limit
//! itself but never another tenant.

use std::time::Duration;

use serde::Deserialize;

use crate::resources::{Named, Problem, Severity};

/// Longest window: a budget is a rate, not a quota for all time.
pub const MAX_WINDOW: Duration = Duration::from_secs(31 * 24 * 3600);

#[derive(Debug, Clone, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LlmTokenBudgetSpec {
    /// Who the budget applies to; every listed field must match (any of its
    /// values). Empty: every caller.
    #[serde(default)]
    pub selector: BudgetSelector,
    /// Only requests for these models count (the model sent to the
    /// provider). Empty: every model.
    #[serde(default)]
    pub models: Vec<String>,
    /// Tokens (prompt and completion) allowed per window.
    #[schemars(range(min = 1))]
    pub tokens: u64,
    /// Window length: a whole number of seconds, minutes, hours or days
    /// (`30s`, `1m`, `1h`, `1d`). Windows are fixed, aligned to the epoch.
    #[schemars(regex(pattern = r"^[1-9][0-9]*[smhd]$"))]
    pub window: String,
    /// Whose tokens count together.
    #[serde(default)]
    pub per: BudgetKey,
    /// Completion tokens reserved, and sent to the provider as the request's
    /// limit, when a request sets none. Default 4096.
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub default_max_tokens: Option<u64>,
}

/// Completion tokens reserved for a request that sets no limit.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Istio's forms for each value: exact, `prefix*`, `*suffix`, `*`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BudgetSelector {
    /// Workload principals, `cluster.local/ns/<ns>/sa/<sa>`.
    #[serde(default)]
    pub principals: Vec<String>,
    /// Workload namespaces.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Verified JWT principals, `<iss>/<sub>`.
    #[serde(default)]
    pub request_principals: Vec<String>,
}

/// Whose tokens are counted together.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub enum BudgetKey {
    /// Each workload identity has its own budget.
    #[default]
    Principal,
    /// Each verified JWT principal has its own budget (requests without one
    /// share one).
    RequestPrincipal,
    /// Everyone the selector matches shares one budget.
    Budget,
}

/// `30s`, `5m`, `1h`, `1d`.
pub fn parse_window(text: &str) -> Result<Duration, String> {
    let unit = text.chars().last().ok_or("empty")?;
    let seconds = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86400,
        _ => return Err(format!("{text:?} needs a unit: s, m, h or d (e.g. 1h)")),
    };
    let n: u64 = text[..text.len() - 1]
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number followed by s, m, h or d"))?;
    let d = Duration::from_secs(n.saturating_mul(seconds));
    if d.is_zero() || d > MAX_WINDOW {
        return Err(format!("{text:?} must be between 1s and 31d"));
    }
    Ok(d)
}

/// What the types alone cannot check.
pub fn validate(budgets: &[Named<LlmTokenBudgetSpec>], out: &mut Vec<Problem>) {
    for b in budgets {
        let mut err = |field: &str, message: String| {
            out.push(Problem {
                severity: Severity::Error,
                file: b.file.clone(),
                resource: Some(format!("LLMTokenBudget {}/{}", b.meta.namespace(), b.meta.name)),
                field: Some(field.into()),
                message,
            })
        };
        if let Err(e) = parse_window(&b.spec.window) {
            err("spec.window", e);
        }
        if b.spec.tokens == 0 {
            err("spec.tokens", "must be at least 1".into());
        }
        match b.spec.default_max_tokens {
            Some(0) => err("spec.defaultMaxTokens", "must be at least 1".into()),
            Some(n) if n > b.spec.tokens => err(
                "spec.defaultMaxTokens",
                format!(
                    "{n} is more than the budget's {} tokens: no request without max_tokens could ever fit",
                    b.spec.tokens
                ),
            ),
            _ => {}
        }
        let s = &b.spec.selector;
        for (name, values) in [
            ("principals", &s.principals),
            ("namespaces", &s.namespaces),
            ("requestPrincipals", &s.request_principals),
        ] {
            if let Some(i) = values.iter().position(|v| v.is_empty()) {
                err(&format!("spec.selector.{name}[{i}]"), "must not be empty".into());
            }
        }
        if let Some(i) = b.spec.models.iter().position(|m| m.is_empty()) {
            err(&format!("spec.models[{i}]"), "must not be empty".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::ResourceSet;

    fn load(text: &str) -> (ResourceSet, Vec<Problem>) {
        let mut set = ResourceSet::default();
        let mut problems = set.add_text(std::path::Path::new("b.yaml"), text);
        problems.extend(set.validate());
        (set, problems)
    }

    const GOOD: &str = "apiVersion: llm-egress.io/v1alpha1\nkind: LLMTokenBudget\nmetadata: {name: team-a, namespace: istio-system}\nspec:\n  selector: {namespaces: [team-a]}\n  models: [qwen-turbo]\n  tokens: 1000\n  window: 1h\n  per: RequestPrincipal\n  defaultMaxTokens: 100\n";

    #[test]
    fn a_budget_loads_with_every_field() {
        let (set, problems) = load(GOOD);
        assert!(problems.is_empty(), "{problems:?}");
        let b = &set.budgets[0].spec;
        assert_eq!(b.selector.namespaces, ["team-a"]);
        assert_eq!(b.per, BudgetKey::RequestPrincipal);
        assert_eq!(parse_window(&b.window), Ok(Duration::from_secs(3600)));
        assert_eq!(b.default_max_tokens, Some(100));
    }

    #[test]
    fn bad_budgets_name_the_field() {
        for (change, field) in [
            (("window: 1h", "window: 1 hour"), "spec.window"),
            (("window: 1h", "window: 0s"), "spec.window"),
            (("window: 1h", "window: 400d"), "spec.window"),
            (("tokens: 1000", "tokens: 0"), "spec.tokens"),
            (
                ("defaultMaxTokens: 100", "defaultMaxTokens: 5000"),
                "spec.defaultMaxTokens",
            ),
            (("per: RequestPrincipal", "per: Team"), "spec.per"),
            (("models: [qwen-turbo]", "modelz: [qwen-turbo]"), "spec"),
            (
                ("namespaces: [team-a]", "namespaces: ['']"),
                "spec.selector.namespaces[0]",
            ),
        ] {
            let (_, problems) = load(&GOOD.replace(change.0, change.1));
            assert!(
                problems
                    .iter()
                    .any(|p| p.field.as_deref().is_some_and(|f| f.starts_with(field))),
                "{change:?}: {problems:?}"
            );
        }
        let (_, problems) = load(&GOOD.replace("llm-egress.io/v1alpha1", "istio.alibabacloud.com/v1beta1"));
        assert!(
            problems
                .iter()
                .any(|p| p.message.contains("llm-egress.io/v1alpha1")),
            "{problems:?}"
        );
    }

    #[test]
    fn windows() {
        assert_eq!(parse_window("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_window("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_window("1d"), Ok(Duration::from_secs(86400)));
        assert!(parse_window("").is_err());
        assert!(parse_window("h").is_err());
        assert!(parse_window("-1h").is_err());
        assert!(parse_window("99999999999999999999d").is_err());
    }
}

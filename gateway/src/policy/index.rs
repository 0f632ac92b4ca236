//! The policies that apply to this gateway, indexed by the peer they can
//! match, so that deciding a request looks at the few policies that could
//! match it rather than walking all of them: with 10,000 per-tenant
//! policies a walk costs about a millisecond of CPU per request, most of it
//! waiting on memory.
//!
//! A policy is filed under exact principals or namespaces only when each
//! of its sources requires one of them; any other policy (a `from`-less
//! rule, a wildcard, a source that names neither) is a candidate for every
//! request. Candidates keep file order, which decides the DENY that is
//! reported and the order external authorizers are asked in.

use std::collections::HashMap;

use llm_egress_config::resources::{Action, AuthorizationPolicySpec, Named, Source};

use super::authz::Attributes;

/// A peer key a policy can be filed under.
enum PeerKey<'a> {
    Principal(&'a str),
    Namespace(&'a str),
}

fn exact(pattern: &str) -> bool {
    !pattern.starts_with('*') && !pattern.ends_with('*')
}

/// The exact values a source requires of the peer, or `None` when it could
/// match a peer whatever its principal and namespace are.
fn source_keys(s: &Source) -> Option<Vec<PeerKey<'_>>> {
    fn all_exact(v: &Option<Vec<String>>) -> Option<&Vec<String>> {
        v.as_ref().filter(|vs| vs.iter().all(|p| exact(p)))
    }
    if let Some(principals) = all_exact(&s.principals) {
        return Some(principals.iter().map(|p| PeerKey::Principal(p)).collect());
    }
    all_exact(&s.namespaces).map(|ns| ns.iter().map(|n| PeerKey::Namespace(n)).collect())
}

/// Every peer key under which `p` can match, or `None` when it can match
/// any peer. A policy without rules matches nothing: no keys.
fn policy_keys(p: &AuthorizationPolicySpec) -> Option<Vec<PeerKey<'_>>> {
    let mut keys = Vec::new();
    for rule in p.rules.iter().flatten() {
        if rule.from.is_empty() {
            return None;
        }
        for from in &rule.from {
            keys.extend(source_keys(&from.source)?);
        }
    }
    Some(keys)
}

#[derive(Debug, Default)]
pub struct PolicyIndex {
    /// In file order.
    policies: Vec<Named<AuthorizationPolicySpec>>,
    by_principal: HashMap<String, Vec<u32>>,
    by_namespace: HashMap<String, Vec<u32>>,
    /// Policies that may match any peer.
    any_peer: Vec<u32>,
    has_allow: bool,
}

impl PolicyIndex {
    pub fn new(policies: Vec<Named<AuthorizationPolicySpec>>) -> PolicyIndex {
        let mut index = PolicyIndex {
            has_allow: policies.iter().any(|p| p.spec.action == Action::Allow),
            ..Default::default()
        };
        for (i, p) in policies.iter().enumerate() {
            let i = i as u32;
            let Some(keys) = policy_keys(&p.spec) else {
                index.any_peer.push(i);
                continue;
            };
            for key in keys {
                let (map, value) = match key {
                    PeerKey::Principal(v) => (&mut index.by_principal, v),
                    PeerKey::Namespace(v) => (&mut index.by_namespace, v),
                };
                let list = map.entry(value.to_string()).or_default();
                // A policy naming one value twice is filed once.
                if list.last() != Some(&i) {
                    list.push(i);
                }
            }
        }
        index.policies = policies;
        index
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Named<AuthorizationPolicySpec>> {
        self.policies.iter()
    }

    /// Whether any ALLOW policy applies to this gateway: then a request
    /// must match one of them.
    pub fn has_allow(&self) -> bool {
        self.has_allow
    }

    /// The policies that could match a request from this peer, in file
    /// order; every other policy cannot.
    pub fn candidates<'s>(
        &'s self,
        a: &Attributes,
    ) -> impl Iterator<Item = &'s Named<AuthorizationPolicySpec>> {
        let filed = |map: &'s HashMap<String, Vec<u32>>, key: Option<&str>| -> &'s [u32] {
            key.and_then(|k| map.get(k)).map_or(&[], Vec::as_slice)
        };
        let lists = [
            self.any_peer.as_slice(),
            filed(&self.by_principal, a.principal),
            filed(&self.by_namespace, a.namespace),
        ];
        MergedIds(lists).map(|i| &self.policies[i as usize])
    }
}

/// The union of ascending id lists, ascending and without repeats; no
/// allocation per request.
struct MergedIds<'a>([&'a [u32]; 3]);

impl Iterator for MergedIds<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        let lowest = self.0.iter().filter_map(|l| l.first()).min().copied()?;
        for list in &mut self.0 {
            if list.first() == Some(&lowest) {
                *list = &list[1..];
            }
        }
        Some(lowest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_egress_config::resources::ResourceSet;
    use std::path::Path;

    fn index(yaml: &str) -> PolicyIndex {
        let mut set = ResourceSet::default();
        let problems = set.add_text(Path::new("t.yaml"), yaml);
        assert!(problems.is_empty(), "{problems:?}");
        PolicyIndex::new(set.policies)
    }

    fn policy(name: &str, action: &str, rules: &str) -> String {
        format!("apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: istio-system}}\nspec:\n  action: {action}\n  rules: {rules}\n---\n")
    }

    fn names(ix: &PolicyIndex, principal: Option<&str>, namespace: Option<&str>) -> Vec<String> {
        let a = Attributes {
            principal,
            namespace,
            host: "h",
            ..Default::default()
        };
        ix.candidates(&a).map(|p| p.meta.name.clone()).collect()
    }

    #[test]
    fn exact_peers_are_filed_and_the_rest_apply_to_everyone() {
        let yaml = [
            policy("by-sa", "DENY", "[{from: [{source: {principals: [cluster.local/ns/a/sa/x]}}]}]"),
            policy("any", "DENY", "[{to: [{operation: {paths: [/admin]}}]}]"),
            policy("by-ns", "ALLOW", "[{from: [{source: {namespaces: [b]}}]}]"),
            policy("wild", "DENY", "[{from: [{source: {principals: [cluster.local/ns/c/*]}}]}]"),
            policy("wild-ns-exact-sa", "DENY", "[{from: [{source: {principals: [cluster.local/ns/d/sa/y], namespaces: [\"*\"]}}]}]"),
            policy("not-only", "DENY", "[{from: [{source: {notPrincipals: [cluster.local/ns/a/sa/x]}}]}]"),
            policy("two-rules", "ALLOW", "[{from: [{source: {principals: [cluster.local/ns/a/sa/x]}}]}, {from: [{source: {namespaces: [b]}}]}]"),
            policy("two-rules-one-open", "ALLOW", "[{from: [{source: {principals: [cluster.local/ns/e/sa/z]}}]}, {to: [{operation: {methods: [GET]}}]}]"),
        ]
        .concat();
        let ix = index(&yaml);
        assert!(ix.has_allow());
        let open = ["any", "wild", "not-only", "two-rules-one-open"];
        let with = |extra: &[&str]| -> Vec<String> {
            let mut all: Vec<&str> = open.to_vec();
            all.extend_from_slice(extra);
            let order = [
                "by-sa",
                "any",
                "by-ns",
                "wild",
                "wild-ns-exact-sa",
                "not-only",
                "two-rules",
                "two-rules-one-open",
            ];
            order
                .iter()
                .filter(|n| all.contains(n))
                .map(|n| n.to_string())
                .collect()
        };
        assert_eq!(
            names(&ix, Some("cluster.local/ns/a/sa/x"), Some("a")),
            with(&["by-sa", "two-rules"])
        );
        // Filed under both keys, listed once.
        assert_eq!(
            names(&ix, Some("cluster.local/ns/a/sa/x"), Some("b")),
            with(&["by-sa", "by-ns", "two-rules"])
        );
        assert_eq!(
            names(&ix, Some("cluster.local/ns/d/sa/y"), Some("d")),
            with(&["wild-ns-exact-sa"])
        );
        assert_eq!(names(&ix, None, None), with(&[]));
        // Principals are case-sensitive, as Istio's matching is.
        assert_eq!(names(&ix, Some("cluster.local/ns/A/sa/x"), None), with(&[]));
    }

    #[test]
    fn merged_ids_are_the_sorted_union() {
        let merged: Vec<u32> = MergedIds([&[0, 4, 9], &[1, 4, 5, 12], &[]]).collect();
        assert_eq!(merged, [0, 1, 4, 5, 9, 12]);
        assert_eq!(MergedIds([&[], &[], &[]]).next(), None);
        let merged: Vec<u32> = MergedIds([&[3], &[3], &[3]]).collect();
        assert_eq!(merged, [3]);
    }

    #[test]
    fn a_policy_without_rules_is_a_candidate_for_no_one_but_still_counts_as_an_allow() {
        let yaml = "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: allow-nothing, namespace: istio-system}\nspec:\n  action: ALLOW\n";
        let ix = index(yaml);
        assert!(ix.has_allow());
        assert!(names(&ix, Some("cluster.local/ns/a/sa/x"), Some("a")).is_empty());
    }
}

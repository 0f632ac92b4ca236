//! CustomResourceDefinitions of the kinds llm-egress reads. The two
//! `istio.alibabacloud.com` kinds and our `LLMTokenBudget` get schemas generated from the Rust types,
//! so the API server rejects at admission what validation would reject
//! (a route without host or rules, a provider without key, ...). Istio's
//! three kinds get minimal definitions, used only where Istio's own are not
//! installed (Helm skips CRDs that exist); their specs are checked by the
//! gateway and agent, and reported on the resource's status.

use schemars::JsonSchema;
use serde_json::{json, Value};

use crate::{
    kube_watch::{
        WatchedKind, AUTHORIZATION_POLICY, GATEWAY, LLM_PROVIDER, LLM_ROUTE, LLM_TOKEN_BUDGET,
        REQUEST_AUTHENTICATION,
    },
    resources::{LlmProviderSpec, LlmRouteSpec, LlmTokenBudgetSpec},
};

/// The OpenAPI v3 schema of `T`, structural as Kubernetes requires.
pub fn structural_schema<T: JsonSchema>() -> Value {
    let generator = schemars::generate::SchemaSettings::openapi3()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .with_transform(schemars::transform::AddNullable::default())
        .with_transform(kube::core::schema::StructuralSchemaRewriter)
        .with_transform(kube::core::schema::OptionalEnum)
        .into_generator();
    let mut schema = serde_json::to_value(generator.into_root_schema_for::<T>()).unwrap_or_default();
    if let Some(o) = schema.as_object_mut() {
        o.remove("title");
    }
    strip_null_defaults(&mut schema);
    schema
}

/// `default: null` on optional fields says nothing, and older API servers
/// reject it; absent means absent.
fn strip_null_defaults(v: &mut Value) {
    match v {
        Value::Object(o) => {
            if o.get("default").is_some_and(Value::is_null) {
                o.remove("default");
            }
            o.values_mut().for_each(strip_null_defaults);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_null_defaults),
        _ => {}
    }
}

/// A status any controller may write conditions into.
fn status_schema() -> Value {
    json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

fn crd(kind: &WatchedKind, short_names: &[&str], spec_schema: Value, columns: Value) -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": format!("{}.{}", kind.plural, kind.group),
            "labels": {"app.kubernetes.io/part-of": "llm-egress"},
        },
        "spec": {
            "group": kind.group,
            "names": {
                "kind": kind.kind,
                "listKind": format!("{}List", kind.kind),
                "plural": kind.plural,
                "singular": kind.kind.to_ascii_lowercase(),
                "shortNames": short_names,
                "categories": ["llm-egress"],
            },
            "scope": "Namespaced",
            "versions": std::iter::once(kind.version)
                .chain(also_served(kind).iter().copied())
                .map(|version| json!({
                    "name": version,
                    "served": true,
                    "storage": version == kind.version,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": {
                        "type": "object",
                        "required": ["spec"],
                        "properties": {
                            "spec": spec_schema,
                            "status": status_schema(),
                        },
                    }},
                }))
                .collect::<Vec<_>>(),
        },
    })
}

/// Other versions Istio serves of its kinds (same schema, so the API server
/// converts by rewriting apiVersion): manifests written for Istio 1.22+
/// (`security.istio.io/v1`, `networking.istio.io/v1`) or older
/// (`networking.istio.io/v1alpha3`) apply unchanged.
fn also_served(kind: &WatchedKind) -> &'static [&'static str] {
    match kind.group {
        "security.istio.io" => &["v1"],
        "networking.istio.io" => &["v1alpha3", "v1"],
        _ => &[],
    }
}

fn accepted_column() -> Value {
    json!({"name": "Accepted", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].status"})
}

/// Every CRD, in the order to apply them.
pub fn all() -> Vec<Value> {
    let loose = json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    let mut policy = loose.clone();
    policy["properties"] = json!({
        "action": {"type": "string", "enum": ["ALLOW", "DENY", "AUDIT", "CUSTOM"]},
    });
    vec![
        crd(
            &LLM_PROVIDER,
            &["llmp"],
            structural_schema::<LlmProviderSpec>(),
            json!([{"name": "Host", "type": "string", "jsonPath": ".spec.host"}, accepted_column()]),
        ),
        crd(
            &LLM_ROUTE,
            &["llmr"],
            structural_schema::<LlmRouteSpec>(),
            json!([{"name": "Host", "type": "string", "jsonPath": ".spec.host"}, accepted_column()]),
        ),
        crd(
            &AUTHORIZATION_POLICY,
            &["ap"],
            policy,
            json!([{"name": "Action", "type": "string", "jsonPath": ".spec.action"}, accepted_column()]),
        ),
        crd(
            &REQUEST_AUTHENTICATION,
            &["ra"],
            loose.clone(),
            json!([accepted_column()]),
        ),
        crd(&GATEWAY, &["gw"], loose, json!([accepted_column()])),
        crd(
            &LLM_TOKEN_BUDGET,
            &["llmtb"],
            structural_schema::<LlmTokenBudgetSpec>(),
            json!([
                {"name": "Tokens", "type": "integer", "jsonPath": ".spec.tokens"},
                {"name": "Window", "type": "string", "jsonPath": ".spec.window"},
                accepted_column()
            ]),
        ),
    ]
}

/// Every CRD as one multi-document YAML text.
pub fn all_yaml() -> Result<String, serde_yaml_ng::Error> {
    let mut out = String::from("# Generated by `cargo xtask crds` from the Rust types; do not edit.\n");
    for c in all() {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&c)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_schema_requires_host_and_at_least_one_rule_with_a_backend() {
        let s = structural_schema::<LlmRouteSpec>();
        let required: Vec<&str> = s["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(required.contains(&"host") && required.contains(&"rules"), "{s}");
        assert_eq!(s["properties"]["host"]["minLength"], 1);
        assert_eq!(s["properties"]["rules"]["minItems"], 1);
        let rule = &s["properties"]["rules"]["items"];
        assert_eq!(rule["properties"]["backendRefs"]["minItems"], 1);
        assert!(!s.to_string().contains("$ref"), "schemas must be inline: {s}");
        assert!(!s.to_string().contains("\"default\":null"), "{s}");
    }

    #[test]
    fn provider_schema_names_the_fields_as_asm_spells_them() {
        let s = structural_schema::<LlmProviderSpec>();
        let cfg = &s["properties"]["configs"]["properties"]["defaultConfig"]["properties"]["openAIConfig"];
        assert_eq!(cfg["properties"]["apiKey"]["minLength"], 1);
        assert_eq!(cfg["properties"]["stream"]["type"], "boolean");
        assert_eq!(s["properties"]["path"]["pattern"], "^/");
    }

    #[test]
    fn every_kind_has_a_crd_with_a_status_subresource() {
        let all = all();
        assert_eq!(all.len(), 6);
        for c in &all {
            assert_eq!(c["spec"]["versions"][0]["subresources"]["status"], json!({}));
            let storage: Vec<_> = c["spec"]["versions"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|v| v["storage"] == true)
                .collect();
            assert_eq!(storage.len(), 1, "exactly one storage version: {c}");
        }
        assert!(all_yaml().unwrap().contains("llmroutes.istio.alibabacloud.com"));
    }
}

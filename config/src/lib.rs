//! The resources llm-egress reads: Istio's `Gateway`, `AuthorizationPolicy`
//! and `RequestAuthentication`, ASM's `LLMProvider` and `LLMRoute`, with
//! their validation; which namespaces may publish what (`scope`); the CRDs
//! generated from the types; and where resources come from (a directory, or
//! the API server through watchers that report status).

/// Random inputs per fuzz target in `cargo test` (CI); raise it with
/// `BOLERO_RANDOM_ITERATIONS`, or run a target under libFuzzer with
/// `cargo bolero test` (README, "Fuzzing").
#[cfg(test)]
const FUZZ_ITERATIONS: usize = 2000;

pub mod budget;
pub mod crds;
pub mod kube_watch;
pub mod mesh_config;
pub mod resources;
pub mod scope;
pub mod source;

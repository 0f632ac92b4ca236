//! What the llm-egress node agent and egress gateway both speak: SPIFFE
//! workload identity, mTLS configuration with certificate reload, the
//! HTTP/2 CONNECT tunnel (client and server halves), local certificate
//! issuance, and the Istio / ASM resources with their validation.

/// Random inputs per fuzz target in `cargo test` (CI); raise it with
/// `BOLERO_RANDOM_ITERATIONS`, or run a target under libFuzzer with
/// `cargo bolero test` (README, "Fuzzing").
#[cfg(test)]
const FUZZ_ITERATIONS: usize = 2000;

pub mod certs;
pub mod crds;
pub mod identity;
pub mod kube_watch;
pub mod process;
pub mod resources;
pub mod scope;
pub mod source;
pub mod tls;
pub mod tunnel;

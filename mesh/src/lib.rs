//! What the llm-egress node agent and egress gateway both speak: SPIFFE
//! workload identity, mTLS configuration with certificate reload, the
//! HTTP/2 CONNECT tunnel (client and server halves) and local certificate
//! issuance. The resources they read live in `llm-egress-config`.

/// Random inputs per fuzz target in `cargo test` (CI); raise it with
/// `BOLERO_RANDOM_ITERATIONS`, or run a target under libFuzzer with
/// `cargo bolero test` (README, "Fuzzing").
#[cfg(test)]
const FUZZ_ITERATIONS: usize = 2000;

pub mod certs;
pub mod copy;
pub mod h2_stream;
pub mod identity;
pub mod process;
pub mod tls;
pub mod tunnel;

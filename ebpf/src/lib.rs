//! Empty library so that the agent can build-depend on this crate and be
//! rebuilt when it changes; the programs live in the `llm-egress-bpf` binary.
#![no_std]

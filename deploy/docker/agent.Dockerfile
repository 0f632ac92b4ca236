# syntax=docker/dockerfile:1
# The node agent: its eBPF programs are built by aya-build (nightly rustc +
# bpf-linker, installed by `cargo xtask setup`) and embedded in one static
# binary, optimised with the committed PGO profile (pgo/). Runs privileged as
# root in the DaemonSet (it loads eBPF).
#
# `cargo xtask dist` builds the agent and the gateway together, exactly as
# the profile was trained (same target, features and compiler: each changes
# the symbol names the profile matches functions by), and fails if the
# profile does not cover them. The compiler is pinned to pgo/TRAINED's.
FROM rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo xtask setup --toolchain-only \
 && cargo xtask dist \
 && cp target/x86_64-unknown-linux-gnu/dist/llm-egress-agent /llm-egress-agent

FROM scratch
COPY --from=build /llm-egress-agent /llm-egress-agent
ENTRYPOINT ["/llm-egress-agent"]
CMD ["run", "--help"]

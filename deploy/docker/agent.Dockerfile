# syntax=docker/dockerfile:1
# The node agent: its eBPF programs are built by aya-build (nightly rustc +
# bpf-linker, installed by `cargo xtask setup`) and embedded in one static
# binary, optimised with the committed PGO profile (pgo/). Runs privileged as
# root in the DaemonSet (it loads eBPF).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo xtask setup --toolchain-only \
 && cargo build --profile dist -p llm-egress-agent --target x86_64-unknown-linux-gnu \
      --config 'target.x86_64-unknown-linux-gnu.rustflags=["-C","target-feature=+crt-static","-C","profile-use=/src/pgo/llm-egress.profdata"]' \
 && cp target/x86_64-unknown-linux-gnu/dist/llm-egress-agent /llm-egress-agent

FROM scratch
COPY --from=build /llm-egress-agent /llm-egress-agent
ENTRYPOINT ["/llm-egress-agent"]
CMD ["run", "--help"]

# syntax=docker/dockerfile:1
# The egress gateway: one static binary, the system CA roots for provider
# TLS, run as an unprivileged user; optimised with the committed PGO profile
# (pgo/). The `test-provider` target is the OpenAI-compatible test provider
# `cargo xtask kind` uses without a real key.
#
# `cargo xtask dist` builds the gateway and the agent together, exactly as
# the profile was trained (same target, features and compiler: each changes
# the symbol names the profile matches functions by; building the gateway
# alone unifies other features), and fails if the profile does not cover
# them. So this stage needs the eBPF toolchain too. The compiler is pinned
# to pgo/TRAINED's.
FROM rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo xtask setup --toolchain-only \
 && cargo xtask dist \
 && cp target/x86_64-unknown-linux-gnu/dist/llm-egress-gateway /llm-egress-gateway \
 && cargo build --release -p llm-egress-tests --bin llm-egress-fake-provider --target x86_64-unknown-linux-gnu \
      --config 'target.x86_64-unknown-linux-gnu.rustflags=["-C","target-feature=+crt-static"]' \
 && cp target/x86_64-unknown-linux-gnu/release/llm-egress-fake-provider /llm-egress-fake-provider

FROM scratch AS test-provider
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /llm-egress-fake-provider /llm-egress-fake-provider
USER 65532:65532
ENTRYPOINT ["/llm-egress-fake-provider"]

FROM scratch AS gateway
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /llm-egress-gateway /llm-egress-gateway
USER 65532:65532
ENTRYPOINT ["/llm-egress-gateway"]
CMD ["run", "--help"]

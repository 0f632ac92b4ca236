# syntax=docker/dockerfile:1
# The egress gateway: one static binary, the system CA roots for provider
# TLS, run as an unprivileged user; optimised with the committed PGO profile
# (pgo/). The `test-provider` target is the OpenAI-compatible test provider
# `cargo xtask kind` uses without a real key.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --profile dist -p llm-egress-gateway -p llm-egress-tests --bins --target x86_64-unknown-linux-gnu \
      --config 'target.x86_64-unknown-linux-gnu.rustflags=["-C","target-feature=+crt-static","-C","profile-use=/src/pgo/llm-egress.profdata"]' \
 && cp target/x86_64-unknown-linux-gnu/dist/llm-egress-gateway /llm-egress-gateway \
 && cp target/x86_64-unknown-linux-gnu/dist/llm-egress-fake-provider /llm-egress-fake-provider

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

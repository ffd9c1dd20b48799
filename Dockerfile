# Build stage: the release binary.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
# The admin API's OpenAPI document is embedded in the binary.
COPY openapi.json ./
COPY config ./config
# The crates and the target directory are cache mounts (BuildKit's, and buildah's), so a
# rebuild compiles only the crate itself, not its dependencies; the binary is copied out of
# the cache. The crate always compiles again (touch): the cache is shared by builds of other
# checkouts, and cargo judges it fresh by modification times, so sources older than another
# checkout's build would pass for built.
RUN --mount=type=cache,id=ge-orchestrator-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=ge-orchestrator-target,sharing=locked,target=/src/target \
    touch src/lib.rs src/main.rs \
 && cargo build --release --locked \
 && strip -o /usr/local/bin/ge-orchestrator target/release/ge-orchestrator

# Run stage: the binary, the default routing file, and a non-root user.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 ge && useradd --system --uid 10001 --gid ge --no-create-home ge
COPY --from=build /usr/local/bin/ge-orchestrator /usr/local/bin/ge-orchestrator
COPY config/dolly-routing.yaml /etc/ge-orchestrator/dolly-routing.yaml
ENV GE_ROUTING_CONFIG=/etc/ge-orchestrator/dolly-routing.yaml GE_HTTP_ADDR=0.0.0.0:8080
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["ge-orchestrator"]
CMD ["run", "--log-format", "json"]

# Multi-stage build of both binaries. Build: docker build -t stripe-entitlements .
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ingress -p processor --bins \
 && mkdir -p /out && cp target/release/ingress target/release/processor target/release/send-test-event /out/

FROM debian:bookworm-slim AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 app
COPY --from=build /out/ /usr/local/bin/
USER app
# Both services read their configuration from the environment (see .env.example).
ENV INGRESS_ADDR=0.0.0.0:8080 API_ADDR=0.0.0.0:8081 LOG_FORMAT=json
EXPOSE 8080 8081
CMD ["processor", "run"]

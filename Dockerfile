# syntax=docker/dockerfile:1
# gemgate: multi-stage build. The runtime image holds the binary, the shipped config, plugins
# and templates, runs as a non-root user and keeps its state in the /app/data volume.
#   docker build -t gemgate .
#   docker run -p 8000:8000 --env-file .env -v gemgate-data:/app/data gemgate
# To edit plugins while it runs, mount your own folder over them: -v ./plugins:/app/plugins
# Behind a mapped port or a proxy, set GEMGATE_PUBLIC_URL (the URL clients use) for the Files
# API's upload URLs, and GEMGATE_TRUSTED_PROXIES for a proxy's forwarding headers.

FROM rust:1-bookworm AS build
# pingora's zlib-ng is built with cmake.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# A workspace member; only gemgate itself is built.
COPY fake-upstream ./fake-upstream
# The shipped config, plugins and templates are compiled into the binary as its defaults.
COPY conf ./conf
COPY plugins ./plugins
COPY templates ./templates
RUN cargo build --release --locked --bin gemgate \
 && strip target/release/gemgate

FROM debian:bookworm-slim
# ca-certificates: TLS to Google; curl: the health check.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin gemgate
WORKDIR /app
COPY --from=build /src/target/release/gemgate /usr/local/bin/gemgate
COPY conf ./conf
COPY plugins ./plugins
COPY templates ./templates
# The admin page writes key and settings changes back to the config file (a new file beside
# it, then renamed over it): the folder is the gateway's to write.
RUN mkdir -p /app/data && chown -R gemgate:gemgate /app/data /app/conf
USER gemgate
ENV GEMGATE_LISTEN=0.0.0.0:8000 \
    GEMGATE_DATA_DIR=/app/data
VOLUME ["/app/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8000/health || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["gemgate"]
CMD ["--config", "/app/conf/gemgate.toml"]

# quota-engine: one binary. The build stage compiles the bundled librdkafka
# (gcc and make come with the rust image).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin quota-engine

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 quota
COPY --from=build /src/target/release/quota-engine /usr/local/bin/quota-engine
USER quota
EXPOSE 8080
ENTRYPOINT ["quota-engine"]
CMD ["serve"]

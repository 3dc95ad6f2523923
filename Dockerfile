# hubbub container image: a static (musl) binary on an empty `scratch` base.
#
#   docker build -t hubbub .
#   docker run --rm -p 8080:8080 -p 8081:8081 hubbub
#
# Inside the container hubbub binds 0.0.0.0, HTTP (page, /healthz, /metrics)
# on 8080 and WebSocket on 8081. Configuration: append flags to `docker run`,
# set HUBBUB_* variables, or mount a TOML file at /etc/hubbub/hubbub.toml
# (HUBBUB_CONFIG points there; the image ships an empty one).
# Change the ports with HUBBUB_HTTP_PORT / the file rather than flags, so that
# the HEALTHCHECK (`hubbub healthcheck`, which reads the same env and file)
# probes the right port.
#
# scripts/container-check builds this exact file with podman and proves it.

# ---------------------------------------------------------------------------
# Rust toolchain with the musl target of the machine that builds the image
# (x86_64 or aarch64), so the binary needs no libc in the runtime image.
# musl-tools gives musl-gcc, for any dependency that compiles C code.
FROM rust:1.95-slim-bookworm AS toolchain
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add "$(uname -m)-unknown-linux-musl"
WORKDIR /src

# ---------------------------------------------------------------------------
# Dependency skeleton: every Cargo.toml and Cargo.lock of the workspace, with
# each crate root replaced by an empty stub. Its content changes only when
# manifests change, so the dependency layer below stays cached across source
# edits (the same idea as cargo-chef, without the extra tool).
FROM toolchain AS skeleton
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY . .
RUN set -eu; \
    mkdir -p /skeleton; \
    cp Cargo.lock /skeleton/; \
    find . -name Cargo.toml -not -path '*/target/*' -not -path '*/node_modules/*' -print0 \
    | while IFS= read -r -d '' manifest; do \
        dir="$(dirname "$manifest")"; \
        mkdir -p "/skeleton/$dir"; \
        cp "$manifest" "/skeleton/$manifest"; \
        { \
          printf '%s\n' "$dir/src/main.rs" "$dir/src/lib.rs" "$dir/build.rs"; \
          find "$dir/src/bin" -maxdepth 1 -name '*.rs' 2>/dev/null || true; \
          sed -n 's/^[[:space:]]*path[[:space:]]*=[[:space:]]*"\([^"]*\.rs\)".*/\1/p' "$manifest" \
          | sed "s#^#$dir/#"; \
        } | while IFS= read -r root; do \
          if [ -f "$root" ]; then \
            mkdir -p "/skeleton/$(dirname "$root")"; \
            echo 'fn main() {}' > "/skeleton/$root"; \
          fi; \
        done; \
      done

# ---------------------------------------------------------------------------
# Build: dependencies first (cached layer), then hubbub itself.
FROM toolchain AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --from=skeleton /skeleton/ ./
RUN cargo build --release --locked -p hubbub --bin hubbub \
        --target "$(uname -m)-unknown-linux-musl"
COPY . .
# Sources are touched so cargo never mistakes a stub build for the real one.
RUN find . -name '*.rs' -not -path './target/*' -exec touch {} + \
    && cargo build --release --locked -p hubbub --bin hubbub \
        --target "$(uname -m)-unknown-linux-musl" \
    && mkdir -p /out/etc/hubbub \
    && cp "target/$(uname -m)-unknown-linux-musl/release/hubbub" /out/hubbub \
    && printf '%s\n' \
        '# hubbub configuration: mount your own file here (see config.example.toml).' \
        '# Every key is optional; flags > HUBBUB_* environment > this file > defaults.' \
        > /out/etc/hubbub/hubbub.toml \
    && /out/hubbub --version

# ---------------------------------------------------------------------------
# Runtime: nothing but the binary and its (empty) default config file.
FROM scratch
COPY --from=builder /out/ /
USER 65532:65532
ENV HUBBUB_HOST=0.0.0.0 \
    HUBBUB_CONFIG=/etc/hubbub/hubbub.toml
EXPOSE 8080 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/hubbub", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/hubbub"]

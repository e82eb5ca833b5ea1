# The multisite image: one static `multisite` binary on a distroless base.
#
# Every role runs from this one image, chosen by the first argument: the operator
# (`multisite operator ...`), replica pods (`multisite replica serve ...`), client
# tiers (`multisite client ...`) and the gateway (`multisite gateway ...`). The
# operator gives the pods it creates the image it runs itself (the Helm chart passes
# it in MULTISITE_IMAGE).
#
# Build from the repository root:
#
#   docker build -t multisite:dev .
#   docker build -t multisite:dev --build-arg RUST_VERSION=1.91 .   # pin the toolchain
#   docker run --rm multisite:dev --help
#
# Stage `build` compiles on Alpine, whose Rust host target is
# <arch>-unknown-linux-musl: binaries are linked statically by default, so the result
# runs on a base image without a C library. The C parts (the bundled SQLite of
# rusqlite, zstd, ring) need a C compiler and the musl headers. Dependencies are
# compiled first against placeholder crates, so that a change to the sources rebuilds
# only the workspace's own crates.
#
# The final stage holds the binary and nothing else of ours; distroless/static brings
# CA certificates, time zone data, /tmp and the unprivileged user 65532 ("nonroot").
# The binary is PID 1 and stops cleanly on SIGTERM by itself.

ARG RUST_VERSION=1

FROM rust:${RUST_VERSION}-alpine AS build

# gcc (which provides `cc`) for the C code built by the -sys crates; musl-dev for
# the static C library and headers they and the linker need; binutils for the
# readelf check below. Not pinned to versions: they follow the Alpine release of
# the rust image, and pinned versions vanish from Alpine's repositories.
# hadolint ignore=DL3018
RUN apk add --no-cache gcc musl-dev binutils

WORKDIR /build

# Strip symbols from the release binary: a smaller image, and a distroless pod has
# no debugger to use them anyway (panics still print their message and location).
ENV CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_TERM_COLOR=never

# 1. Dependencies only: the manifests and lock file with placeholder crates. This
#    layer is reused until a Cargo.toml or Cargo.lock changes.
COPY Cargo.toml Cargo.lock ./
COPY crates/core/Cargo.toml crates/core/
COPY crates/replica/Cargo.toml crates/replica/
COPY crates/operator/Cargo.toml crates/operator/
COPY crates/tiers/Cargo.toml crates/tiers/
COPY crates/node/Cargo.toml crates/node/
COPY crates/dev/Cargo.toml crates/dev/
RUN for dir in . crates/*; do mkdir -p "$dir/src" && : > "$dir/src/lib.rs"; done \
    && echo 'fn main() {}' > src/main.rs \
    && cargo build --release --locked \
    && rm -rf src crates/*/src \
        target/release/multisite target/release/multisite.d \
        target/release/libmultisite* target/release/deps/multisite* \
        target/release/deps/libmultisite* target/release/.fingerprint/multisite*

# 2. The workspace's own crates. Their fingerprints were removed above, so Cargo
#    rebuilds them whatever the timestamps of the copied files. The sources hold
#    everything the build embeds (crates/core/src/domain/compatibility.yaml); crds/ is
#    small and copied as well so that the build can embed the generated CRDs if the
#    code ever does.
COPY src ./src
COPY crates ./crates
COPY crds ./crds
# A dynamically linked binary (one that names a program interpreter) would not
# start on distroless/static: fail the build instead.
RUN cargo build --release --locked \
    && readelf --program-headers target/release/multisite > /tmp/program-headers \
    && if grep -q 'program interpreter' /tmp/program-headers; then \
         echo 'target/release/multisite is dynamically linked; the image needs a static binary' >&2; \
         exit 1; \
       fi \
    && target/release/multisite --version


FROM gcr.io/distroless/static-debian12:nonroot

ARG VERSION=0.1.0
ARG REVISION=unknown

LABEL org.opencontainers.image.title="multisite" \
      org.opencontainers.image.description="Kubernetes operator for fleets of replicated tracker databases spread over several sites; one binary for the operator, replica servers, client tiers and the gateway" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="gcr.io/distroless/static-debian12:nonroot"

COPY --from=build /build/target/release/multisite /usr/local/bin/multisite

# The numeric ids, not the name, so that the kubelet can check runAsNonRoot.
USER 65532:65532

ENTRYPOINT ["/usr/local/bin/multisite"]
CMD ["--help"]

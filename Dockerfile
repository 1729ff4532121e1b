# syntax=docker/dockerfile:1
# meshcap image: build with the full toolchain, ship only what runs.
#   docker build -t meshcap .
#   docker run --rm -v /var/run/meshcap:/var/run/meshcap -v $PWD/captures:/captures meshcap
# The runtime image has no shell and no package manager, runs as 65532:65532 (non-root), and is
# meant for a read-only root filesystem: it writes only to /captures and /var/run/meshcap.

# --- build: compile TypeScript -------------------------------------------------------------
FROM node:20-bookworm-slim AS build
WORKDIR /src
COPY package.json package-lock.json tsconfig.json ./
RUN npm ci --ignore-scripts --no-audit --no-fund
COPY src ./src
RUN npx tsc -p tsconfig.json \
 && mkdir -p /out/captures /out/run/meshcap \
 && chown -R 65532:65532 /out

# --- production dependencies only ------------------------------------------------------------
FROM node:20-bookworm-slim AS prod-deps
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --ignore-scripts --no-audit --no-fund && npm cache clean --force

# --- runtime -----------------------------------------------------------------------------------
FROM gcr.io/distroless/nodejs20-debian12:nonroot
WORKDIR /app
ENV NODE_ENV=production \
    MESHCAP_GRPC_LISTEN=unix:/var/run/meshcap/tap.sock \
    MESHCAP_WRITE=/captures/meshcap.pcapng \
    MESHCAP_METRICS_LISTEN=0.0.0.0:9464
COPY --from=prod-deps /src/node_modules ./node_modules
COPY --from=build /src/dist/src ./dist/src
COPY package.json ./
COPY bin ./bin
COPY proto ./proto
COPY --from=build --chown=65532:65532 /out/captures /captures
COPY --from=build --chown=65532:65532 /out/run/meshcap /var/run/meshcap
USER 65532:65532
EXPOSE 9464
VOLUME ["/captures", "/var/run/meshcap"]
# --initial-old-space-size=64: see bin/meshcap.js (V8 takes it at start-up only).
ENTRYPOINT ["/nodejs/bin/node", "--initial-old-space-size=64", "/app/bin/meshcap.js"]
CMD ["serve"]

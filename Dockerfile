# One image per service: docker build --build-arg SERVICE=gateway -t virtbackup-gateway .
FROM python:3.11-slim-bookworm AS build
ARG SERVICE
RUN apt-get update && apt-get install -y --no-install-recommends \
        gcc pkg-config libvirt-dev && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir uv
WORKDIR /src
COPY . .
RUN UV_PROJECT_ENVIRONMENT=/app uv sync --locked --no-dev --no-editable --package virtbackup-${SERVICE}

FROM python:3.11-slim-bookworm
ARG SERVICE
ENV SERVICE=${SERVICE} PATH=/app/bin:$PATH VIRTBACKUP_DATA_DIR=/data
RUN apt-get update && apt-get install -y --no-install-recommends \
        libvirt0 qemu-utils openssh-client && rm -rf /var/lib/apt/lists/*
COPY --from=build /app /app
# A numeric user, so Kubernetes can check runAsNonRoot (the chart and deploy/k8s run
# it as 10001 with a read-only root file system: /data and /tmp are volumes there).
RUN groupadd --system --gid 10001 virtbackup \
    && useradd --system --uid 10001 --gid 10001 --home /data virtbackup \
    && mkdir -p /data && chown virtbackup:virtbackup /data
USER 10001:10001
VOLUME /data
ENTRYPOINT ["/bin/sh", "-c", "exec virtbackup-${SERVICE}"]

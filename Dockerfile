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
RUN useradd --system --home /data virtbackup && mkdir -p /data && chown virtbackup /data
USER virtbackup
VOLUME /data
ENTRYPOINT ["/bin/sh", "-c", "exec virtbackup-${SERVICE}"]

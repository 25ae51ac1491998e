# grace-serve: one image for linux/arm64 (GH200, GB200) and linux/amd64 (H100, H200).
#
#   docker buildx build --platform linux/arm64,linux/amd64 \
#     -t ghcr.io/grace-serve/grace-serve:0.1.0 --push .
#
# CUDA 13 (the NVIDIA driver on the nodes must support it: R580 or newer), Python 3.12
# (Ubuntu 24.04's), Ray 2.60 and the project's `gpu` extra. PyPI's torch 2.13 wheels for both
# architectures are CUDA 13.0 builds that bring their own CUDA libraries, so the base image
# needs only CUDA's base layer; its NVIDIA_REQUIRE_CUDA makes the container runtime refuse
# a node whose driver is too old before anything starts. See README.md, "Container".
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# gcc and the Python headers: Triton compiles its kernel launcher at run time.
# wget: KubeRay's default liveness/readiness probes (exec probes on older operators).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc libc6-dev wget ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV" \
    && pip install --upgrade pip

# The dependencies of pyproject.toml and of its `gpu` extra, as declared there, with torch
# pinned as the Makefile pins it (tests/cpu/test_dockerfile.py keeps all three in step).
# A layer of its own, so that changing the code does not reinstall them.
RUN pip install \
        "ray[serve]==2.60.0" \
        "torch==2.13.0" \
        "transformers>=5.17,<6" \
        "tokenizers>=0.22" \
        "huggingface_hub>=1.0,<3" \
        "jinja2>=3.1.6" \
        "safetensors>=0.4" \
        "pydantic>=2.7,<3" \
        "pyyaml>=6" \
        "fastapi>=0.110" \
        "accelerate>=1.0" \
        "llguidance>=1.9,<2" \
        "rmm-cu13>=26.6"

# The application: the package (import path deployments.app:build_app), the Serve configs
# that `serve run configs/<file>.yaml` takes from the working directory, and the example.
WORKDIR /app
COPY pyproject.toml README.md ./
COPY deployments ./deployments
COPY configs ./configs
COPY examples ./examples
# The import check needs no GPU (the build machine has none): nothing here touches CUDA.
RUN pip install --no-deps . \
    && python -c "import deployments.app, deployments.proxy_middleware, torch; print('torch', torch.__version__, torch.version.cuda)"

# Weights downloaded from the Hugging Face Hub land here (mount a volume; the manifests do).
ENV HF_HOME=/models/huggingface
# Serve's proxy drops clients' control headers and answers its own errors in OpenAI's shape
# (deployments/proxy_middleware.py).
ENV RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deployments.proxy_middleware:middlewares
# Serve's HTTP proxy, Ray's metrics export, the dashboard, the GCS. KubeRay runs `ray start`
# itself; by hand: docker run --gpus all -p 8000:8000 IMAGE serve run configs/<file>.yaml
EXPOSE 8000 8080 8265 6379
CMD ["bash"]

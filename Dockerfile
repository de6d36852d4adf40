# medusa-forge inside NVIDIA's Triton + TensorRT-LLM container: convert -> trtllm-build -> Triton repo.
#
# TRTLLM picks the target release, the same profile as `convert trtllm --trtllm-version` and
# `make engine TRTLLM=...`; TRITON_TAG must be that release's container:
#   TRTLLM=1.2  (default)  TRITON_TAG=26.07  TensorRT-LLM 1.2.1, the last release that builds Medusa engines
#                                           with the TensorRT backend and ships in a Triton container
#   TRTLLM=0.11            TRITON_TAG=24.07  TensorRT-LLM 0.11.0 with tensorrtllm_backend v0.11.0
# (Triton's compatibility matrix, "Container Name: trtllm-python-py3"; docs/build.md has the citations.)
#
#   docker build -t medusa-forge:26.07 .                  # or: make docker [TRTLLM=0.11]
#   docker build --build-arg TRTLLM=0.11 --build-arg TRITON_TAG=24.07 -t medusa-forge:24.07 .
#   docker run --gpus all --rm -v /models:/models -v $PWD/build:/opt/medusa-forge/build medusa-forge:26.07 \
#       make -C /opt/medusa-forge engine MODEL=/models/base MEDUSA=/models/heads DTYPE=fp16 TREE=mc_sim_7b_63
ARG TRITON_TAG=26.07
FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}-trtllm-python-py3

ARG TRTLLM=1.2
# Where the backend's Python models (pre/post-processing, BLS) come from: for 1.2 TensorRT-LLM's own
# triton_backend/all_models, for 0.11 tensorrtllm_backend's all_models. `triton-repo` copies them and
# checks their config.pbtxt against the templates it fills.
ARG TENSORRT_LLM_REF=v1.2.1
ARG TENSORRTLLM_BACKEND_TAG=v0.11.0
# tritonclient at the server's own version: 2.72.0 for 26.07, 2.48.0 for 24.07.
ARG TRITONCLIENT=2.72.0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN apt-get update \
    && apt-get install -y --no-install-recommends make git ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && if [ "${TRTLLM}" = "0.11" ]; then \
        git clone --depth 1 --branch "${TENSORRTLLM_BACKEND_TAG}" \
            https://github.com/triton-inference-server/tensorrtllm_backend.git /opt/tensorrtllm_backend; \
    else \
        git clone --depth 1 --branch "${TENSORRT_LLM_REF}" --filter=blob:none --sparse \
            https://github.com/NVIDIA/TensorRT-LLM.git /opt/tensorrtllm_backend \
        && git -C /opt/tensorrtllm_backend sparse-checkout set triton_backend/all_models; \
    fi \
    && rm -rf /opt/tensorrtllm_backend/.git
ENV TENSORRTLLM_BACKEND_DIR=/opt/tensorrtllm_backend MEDUSA_FORGE_TRTLLM=${TRTLLM}

WORKDIR /opt/medusa-forge
COPY pyproject.toml README.md Makefile ./
COPY medusa_forge ./medusa_forge

# --no-deps: torch, transformers, safetensors, numpy come with TensorRT-LLM in the image and must
# stay at the versions it was built against; only the small pure-Python extras are added, pinned.
# `make image-deps-check TRTLLM=...` runs the convert tests with the nearest released versions (docs/convert.md).
# The last line fails the build when the image's TensorRT-LLM is not the release TRTLLM names.
RUN pip install --no-cache-dir --no-deps . \
    && pip install --no-cache-dir click==8.1.7 rich==13.7.1 tqdm==4.66.4 filelock==3.15.4 \
        "tritonclient[grpc]==${TRITONCLIENT}" matplotlib==3.9.1 \
    && medusa-forge --version \
    && command -v trtllm-build \
    && python3 -c "import importlib.metadata as m, sys; v = m.version('tensorrt_llm'); \
sys.exit(0 if v.startswith('${TRTLLM}.') else f'image has TensorRT-LLM {v}, TRTLLM=${TRTLLM}')"

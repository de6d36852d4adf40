# medusa-forge inside NVIDIA's Triton + TensorRT-LLM container: convert -> trtllm-build -> Triton repo.
#
# TRITON_TAG pins the release: 24.07 ships TensorRT-LLM 0.11.0 with the tensorrtllm backend built
# against it (tensorrtllm_backend v0.11.0), the release every pinned format in medusa-forge follows
# (convert's checkpoint schema, `build trtllm`'s flags, the Triton repository templates).
#
#   docker build --build-arg TRITON_TAG=24.07 -t medusa-forge:24.07 .
#   docker run --gpus all --rm -v /models:/models -v $PWD/build:/opt/medusa-forge/build medusa-forge:24.07 \
#       make -C /opt/medusa-forge engine MODEL=/models/base MEDUSA=/models/heads DTYPE=fp16 TREE=mc_sim_7b_63
ARG TRITON_TAG=24.07
FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}-trtllm-python-py3

ARG TENSORRTLLM_BACKEND_TAG=v0.11.0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# make drives the pipeline; git fetches tensorrtllm_backend's Python models (pre/post-processing, BLS),
# which `medusa-forge triton-repo` copies into TensorRT-LLM repositories (the image has the C++ backend only).
RUN apt-get update \
    && apt-get install -y --no-install-recommends make git ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && git clone --depth 1 --branch "${TENSORRTLLM_BACKEND_TAG}" \
        https://github.com/triton-inference-server/tensorrtllm_backend.git /opt/tensorrtllm_backend \
    && rm -rf /opt/tensorrtllm_backend/.git
ENV TENSORRTLLM_BACKEND_DIR=/opt/tensorrtllm_backend

WORKDIR /opt/medusa-forge
COPY pyproject.toml README.md Makefile ./
COPY medusa_forge ./medusa_forge

# --no-deps: torch, transformers, safetensors, numpy come with TensorRT-LLM in the image and must
# stay at the versions it was built against; only the small pure-Python extras are added, pinned
# (tritonclient at the server's own version, 2.48.0 for 24.07).
RUN pip install --no-cache-dir --no-deps . \
    && pip install --no-cache-dir click==8.1.7 rich==13.7.1 tqdm==4.66.4 filelock==3.15.4 \
        "tritonclient[grpc]==2.48.0" matplotlib==3.9.1 \
    && medusa-forge --version \
    && command -v trtllm-build

"""``medusa-forge convert``: HF checkpoint + Medusa heads -> TensorRT-LLM Medusa checkpoint, and back.

``trtllm_config`` (config.json, pinned to TensorRT-LLM v0.11.0), ``trtllm_names`` (tensor names, shapes and
tensor-parallel splits), ``fp8`` (calibrated FP8 scales), ``trtllm_checkpoint`` (the writer),
``trtllm_inspect`` (summary and validation), ``trtllm_reader`` (back into the native engine), ``cli``.
"""

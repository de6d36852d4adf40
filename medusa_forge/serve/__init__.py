"""Serving: Triton model repositories for both engine kinds, the tritonserver launcher, and the gRPC client.

triton_repo.py     engine dir -> model repository (dispatch on the engine manifest's kind)
native_repo.py     the Python-backend repository of a native engine (the contract in contract.py)
native_model.py    the ``model.py`` Triton's Python backend loads for it
native_service.py  what that model does per request, usable in-process (tests, overhead baseline)
request.py         ensemble tensors -> validated requests; llm_request.py: the tensorrt_llm model's
replies.py         a reply -> contract tensors; contracts.py: which contract a native model serves
text_stream.py     streaming text deltas
trtllm_repo.py     tensorrtllm_backend v0.11.0's inflight_batcher_llm layout, filled like fill_template.py
tritonserver.py    find / start / wait for / stop tritonserver (NGC's, or the nvidia-pytriton wheel's)
client.py          tritonclient gRPC: streaming and non-streaming, with timeouts
(load and soak benches: medusa_forge/bench/serve_bench.py, medusa_forge/bench/soak.py)
cli.py             `triton-repo`, `serve`, `query`
"""

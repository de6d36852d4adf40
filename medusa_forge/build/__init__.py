"""``medusa-forge build``: native and TensorRT-LLM engines with a chosen or searched choice tree.

- ``native.py``      self-contained native engine directories (weights in the engine dtype, heads,
                     tokenizer, manifest), verified by loading and generating before they appear.
- ``open.py``        open any artifact the native engine runs (engine dir, HF dir + heads, or a
                     TensorRT-LLM checkpoint through convert): what serve, eval, bench and generate call.
- ``tree_search.py`` the ``auto`` choice tree: path-conditional acceptance on calibration prompts,
                     tree-step latency on this device, greedy growth for tokens per second.
- ``trtllm.py``      the ``trtllm-build`` wrapper for converted TensorRT-LLM checkpoints.
- ``compare.py``     FP8-vs-reference agreement and tree-vs-tree tokens/s (H100 checks).
"""

"""The two tensor contracts a native model can serve, each with its parser and its replies.

- ``ensemble`` (the default): tensorrtllm_backend v0.11.0's ensemble, text in and out
  (contract.INPUTS / OUTPUTS, serve/request.py); what end_to_end_grpc_client.py calls.
- ``tensorrt_llm``: the ensemble's LLM step, token ids in and out (contract.LLM_INPUTS /
  LLM_OUTPUTS, serve/llm_request.py); what inflight_batcher_llm_client.py calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from medusa_forge.contract import INPUTS, LLM_INPUTS, LLM_OUTPUTS, OUTPUTS, TensorSpec
from medusa_forge.errors import ForgeError
from medusa_forge.serve.llm_request import parse_llm_request
from medusa_forge.serve.replies import llm_reply_tensors, reply_tensors
from medusa_forge.serve.request import parse_request


@dataclass(frozen=True)
class ServedContract:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    _parse: Callable
    _reply: Callable

    def parse(self, inputs, use_medusa: bool, max_batch_size: int, decoupled: bool, tokenizer):
        """Row requests from one Triton request's input arrays."""
        if self.name == "ensemble":
            return self._parse(inputs, use_medusa, max_batch_size, decoupled, tokenizer)
        return self._parse(inputs, use_medusa, max_batch_size, decoupled)

    def reply(self, reply, text: str, tokens: list[int], final: bool, gcfg=None) -> dict:
        """One response's output arrays (a streamed chunk: reply None, its text delta and ids)."""
        if self.name == "ensemble":
            return self._reply(reply, text, tokens, final, gcfg)
        return self._reply(reply, tokens, final, gcfg)


CONTRACTS = {
    "ensemble": ServedContract("ensemble", INPUTS, OUTPUTS, parse_request, reply_tensors),
    "tensorrt_llm": ServedContract("tensorrt_llm", LLM_INPUTS, LLM_OUTPUTS, parse_llm_request, llm_reply_tensors),
}


def served_contract(name: str) -> ServedContract:
    if name not in CONTRACTS:
        raise ForgeError(f"unknown contract {name!r}; a native model serves {' or '.join(CONTRACTS)}")
    return CONTRACTS[name]

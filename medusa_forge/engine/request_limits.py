"""What one engine admits: a request that cannot run fails before any work, with one clear error."""

from __future__ import annotations

from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.errors import ForgeError
from medusa_forge.tree.choice_tree import ChoiceTree


def check_request(
    prompt_ids: list[int], gcfg: GenerationConfig, max_seq_len: int, tree: ChoiceTree | None, has_tokenizer: bool
) -> None:
    """Raise ForgeError unless ``prompt_ids`` and ``gcfg`` fit an engine with this KV cache, tree
    (None: no Medusa heads) and tokenizer (stop strings need one)."""
    if not prompt_ids:
        raise ForgeError("empty prompt: give at least one token of input")
    if gcfg.max_new_tokens < 1:
        raise ForgeError(f"max_new_tokens must be >= 1, got {gcfg.max_new_tokens}")
    if gcfg.stop_strings and not has_tokenizer:
        raise ForgeError("stop strings need a tokenizer")
    # Room for the last tree plus the one step the host loop runs ahead.
    margin = 2 * (tree.num_nodes if (tree is not None and gcfg.use_medusa) else 1)
    max_input = max_seq_len - margin - 1
    if len(prompt_ids) > max_input:
        raise ForgeError(
            f"prompt of {len(prompt_ids)} tokens is longer than the engine's max input of {max_input} "
            f"tokens (it exceeds the KV cache of {max_seq_len} tokens less {margin} for the tree "
            "and 1 to generate); shorten the prompt or use a larger --max-seq-len"
        )
    need = len(prompt_ids) + gcfg.max_new_tokens + margin
    if need > max_seq_len:
        raise ForgeError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({gcfg.max_new_tokens}) + "
            f"tree ({margin}) = {need} exceeds the KV cache of {max_seq_len} tokens"
        )
    if gcfg.use_medusa and tree is None:
        raise ForgeError("Medusa decoding requested but the engine has no Medusa heads (use --no-medusa)")
    if gcfg.temperature < 0:
        raise ForgeError(f"temperature must be >= 0, got {gcfg.temperature}")

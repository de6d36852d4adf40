"""The tokenizer wrapper every stage uses (transformers' AutoTokenizer from the model directory)."""

from __future__ import annotations

import json
from pathlib import Path

from medusa_forge.errors import ForgeError


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        from transformers import AutoTokenizer  # deferred: importing transformers costs ~1 s

        model_dir = Path(model_dir)
        if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer.model").is_file():
            raise ForgeError(f"{model_dir}: no tokenizer.json or tokenizer.model found")
        try:
            self.hf = generic_fast(model_dir) or AutoTokenizer.from_pretrained(str(model_dir))
        except Exception as e:  # noqa: BLE001 - surface any tokenizer load failure as one line
            raise ForgeError(f"{model_dir}: tokenizer failed to load ({type(e).__name__}: {e})") from None
        self.source = model_dir
        # A fast tokenizer's Rust backend encodes without transformers' per-call wrapping (the
        # BatchEncoding, argument checks): 0.26 vs 0.46 ms for a 2000-character prompt, paid on
        # every request's time to first token. Same ids (tests/test_tokenizer.py).
        self._backend = self.hf.backend_tokenizer if getattr(self.hf, "is_fast", False) else None

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def check_fits(self, vocab_size: int) -> None:
        """Ids past the model's vocab would index outside its embedding: refuse such a pairing up front."""
        if self.vocab_size > vocab_size:
            raise ForgeError(
                f"{self.source}: tokenizer has {self.vocab_size} tokens but the model's vocab_size is "
                f"{vocab_size} (config.json); use the tokenizer the model was trained with"
            )

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    def encode(self, text: str) -> list[int]:
        """Token ids as the model was trained on them (BOS prepended when the tokenizer does so)."""
        if self._backend is not None:
            return self._backend.encode(text, add_special_tokens=True).ids
        return list(self.hf(text).input_ids)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict]) -> str:
        if not getattr(self.hf, "chat_template", None):
            raise ForgeError(f"{self.source}: tokenizer has no chat template; give `text` or `prompt`/`completion`")
        return self.hf.apply_chat_template(messages, tokenize=False)


# What a transformers 5 tokenizer_config.json may carry that the generic fast class takes.
_FAST_KWARGS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token",
                "additional_special_tokens", "model_max_length", "padding_side", "chat_template",
                "clean_up_tokenization_spaces")  # fmt: skip


def generic_fast(model_dir: Path):
    """transformers 5 saves tokenizers as class ``TokenizersBackend``, which transformers 4 (the 4.42 and 4.57 of
    the TensorRT-LLM images) cannot resolve. Its tokenizer.json is the whole tokenizer, so there the generic fast
    class reads it with the config's special tokens. None where AutoTokenizer resolves the class itself."""
    import transformers

    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    wanted = config.get("tokenizer_class")
    if wanted != "TokenizersBackend" or hasattr(transformers, wanted) or not (model_dir / "tokenizer.json").is_file():
        return None
    return fast_from_files(model_dir, config)


def fast_from_files(model_dir: Path, config: dict):
    """The generic fast tokenizer of ``model_dir/tokenizer.json`` with ``config``'s special tokens."""
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import PreTrainedTokenizerFast

    kwargs = {k: config[k] for k in _FAST_KWARGS if k in config}
    text = (model_dir / "tokenizer.json").read_text()
    try:
        backend = RustTokenizer.from_str(text)
    except Exception:  # noqa: BLE001 - tokenizers < 0.20 (the 24.07 image's 0.19) reads merges only as "a b"
        data = string_merges(json.loads(text))
        if data is None:
            raise
        backend = RustTokenizer.from_str(json.dumps(data))
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def string_merges(data: dict) -> dict | None:
    """tokenizer.json with its BPE merges as "a b" strings, the only form tokenizers < 0.20 reads; None where
    there are no pair merges or a part holds a space (that form cannot say it)."""
    merges = data.get("model", {}).get("merges") or []
    if not merges or not isinstance(merges[0], list) or any(" " in part for pair in merges for part in pair):
        return None
    return {**data, "model": {**data["model"], "merges": [" ".join(pair) for pair in merges]}}

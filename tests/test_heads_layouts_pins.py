"""Each layout ``heads export`` writes, read back by its consumer's loader restated from source (issue 11).

Spec: round trips between all layouts are tensor-equal for pycoder-26m heads (the random float32 v1 heads
of the ``heads_dir`` fixture, and a bfloat16 "version 2" shared-lm_head variant of them), and the native engine's
greedy output, steps and acceptance are identical whichever layout it was given. Each written layout
is checked against the loader that reads it, restated from its source (files and commits below):

- FasterDecoding/Medusa@e2a5d20 ``medusa/model/medusa_model.py`` (``ResBlock``, ``medusa_head`` =
  ``ModuleList([Sequential(*[ResBlock(H)] * L, Linear(H, V, bias=False))])``, ``from_pretrained`` opens
  ``medusa_lm_head.pt``) and ``medusa_model_legacy.py`` (version 2: ``Sequential(*[ResBlock(H)] * L)``,
  logits via ``base_model.lm_head``; ``MedusaConfig(version="2")``).
- huggingface/text-generation-inference@db931fc ``server/text_generation_server/models/__init__.py``
  (``medusa_num_heads`` in config.json -> Medusa; base model from ``base_model_name_or_path``; weights
  ``medusa_lm_head.safetensors``), ``layers/speculative.py`` (``SpeculativeHead.load``: Medusa only when
  config.json has no ``architectures``; ``MedusaHeadV1`` else ``MedusaHeadV2``), ``layers/medusa.py``
  (``MedusaHead``: ``{i}.{j}.linear`` with bias, ``{i}.{n}`` without; ``MedusaHeadV2``: ``{i}.0.linear``,
  ``assert medusa_config["medusa_num_layers"] == 1``).
- vllm-project/vllm ``vllm/model_executor/models/medusa.py``@09cddad (``blocks[k].layers[j]`` =
  ``nn.Linear(H, H, bias=medusa_fc_bias)``, ``lm_heads[k]`` or ``lm_head`` with ``original_lm_head``,
  ``load_weights``: strip ``medusa_heads.``, ``lm_heads.0.weight`` -> ``lm_head.weight``, skip unknown
  names) and ``vllm/transformers_utils/configs/medusa.py``@0531c22 (``MedusaConfig``: model_type
  "medusa", hidden_size, vocab_size, num_heads, num_hidden_layers, max_paths, topk,
  truncated_vocab_size; ``from_pretrained`` renames keys containing "num"+"heads"/"layers").
- NVIDIA/TensorRT-LLM ``examples/medusa/convert_checkpoint.py``@063e02f (``--medusa_model_dir``: reads
  ``medusa_num_heads``/``medusa_num_layers`` from its config.json, then ``load_medusa_hf``),
  ``tensorrt_llm/models/medusa/weight.py``@27712aa (``medusa_lm_head.pt`` only) and the later
  ``load_medusa_hf`` (``medusa_lm_head.pt`` first, else ``.safetensors``; ``{h}.{l}.linear.weight``/``.bias``,
  ``{h}.{num_medusa_layers}.weight`` -> ``medusa_heads.{h}.medusa_layers.{l}.linear.*``,
  ``medusa_heads.{h}.lm_head.weight``), ``tensorrt_llm/models/medusa/config.py``@a4817fb
  (``from_hugging_face``: ``num_medusa_heads`` and ``medusa_num_layers`` from this config.json). The
  TensorRT-LLM names themselves come from ``medusa_forge/convert/trtllm_names.py`` (one definition).
- ctlllll/axolotl@76bc572 ``src/axolotl/monkeypatch/medusa_utils.py`` (``add_medusa_heads``:
  ``config.medusa_num_heads``/``medusa_num_layers``, ``model.medusa_head`` as FasterDecoding's).
"""

from __future__ import annotations

import json

import pytest
import torch
from heads_layouts_fixtures import H, K, L, V, tensors_of
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from medusa_forge.heads.checkpoint import load_heads


# ----------------------------------------------------------------------------------------- pins: FasterDecoding
class FDResBlock(nn.Module):
    """FasterDecoding's ResBlock: ``self.linear = nn.Linear(H, H)``, ``x + SiLU(linear(x))``."""

    def __init__(self, h):
        super().__init__()
        self.linear = nn.Linear(h, h)
        self.act = nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


def fasterdecoding_medusa_head(k, layers, h, v=None):
    """``medusa_head`` of medusa_model.py (v1) or medusa_model_legacy.py (v=None: version 2)."""
    return nn.ModuleList(
        [
            nn.Sequential(*[FDResBlock(h) for _ in range(layers)], *([nn.Linear(h, v, bias=False)] if v else []))
            for _ in range(k)
        ]
    )


def our_logits(directory, lm_head, x):
    return load_heads(directory, H, V)(x, lm_head.float())


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_fasterdecoding_export_is_what_medusa_model_from_pretrained_loads(variant, exported, lm_head):
    d = exported[variant, "fasterdecoding"]
    conf = json.loads((d / "config.json").read_text())
    assert {"medusa_num_heads": K, "medusa_num_layers": L}.items() <= conf.items() and conf["base_model_name_or_path"]
    assert conf.get("version") == ("2" if variant == "v2" else None) and "model_type" not in conf
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "medusa_lm_head.pt"]
    sd = torch.load(d / "medusa_lm_head.pt", map_location="cpu", weights_only=True)
    ref = fasterdecoding_medusa_head(K, L, H, V if variant == "v1" else None)
    ref.load_state_dict(sd, strict=True)  # upstream uses strict=False; every name must match ours exactly
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expect = torch.stack([head(x) if variant == "v1" else head(x) @ lm_head.float().t() for head in ref])
        assert torch.allclose(our_logits(d, lm_head, x), expect, atol=1e-4)


# ----------------------------------------------------------------------------------------- pins: TGI
def tgi_medusa_logits(directory, lm_head, x):
    """TGI's path for a Medusa model id, restated: config checks, then MedusaHeadV1 or MedusaHeadV2."""
    conf = json.loads((directory / "config.json").read_text())
    assert "medusa_num_heads" in conf and conf["base_model_name_or_path"]  # models/__init__.py
    assert "architectures" not in conf  # speculative.py: else the speculator is None
    n, layers = conf["medusa_num_heads"], conf["medusa_num_layers"]
    with safe_open(str(directory / "medusa_lm_head.safetensors"), framework="pt") as f:
        names = set(f.keys())
        v1 = all(f"{i}.{layers}.weight" in names for i in range(n))
        if not v1:
            assert layers == 1  # MedusaHeadV2
        out = []
        for i in range(n):
            h = x
            for j in range(layers):
                w, b = f.get_tensor(f"{i}.{j}.linear.weight"), f.get_tensor(f"{i}.{j}.linear.bias")
                h = h + torch.nn.functional.silu(h @ w.float().t() + b.float())
            out.append(h @ (f.get_tensor(f"{i}.{layers}.weight") if v1 else lm_head).float().t())
    return torch.stack(out), v1


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_tgi_export_is_what_tgi_loads(variant, exported, lm_head):
    d = exported[variant, "tgi"]
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "medusa_lm_head.safetensors"]
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(2))
    logits, v1 = tgi_medusa_logits(d, lm_head, x)
    assert v1 == (variant == "v1")
    with torch.no_grad():
        assert torch.allclose(our_logits(d, lm_head, x), logits, atol=1e-4)


# ----------------------------------------------------------------------------------------- pins: vLLM
class VllmResidualBlock(nn.Module):
    def __init__(self, h, layers, bias):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(h, h, bias=bias) for _ in range(layers)])
        self.act = nn.SiLU()

    def forward(self, x):
        for layer in self.layers:
            x = x + self.act(layer(x))
        return x


class VllmMedusa(nn.Module):
    """vLLM's ``Medusa`` parameters, named as its ``named_parameters()`` names them."""

    def __init__(self, c):
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                VllmResidualBlock(c["hidden_size"], c["num_hidden_layers"], c.get("medusa_fc_bias", False))
                for _ in range(c["num_heads"])
            ]
        )
        vocab = c.get("truncated_vocab_size") or c["vocab_size"]
        self.original = c.get("original_lm_head", False)
        if self.original:
            self.lm_head = nn.Linear(c["hidden_size"], vocab, bias=False)
        else:
            self.lm_heads = nn.ModuleList(
                [nn.Linear(c["hidden_size"], vocab, bias=False) for _ in range(c["num_heads"])]
            )

    def load_weights(self, weights):
        """``Medusa.load_weights`` restated; returns the names it would silently skip."""
        params, skipped, loaded = dict(self.named_parameters()), [], set()
        for name, w in weights.items():
            name = name.replace("medusa_heads.", "")
            if name in params:
                target = name
            elif self.original and name == "lm_heads.0.weight":
                target = "lm_head.weight"
            else:
                skipped.append(name)
                continue
            params[target].data.copy_(w)
            loaded.add(target)
        return skipped, set(params) - loaded

    def forward(self, x):
        heads = [self.lm_head] * len(self.blocks) if self.original else self.lm_heads
        return torch.stack([lm(block(x)) for block, lm in zip(self.blocks, heads)])


def vllm_config_as_loaded(conf):
    """``MedusaConfig.from_pretrained``'s renaming of any "num"+"heads"/"layers" key."""
    out = {}
    for k, v in conf.items():
        if "num" in k and "heads" in k:
            k = "num_heads"
        elif "num" in k and "layers" in k:
            k = "num_hidden_layers"
        assert k not in out, f"two config keys become {k}"
        out[k] = v
    return out


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_vllm_export_is_what_vllm_loads(variant, exported, lm_head):
    d = exported[variant, "vllm"]
    conf = json.loads((d / "config.json").read_text())
    assert conf["model_type"] == "medusa" and conf["architectures"] == [
        "MedusaModel"
    ]  # config registry + model registry
    assert {
        k: conf[k]
        for k in (
            "hidden_size",
            "vocab_size",
            "num_heads",
            "num_hidden_layers",
            "truncated_vocab_size",
            "medusa_fc_bias",
            "original_lm_head",
        )
    } == {
        "hidden_size": H,
        "vocab_size": V,
        "num_heads": K,
        "num_hidden_layers": L,
        "truncated_vocab_size": V,
        "medusa_fc_bias": True,
        "original_lm_head": variant == "v2",
    }
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    weights = load_file(d / "model.safetensors")
    expect_names = {f"blocks.{k}.layers.0.{p}" for k in range(K) for p in ("weight", "bias")}
    expect_names |= {"lm_head.weight"} if variant == "v2" else {f"lm_heads.{k}.weight" for k in range(K)}
    assert set(weights) == expect_names
    ref = VllmMedusa(vllm_config_as_loaded(conf))
    skipped, unset = ref.load_weights(weights)
    assert skipped == [] and unset == set()
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(our_logits(d, lm_head, x), ref(x), atol=1e-4)


def test_vllm_reader_takes_medusa_heads_prefix_and_lm_heads_0_alias(exported, tmp_path):
    """vLLM strips ``medusa_heads.`` and accepts ``lm_heads.0.weight`` as the shared lm_head; so do we."""
    src = exported["v2", "vllm"]
    sd = load_file(src / "model.safetensors")
    sd = {("lm_heads.0.weight" if k == "lm_head.weight" else "medusa_heads." + k): v for k, v in sd.items()}
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    a, b = tensors_of(src), tensors_of(tmp_path)
    assert b.shared_lm_head and torch.equal(a.res_weight, b.res_weight) and torch.equal(a.res_bias, b.res_bias)


# ----------------------------------------------------------------------------------------- pins: TensorRT-LLM
def trtllm_load_medusa_hf(directory):
    """``examples/medusa/convert_checkpoint.py``@063e02f + ``tensorrt_llm/models/medusa/weight.py`` restated:
    head/layer counts from the heads' config.json (``medusa_num_heads``, ``medusa_num_layers``; the converter's
    ``from_hugging_face`` successor reads ``num_medusa_heads``), ``medusa_lm_head.pt`` first (the only file
    27712aa reads), biases and ``{h}.{L}.weight`` read unconditionally, renamed to TensorRT-LLM's names."""
    conf = json.loads((directory / "config.json").read_text())
    n, layers = conf["medusa_num_heads"], conf["medusa_num_layers"]
    assert conf["num_medusa_heads"] == n  # MedusaConfig.from_hugging_face@a4817fb
    sd = torch.load(directory / "medusa_lm_head.pt", map_location="cpu")  # plain torch.load, as upstream
    out = {}
    for h in range(n):
        for j in range(layers):
            out[f"medusa_heads.{h}.medusa_layers.{j}.linear.weight"] = sd.pop(f"{h}.{j}.linear.weight")
            out[f"medusa_heads.{h}.medusa_layers.{j}.linear.bias"] = sd.pop(f"{h}.{j}.linear.bias")
        out[f"medusa_heads.{h}.lm_head.weight"] = sd.pop(f"{h}.{layers}.weight")  # KeyError: no projection
    assert sd == {}, f"tensors TensorRT-LLM would not read: {sorted(sd)}"
    return n, layers, out


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_trtllm_medusa_dir_is_what_convert_checkpoint_reads(variant, exported, lm_head, model_dir):
    from medusa_forge.convert.trtllm_config import spec_for
    from medusa_forge.convert.trtllm_names import entries
    from medusa_forge.model.config import ModelConfig

    d = exported[variant, "trtllm-medusa-dir"]
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "medusa_lm_head.pt"]
    n, layers, weights = trtllm_load_medusa_hf(d)
    assert (n, layers) == (K, L)
    # the names and shapes our own TensorRT-LLM converter writes for these heads (convert/trtllm_names.py)
    spec = spec_for(ModelConfig.from_dir(model_dir), n, layers, tp_size=1, dtype="float16")
    expected = {e.name: e.shape for e in entries(spec) if e.source.startswith("heads.")}
    assert {name: tuple(t.shape) for name, t in weights.items()} == expected
    if variant == "v2":  # expanded: every head's lm_head is the base lm_head, in the heads' dtype
        assert all(
            torch.equal(weights[f"medusa_heads.{h}.lm_head.weight"], lm_head.to(torch.bfloat16)) for h in range(n)
        )


# ----------------------------------------------------------------------------------------- pins: axolotl
def test_axolotl_export_is_a_full_model_transformers_loads_with_medusa_head(exported, model_dir):
    from transformers import AutoModelForCausalLM

    d = exported["v1", "axolotl"]
    conf = json.loads((d / "config.json").read_text())
    base_conf = json.loads((model_dir / "config.json").read_text())
    assert conf["medusa_num_heads"] == K and conf["medusa_num_layers"] == L
    assert {k: conf[k] for k in base_conf} == base_conf
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    assert not (d / "model.safetensors").exists()  # transformers would prefer it to the index
    heads = {n for n in index if n.startswith("medusa_head.")}
    assert heads == {f"medusa_head.{k}.0.linear.{p}" for k in range(K) for p in ("weight", "bias")} | {
        f"medusa_head.{k}.1.weight" for k in range(K)
    }
    hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        for name in ("lm_head.weight", "model.layers.5.mlp.down_proj.weight", "model.embed_tokens.weight"):
            assert torch.equal(hf.get_parameter(name).data, f.get_tensor(name).float()), name
    ref = fasterdecoding_medusa_head(K, L, H, V)
    sd = {}
    for name in heads:
        with safe_open(str(d / index[name]), framework="pt") as f:
            sd[name.removeprefix("medusa_head.")] = f.get_tensor(name)
    ref.load_state_dict(sd, strict=True)

"""Bad heads directories: ambiguous or partial layouts get one line naming what is wrong or missing.

Small synthetic heads (4 heads x 1 layer, hidden 16, vocab 40) keep these fast; the names and config
fields are the ones pinned in test_heads_layouts.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medusa_forge.errors import ForgeError
from medusa_forge.heads.checkpoint import load_heads, save_heads
from medusa_forge.heads.layouts import export_heads, inspect_heads, read
from medusa_forge.heads.layouts.base import BaseModel
from medusa_forge.heads.medusa_head import MedusaHeads, MedusaHeadsConfig

K, L, H, V = 4, 1, 16, 40


def random_heads(shared: bool = False, h: int = H, v: int = V, base: str = "base-model") -> MedusaHeads:
    heads = MedusaHeads(MedusaHeadsConfig(K, L, h, v, shared_lm_head=shared, base_model_name_or_path=base))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.2, generator=g)
    return heads


@pytest.fixture(scope="module")
def fd(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fd")
    save_heads(random_heads(), d)
    return d


@pytest.fixture(scope="module")
def vllm_dir(fd, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vllm") / "v"
    export_heads(fd, "vllm", out)
    return out


def weights_file(d: Path) -> Path:
    return next(f for f in d.iterdir() if f.suffix in (".safetensors", ".pt"))


def variant(src: Path, dst: Path, drop=(), add=None, config=None, remove_keys=()) -> Path:
    """A copy of ``src`` with tensors dropped/added and config fields changed."""
    shutil.copytree(src, dst)
    f = weights_file(dst)
    sd = load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, weights_only=True)
    sd = {k: v for k, v in sd.items() if k not in drop} | (add or {})
    save_file(sd, str(f)) if f.suffix == ".safetensors" else torch.save(sd, f)
    conf = json.loads((dst / "config.json").read_text()) | (config or {})
    for k in remove_keys:
        conf.pop(k)
    (dst / "config.json").write_text(json.dumps(conf))
    return dst


def expect_error(d: Path, expected: str, hidden: int = H, vocab: int = V) -> None:
    with pytest.raises(ForgeError) as e:
        load_heads(d, hidden, vocab)
    msg = str(e.value)
    assert expected in msg and "\n" not in msg, msg
    rep = inspect_heads(d)  # inspect reports the same problem instead of raising (without the base sizes)
    if hidden == H:
        assert rep.problems and expected in rep.problems[0], rep.problems


FD_CASES = {
    "missing_bias": (
        dict(drop=["2.0.linear.bias"]),
        "tensor 2.0.linear.bias missing: ResBlocks need a bias (nn.Linear(H, H) with bias=True)",
    ),
    "missing_block": (
        dict(drop=["1.0.linear.weight"]),
        "tensor 1.0.linear.weight missing (config.json says 4 heads x 1",
    ),
    "more_heads_than_config": (
        dict(config={"medusa_num_heads": 3}),
        "holds 4 Medusa heads (0..3) but config.json says medusa_num_heads=3",
    ),
    "fewer_heads_than_config": (
        dict(config={"medusa_num_heads": 5}),
        "config.json says medusa_num_heads=5 but head(s) [4] have no tensors",
    ),
    "wrong_layer_count": (
        dict(config={"medusa_num_layers": 2}),
        "holds 1 ResBlock(s) per head but config.json says medusa_num_layers=2",
    ),
    "layers_zero_but_blocks": (
        dict(config={"medusa_num_layers": 0}),
        "holds 1 ResBlock(s) per head but config.json says medusa_num_layers=0",
    ),
    "mixed_versions": (
        dict(drop=["3.1.weight"]),
        "mixed versions: head(s) [0, 1, 2] have their own vocab projection "
        "(0.1.weight) but head(s) [3] do not (3.1.weight missing",
    ),
    "version_2_with_projections": (
        dict(config={"version": "2"}),
        'config.json says version "2" (heads use the base lm_head) but 0.1.weight',
    ),
    "stray_tensor": (dict(add={"lora_A": torch.zeros(2)}), "unexpected tensors ['lora_A']"),
    "head_count_fields_disagree": (
        dict(config={"num_medusa_heads": 5}),
        "medusa_num_heads=4 and num_medusa_heads=5 disagree (ambiguous head count)",
    ),
    "heads_field_missing": (dict(remove_keys=["medusa_num_heads"]), "field medusa_num_heads missing"),
    "vocab_hint_disagrees": (dict(config={"vocab_size": 41}), "vocab_size=41 but the head tensors have 40"),
}


@pytest.mark.parametrize("case", list(FD_CASES))
def test_fasterdecoding_partial_or_ambiguous_heads_fail_with_one_line(case, fd, tmp_path):
    kwargs, expected = FD_CASES[case]
    expect_error(variant(fd, tmp_path / case, **kwargs), expected)


def test_both_weight_files_are_ambiguous(fd, tmp_path):
    d = variant(fd, tmp_path / "both")
    torch.save(load_file(str(d / "medusa_lm_head.safetensors")), d / "medusa_lm_head.pt")
    expect_error(d, "both medusa_lm_head.safetensors and medusa_lm_head.pt present: ambiguous")


def test_heads_file_next_to_a_full_model_with_heads_is_ambiguous(fd, tmp_path):
    d = variant(fd, tmp_path / "twice")
    sd = {"medusa_head." + k: v for k, v in load_file(str(d / "medusa_lm_head.safetensors")).items()}
    save_file(sd | {"model.norm.weight": torch.ones(H)}, str(d / "model.safetensors"))
    expect_error(d, "holds heads twice: medusa_lm_head.safetensors and medusa_head.* tensors")


def test_vllm_config_beside_a_fasterdecoding_heads_file_is_ambiguous(fd, vllm_dir, tmp_path):
    d = variant(vllm_dir, tmp_path / "both_layouts")
    shutil.copy(fd / "medusa_lm_head.safetensors", d / "medusa_lm_head.safetensors")
    expect_error(
        d,
        "config.json declares vLLM's Medusa layout but medusa_lm_head.safetensors (FasterDecoding layout) "
        "is here too: ambiguous",
    )


def test_pt_files_in_torchs_legacy_serialization_still_load(fd, tmp_path):
    """2023-era checkpoints may predate the zip format; they cannot be memory-mapped but must still load."""
    d = variant(fd, tmp_path / "legacy_pt")
    sd = load_file(str(d / "medusa_lm_head.safetensors"))
    (d / "medusa_lm_head.safetensors").unlink()
    torch.save(sd, d / "medusa_lm_head.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(load_heads(d, H, V).proj_weight, load_heads(fd, H, V).proj_weight)


def test_pickles_other_than_plain_tensor_dicts_are_refused(fd, tmp_path):
    d = variant(fd, tmp_path / "pickle")
    (d / "medusa_lm_head.safetensors").unlink()
    torch.save({"0.0.linear": nn.Linear(2, 2)}, d / "medusa_lm_head.pt")
    expect_error(d, "cannot be loaded with weights_only=True")


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"model_type": "llama"}, "not a Medusa heads config: no medusa_num_heads"),
        ({"medusa_num_heads": 4, "medusa_num_layers": 1}, "no medusa_lm_head.safetensors or medusa_lm_head.pt found"),
        ({"medusa": {"num_medusa_heads": 4}}, "ModelOpt quantized Medusa checkpoint"),
    ],
)
def test_directories_that_are_not_heads_say_so(config, expected, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config))
    expect_error(tmp_path, expected)


def test_full_model_in_pickled_bin_shards_is_named_as_such(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "medusa_num_heads": 4, "medusa_num_layers": 1})
    )
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    expect_error(
        tmp_path, "the model weights are PyTorch .bin (an axolotl full model?): pickled checkpoints are not loaded"
    )


def test_heads_for_another_base_model_do_not_match(fd):
    with pytest.raises(ForgeError, match="heads do not match the base"):
        load_heads(fd, 32, V)
    with pytest.raises(ForgeError, match=r"tensor 0.1.weight has shape \[40, 16\], expected \[41, 16\]"):
        load_heads(fd, H, 41)


VLLM_CASES = {
    "bias_but_fc_bias_false": (
        dict(config={"medusa_fc_bias": False}),
        "present but medusa_fc_bias is false in config.json (the loader would ignore it)",
    ),
    "fc_bias_true_bias_missing": (
        dict(drop=["blocks.1.layers.0.bias"]),
        "tensor blocks.1.layers.0.bias missing: ResBlocks need a bias",
    ),
    "original_lm_head_without_copy": (
        dict(config={"original_lm_head": True}, drop=[f"lm_heads.{k}.weight" for k in range(K)]),
        "original_lm_head is true but lm_head.weight (vLLM's copy of the base lm_head) is missing",
    ),
    "original_lm_head_with_per_head": (
        dict(config={"original_lm_head": True}),
        "original_lm_head is true (heads use the base lm_head) but lm_heads.1.weight "
        "(a per-head vocab projection) is present: mixed versions",
    ),
    "per_head_missing_one": (dict(drop=["lm_heads.2.weight"]), "mixed versions: head(s) [0, 1, 3] have their own"),
    "truncated_vocab": (dict(config={"truncated_vocab_size": 30}), "truncated_vocab_size=30 < vocab_size=40"),
    "two_head_counts": (
        dict(config={"medusa_num_heads": 5}),
        "num_heads=4, medusa_num_heads=5 disagree; vLLM maps all of them to num_heads (ambiguous)",
    ),
    "no_head_count": (dict(remove_keys=["num_heads"]), "field num_heads missing (vLLM would fall back to its default)"),
    "hidden_hint_wrong": (dict(config={"hidden_size": 32}), "hidden_size=32 but the head tensors have 16"),
}


@pytest.mark.parametrize("case", list(VLLM_CASES))
def test_vllm_partial_or_ambiguous_heads_fail_with_one_line(case, vllm_dir, tmp_path):
    kwargs, expected = VLLM_CASES[case]
    expect_error(variant(vllm_dir, tmp_path / case, **kwargs), expected)


def test_vllm_without_biases_reads_as_zero_biases(vllm_dir, tmp_path):
    """``medusa_fc_bias`` false: vLLM's Linear has no bias, which computes exactly what a zero bias does."""
    d = variant(
        vllm_dir,
        tmp_path / "nobias",
        config={"medusa_fc_bias": False},
        drop=[f"blocks.{k}.layers.0.bias" for k in range(K)],
    )
    heads = load_heads(d, H, V)
    assert heads.res_bias.abs().sum() == 0 and torch.equal(heads.res_weight, load_heads(vllm_dir, H, V).res_weight)


def test_axolotl_config_without_head_tensors(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "medusa_num_heads": 4, "medusa_num_layers": 1})
    )
    save_file({"model.norm.weight": torch.ones(H)}, str(tmp_path / "model.safetensors"))
    expect_error(tmp_path, "config.json has medusa_num_heads but the model shards hold no medusa_head.* tensors")


def test_axolotl_with_a_head_missing_its_projection_is_mixed(fd, tmp_path):
    sd = {"medusa_head." + k: v for k, v in load_file(str(fd / "medusa_lm_head.safetensors")).items()}
    del sd["medusa_head.1.1.weight"]
    save_file(sd | {"model.norm.weight": torch.ones(H)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "medusa_num_heads": 4, "medusa_num_layers": 1})
    )
    expect_error(tmp_path, "mixed versions: head(s) [0, 2, 3] have their own vocab projection (medusa_head.0.1.weight)")


def test_fasterdecoding_repeated_resblock_files_load_exactly(tmp_path):
    """FasterDecoding's ``[ResBlock(h)] * L`` repeats one module; torch.save keeps L equal copies."""

    class ResBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(H, H)

    block = ResBlock()
    ref = nn.ModuleList([nn.Sequential(*([block] * 2), nn.Linear(H, V, bias=False)) for _ in range(K)])
    torch.save(ref.state_dict(), tmp_path / "medusa_lm_head.pt")
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": K, "medusa_num_layers": 2}))
    heads = load_heads(tmp_path, H, V)
    assert heads.config.num_layers == 2 and torch.equal(heads.res_weight[:, 0], heads.res_weight[:, 1])
    assert torch.equal(heads.res_weight[0, 1], block.linear.weight.detach())


# ----------------------------------------------------------------------------------------- export
def test_shared_heads_to_a_per_head_target_need_the_base_model(tmp_path):
    src = tmp_path / "v2"
    src.mkdir()
    save_heads(random_heads(shared=True), src)
    for target, why in (
        ("trtllm-medusa-dir", "TensorRT-LLM reads a vocab projection per head"),
        ("vllm", "vLLM keeps its own copy of the base lm_head"),
        ("axolotl", "axolotl heads end in their own Linear(H, V)"),
    ):
        with pytest.raises(ForgeError, match="pass --base-model DIR") as e:
            export_heads(src, target, tmp_path / target)
        assert why in str(e.value) and not (tmp_path / target).exists()
    export_heads(src, "tgi", tmp_path / "tgi")  # one layer: TGI's MedusaHeadV2 runs them shared
    assert read(tmp_path / "tgi")[1].shared_lm_head


def test_tgi_needs_a_base_model_name(tmp_path):
    src = tmp_path / "noname"
    src.mkdir()
    save_heads(random_heads(base=""), src)
    with pytest.raises(ForgeError, match="TGI loads the base model from config.json's base_model_name_or_path"):
        export_heads(src, "tgi", tmp_path / "tgi")
    assert not (tmp_path / "tgi").exists()


def test_vllm_lm_head_copy_from_another_base_is_caught(model_dir, tmp_path):
    src = tmp_path / "v2"
    src.mkdir()
    save_heads(random_heads(shared=True, h=512, v=8192), src)
    export_heads(src, "vllm", tmp_path / "vllm", base_model=model_dir)
    sd = load_file(str(tmp_path / "vllm" / "model.safetensors"))
    sd["lm_head.weight"] = sd["lm_head.weight"] * 1.5
    save_file(sd, str(tmp_path / "vllm" / "model.safetensors"))
    assert read(tmp_path / "vllm")[1].shared_lm_head  # fine without a base to compare with
    with pytest.raises(ForgeError, match="the stored lm_head.weight differs from .*lm_head"):
        read(tmp_path / "vllm", BaseModel.open(model_dir))
    rep = inspect_heads(tmp_path / "vllm", model_dir)
    assert rep.layout == "vllm" and "differs" in rep.problems[0]

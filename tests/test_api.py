"""Public API behaviour: config resolution, errors with remedies, idempotency, context manager, integrations."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from conftest import SPECS, get_model, hook_snapshot, inputs_for

import vlmprune
from vlmprune import config as config_mod
from vlmprune.testing import tiny_model


def test_listing():
    assert {"random", "uniform", "pool"} <= set(vlmprune.list_methods())
    assert {"llava", "qwen2_vl", "qwen2_5_vl"} <= set(vlmprune.list_supported_models())
    assert vlmprune.list_methods() == sorted(vlmprune.list_methods())


def test_config_object_and_name_are_equivalent():
    model = get_model("llava")
    inputs = inputs_for(model)
    with vlmprune.patched(model, method="random", keep=5, seed=2):
        a = model(**inputs).logits
        cfg = vlmprune.get_config(model)
    with vlmprune.patched(model, vlmprune.RandomConfig(keep=5, seed=2)):
        b = model(**inputs).logits
    assert torch.equal(a, b)
    assert cfg.to_dict() == {"method": "random", "keep": 5, "seed": 2, "position_mode": "auto"}
    assert vlmprune.RandomConfig.from_dict(cfg.to_dict()) == cfg


def test_patch_returns_same_object_and_context_manager_restores_on_error():
    model = get_model("llava")
    assert vlmprune.patch(model, method="uniform", keep=0.5) is model
    vlmprune.unpatch(model)
    with pytest.raises(RuntimeError, match="boom"):
        with vlmprune.patched(model, method="uniform", keep=0.5):
            assert vlmprune.is_patched(model)
            raise RuntimeError("boom")
    assert not vlmprune.is_patched(model)


def test_patch_twice_raises_unless_replace():
    model = get_model("llava")
    before = hook_snapshot(model)
    vlmprune.patch(model, method="uniform", keep=0.5)
    try:
        with pytest.raises(vlmprune.AlreadyPatchedError, match=r"already patched with 'uniform'.*unpatch"):
            vlmprune.patch(model, method="pool", keep=0.5)
        vlmprune.patch(model, method="pool", keep=0.25, replace=True)
        assert vlmprune.get_config(model).name == "pool"
    finally:
        vlmprune.unpatch(model)
    assert hook_snapshot(model) == before
    with pytest.raises(vlmprune.NotPatchedError):
        vlmprune.unpatch(model)


def test_unknown_method_suggests():
    with pytest.raises(vlmprune.UnknownMethodError, match=r"'unifrom'.*Did you mean 'uniform'.*Available"):
        vlmprune.patch(get_model("llava"), method="unifrom", keep=0.5)
    with pytest.raises(ValueError):  # also a ValueError for generic handlers
        vlmprune.make_config("nope")


@pytest.mark.parametrize(
    "keep,match",
    [
        (0.0, r"\(0, 1\]"),
        (1.5, r"\(0, 1\]"),
        (-3, ">= 1"),
        (0, ">= 1"),
        (float("nan"), "nan"),
        (True, "bool"),
        ("0.5", "str"),
        (None, "NoneType"),
    ],
)
def test_bad_keep(keep, match):
    with pytest.raises(vlmprune.ConfigError, match=match):
        vlmprune.make_config("uniform", keep=keep)


def test_unknown_option_and_bad_fields():
    with pytest.raises(vlmprune.ConfigError, match=r"'kep' \(did you mean 'keep'\?\)"):
        vlmprune.make_config("uniform", kep=0.5)
    with pytest.raises(vlmprune.ConfigError, match="seed"):
        vlmprune.make_config("random", seed=1.5)
    with pytest.raises(vlmprune.ConfigError, match="position_mode"):
        vlmprune.make_config("random", position_mode="middle")
    with pytest.raises(vlmprune.ConfigError, match="extra options"):
        vlmprune.make_config(vlmprune.UniformConfig(), keep=0.5)


def test_keep_int_one_warns_once(monkeypatch):
    monkeypatch.setattr(config_mod, "_warned_keep_one", False)
    with pytest.warns(UserWarning, match="keep=1.0"):
        vlmprune.UniformConfig(keep=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vlmprune.UniformConfig(keep=1)


def test_contiguous_positions_rejected_for_mrope():
    with pytest.raises(vlmprune.ConfigError, match="M-RoPE"):
        vlmprune.patch(get_model("qwen2_vl"), method="uniform", keep=0.5, position_mode="contiguous")
    assert not vlmprune.is_patched(get_model("qwen2_vl"))


def test_unsupported_model_lists_supported():
    import transformers as tf

    llm = tf.LlamaForCausalLM(
        tf.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    listed = r"'llama'.*Supported model types: fast_vlm, llava, llava_next, llava_onevision, qwen2_5_vl"
    with pytest.raises(vlmprune.UnsupportedModelError, match=listed):
        vlmprune.patch(llm, method="uniform", keep=0.5)
    with pytest.raises(vlmprune.UnsupportedModelError, match="transformers model"):
        vlmprune.patch(torch.nn.Linear(2, 2), method="uniform", keep=0.5)


@pytest.mark.parametrize("version,err", [("4.57.6", True), ("6.0.0", True), ("5.0.0", False)])
def test_version_gate(version, err):
    from vlmprune._versions import check_transformers

    if err:
        with pytest.raises(vlmprune.UnsupportedVersionError, match=r"transformers>=5\.0\.0,<6.*pip install"):
            check_transformers(version)
    else:
        check_transformers(version)


def test_version_gate_applies_in_patch(monkeypatch):
    from vlmprune import _versions

    monkeypatch.setattr(_versions, "installed_version", lambda: "4.40.0")
    model = get_model("llava")
    with pytest.raises(vlmprune.UnsupportedVersionError, match="4.40.0"):
        vlmprune.patch(model, method="uniform", keep=0.5)
    assert not vlmprune.is_patched(model)


def test_newer_than_tested_warns():
    from vlmprune._versions import check_transformers

    with pytest.warns(UserWarning, match="newer than the newest"):
        check_transformers("5.99.0")


def test_labels_while_pruning_raise():
    model = get_model("llava")
    inputs = inputs_for(model)
    with vlmprune.patched(model, method="uniform", keep=0.5):
        with pytest.raises(vlmprune.LabelsWhilePruningError, match="pruned coordinates"):
            model(**inputs, labels=inputs["input_ids"])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_placeholder_mismatch(family):
    model = get_model(family)
    inputs = inputs_for(model)
    ids = inputs["input_ids"].clone()
    pos = (ids[0] == model.config.image_token_id).nonzero()[0, 0]
    ids[0, pos] = 7  # one placeholder fewer than the image needs
    inputs["input_ids"] = ids
    with vlmprune.patched(model, method="uniform", keep=0.5):
        with pytest.raises(vlmprune.PlaceholderMismatchError, match="placeholder tokens.*processor"):
            model(**inputs)


def test_bypassed_patch_is_an_error():
    model = get_model("llava")
    inputs = inputs_for(model)
    vlmprune.patch(model, method="uniform", keep=0.5)
    try:
        shadow = model.model.__dict__.pop("get_placeholder_mask")  # simulate a model that no longer calls it
        with pytest.raises(vlmprune.PatchBypassedError, match="did not run"):
            model(**inputs)
        model.model.__dict__["get_placeholder_mask"] = shadow
    finally:
        vlmprune.unpatch(model)


def test_new_images_after_filled_cache_raise():
    model = get_model("llava")
    inputs = inputs_for(model, [[3, "image", 2]])
    with vlmprune.patched(model, method="uniform", keep=0.5), torch.no_grad():
        out = model(**inputs, use_cache=True)
        with pytest.raises(vlmprune.UnsupportedInputError, match="already holds"):
            model(**inputs, past_key_values=out.past_key_values, use_cache=True)


def test_text_only_call_on_patched_model_is_unchanged():
    model = get_model("qwen2_vl")
    inputs = inputs_for(model, [[9]])
    with torch.no_grad():
        ref = model(**inputs).logits
        with vlmprune.patched(model, method="uniform", keep=0.25):
            assert torch.equal(model(**inputs).logits, ref)


def test_last_stats_reports_per_image():
    model = get_model("qwen2_vl")
    inputs = inputs_for(model)
    with vlmprune.patched(model, method="uniform", keep=0.25), torch.no_grad():
        assert vlmprune.last_stats(model) == {}
        model(**inputs)
        st = vlmprune.last_stats(model)
    assert [i["tokens_in"] for i in st["images"]] == [16, 24, 8]
    assert [i["tokens_out"] for i in st["images"]] == [4, 6, 2]
    assert st["vision_tokens_in"] == 48 and st["vision_tokens_out"] == 12
    assert st["seq_len_in"] == [26, 43] and st["seq_len_out"] == [14, 19]
    assert st["selection_s"] >= 0


def test_import_is_lean():
    code = (
        "import sys, vlmprune; bad = [m for m in sys.modules if m.split('.')[0] in "
        "('lmms_eval', 'datasets', 'transformers', 'accelerate', 'matplotlib')]; print(bad); "
        "assert not bad, bad; assert not hasattr(__import__('torch'), '_vlmprune')"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_adapters_import_from_installed_package():
    import importlib

    for name in vlmprune.list_supported_models():
        from vlmprune.patches import ADAPTERS

        assert ADAPTERS.get(name).model_types == (name,)
    assert importlib.import_module("vlmprune.patches.llava").__name__ == "vlmprune.patches.llava"


def test_accelerate_dispatch_with_disk_offload(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    model = tiny_model("llava", seed=3)
    inputs = inputs_for(model, SPECS["llava"])
    ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with vlmprune.patched(model, method="uniform", keep=0.25):
        pruned_plain = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    device_map = {
        "model.vision_tower": "cpu",
        "model.multi_modal_projector": "cpu",
        "model.language_model.embed_tokens": "cpu",
        "model.language_model.layers.0": "cpu",
        "model.language_model.layers.1": "disk",
        "model.language_model.layers.2": "cpu",
        "model.language_model.norm": "cpu",
        "model.language_model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    model = accelerate.dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path))
    hooked = {n: (m.__dict__.get("forward"), m.__dict__.get("_hf_hook")) for n, m in model.named_modules()}
    assert any(h is not None for _, h in hooked.values())
    with vlmprune.patched(model, method="uniform", keep=0.25):
        pruned = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    after = {n: (m.__dict__.get("forward"), m.__dict__.get("_hf_hook")) for n, m in model.named_modules()}
    assert after == hooked
    assert torch.equal(pruned, pruned_plain)
    assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), ref)


def test_peft_wrapped_model():
    peft = pytest.importorskip("peft")
    model = tiny_model("llava", seed=4)
    inputs = inputs_for(model)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    wrapped.eval()
    with torch.no_grad():
        ref = wrapped(**inputs).logits
        assert vlmprune.patch(wrapped, method="uniform", keep=0.25) is wrapped
        assert vlmprune.is_patched(wrapped) and vlmprune.is_patched(model)
        pruned = wrapped(**inputs).logits
        assert pruned.shape[1] < ref.shape[1]
        vlmprune.unpatch(wrapped)
        assert torch.equal(wrapped(**inputs).logits, ref)


def test_failed_install_leaves_nothing_behind():
    model = get_model("qwen2_vl")
    before = hook_snapshot(model)
    model.model.__dict__["get_placeholder_mask"] = model.model.get_placeholder_mask  # another tool's shadow
    try:
        with pytest.raises(vlmprune.UnsupportedModelError, match="already overridden"):
            vlmprune.patch(model, method="uniform", keep=0.5)
        assert not vlmprune.is_patched(model)
    finally:
        del model.model.__dict__["get_placeholder_mask"]
    assert hook_snapshot(model) == before


def test_methods_needing_vit_signals_are_refused_where_unavailable():
    """What conftest.require skips is refused by patch() with a clear error, never run half-way."""
    from conftest import supports

    from vlmprune.testing import FAMILIES

    refused = []
    for family in FAMILIES:
        model = get_model(family)
        for method in vlmprune.list_methods():
            if supports(model, method):
                continue
            need = sorted(vlmprune.make_config(method).build().requires)
            with pytest.raises(vlmprune.UnsupportedModelError, match=rf"method '{method}' needs \{need}"):
                vlmprune.patch(model, method=method)
            assert not vlmprune.is_patched(model)
            refused.append((family, method))
    assert ("fast_vlm", "hiprune") in refused and ("fast_vlm", "visionzip") in refused
    # the ViT families support every method, except fastvlm's default encoder strategy on anyres crops
    anyres = {("llava_next", "fastvlm"), ("llava_onevision", "fastvlm")}
    assert all(f == "fast_vlm" or (f, m) in anyres for f, m in refused), refused


def test_fast_vlm_grid_from_the_feature_map():
    """FastVLM's tokens are its encoder's feature map in raster order: the grid comes from the image size."""
    model = get_model("fast_vlm")
    inputs = inputs_for(model, [[3, "image", 2]])
    with vlmprune.patched(model, method="pool", keep=4), torch.no_grad():
        model(**inputs)
        image = vlmprune.last_stats(model)["images"][0]
    assert image["grid"] == [1, 4, 4] and image["tokens_out"] == 4

"""The adapter/method interface carries methods that need a vision-tower signal and methods that add hooks.

A test-only method captures the CLIP feature layer's token norms through its own hook (registered in
``attach``), receives them per image through ``ImageTokens.extras`` and keeps the highest-norm tokens. Its
choices are checked against norms computed independently on the unpatched tower, through ``forward`` and
through ``generate()`` (which pre-encodes images outside the VLM call in transformers 5.2x), with beams.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import LLMProbe, get_model, hook_snapshot, inputs_for

import vlmprune
from vlmprune.config import PruneConfig
from vlmprune.methods import METHODS, register_method
from vlmprune.methods.base import ImageTokens, Method, Selection


@dataclasses.dataclass
class TopNormConfig(PruneConfig):
    name = "test_topnorm"

    def build(self) -> Method:
        return TopNormMethod(self)


class TopNormMethod(Method):
    def attach(self, ctx) -> None:
        self.pending: list[torch.Tensor] = []
        tower = ctx.model.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        layer = layers[ctx.model.config.vision_feature_layer]  # the block whose output LLaVA uses

        def hook(mod, args, out):
            hidden = out[0] if isinstance(out, tuple) else out
            self.pending.append(hidden[:, 1:].norm(dim=-1))  # drop CLS, as LLaVA's "default" strategy does

        ctx.register(layer.register_forward_hook(hook))
        self.attached = True

    def detach(self) -> None:
        self.attached = False

    def begin_encode(self, kind):
        self.pending = []

    def end_encode(self, kind, features):
        norms = torch.cat(self.pending)
        return [{"norm": norms[i]} for i in range(len(features))]

    def select(self, item: ImageTokens) -> Selection:
        top = item.extras["norm"].topk(item.budget).indices
        return Selection(top.sort().values)


@pytest.fixture
def topnorm():
    register_method("test_topnorm", TopNormConfig)
    yield
    METHODS.unregister("test_topnorm")


def _independent_kept(model, inputs, k):
    with torch.no_grad():
        hs = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
    norms = hs[model.config.vision_feature_layer][:, 1:].norm(dim=-1)
    return norms.topk(k, dim=-1).indices.sort(-1).values


@pytest.mark.parametrize("run", ["forward", "generate", "beams"])
def test_vision_signal_method_via_forward_and_generate(topnorm, run):
    model = get_model("llava")
    # beams: one image per sample (transformers 5.0 expands multi-image pixel_values per image, not per sample)
    inputs = inputs_for(model, [[5, "image", 3], [2, "image", 4]] if run == "beams" else None)
    k = 5
    want = _independent_kept(model, inputs, k)
    before = hook_snapshot(model)  # after: transformers installs its own output-capturing hooks lazily
    with torch.no_grad():
        feats = torch.stack(model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
    expected = feats.gather(1, want[..., None].expand(-1, -1, feats.shape[-1]))  # (n_img, k, D)
    vlmprune.patch(model, method="test_topnorm", keep=k)
    method = model._vlmprune_state.method
    try:
        assert method.attached
        with LLMProbe(model) as probe, torch.no_grad():
            if run == "forward":
                model(**inputs)
            else:
                model.generate(**inputs, max_new_tokens=2, do_sample=False, num_beams=2 if run == "beams" else 1)
        call = probe.calls[0]
        tok = model.config.image_token_id
        emb_img = model.get_input_embeddings().weight[tok]
        got_rows = []
        for b in range(call["inputs_embeds"].shape[0]):
            real = call["inputs_embeds"][b][call["attention_mask"][b].bool()]
            text = model.get_input_embeddings()(inputs["input_ids"][b // (2 if run == "beams" else 1)])
            is_text = (real[:, None, :] == text[None]).all(-1).any(-1)
            got_rows.append(real[~is_text])
            assert not (real == emb_img).all(-1).any()
        got = torch.cat(got_rows)
        exp = expected.reshape(-1, expected.shape[-1])
        if run == "beams":
            exp = torch.cat([expected[0], expected[0], expected[1], expected[1]])
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5, msg=run)
    finally:
        vlmprune.unpatch(model)
    assert not method.attached
    assert hook_snapshot(model) == before


def test_required_signal_missing_is_refused(topnorm):
    class NeedsConfig(TopNormConfig):
        name = "test_needs"

        def build(self):
            m = TopNormMethod(self)
            m.requires = frozenset({"no_adapter_provides_this"})
            return m

    with pytest.raises(vlmprune.UnsupportedModelError, match=r"needs \[.no_adapter_provides_this.\].*uniform"):
        vlmprune.patch(get_model("llava"), NeedsConfig(keep=4))
    assert not vlmprune.is_patched(get_model("llava"))

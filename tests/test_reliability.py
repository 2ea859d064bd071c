"""Bad inputs get named errors; repeated use leaves nothing behind; threads are supported or refused explicitly."""

from __future__ import annotations

import dataclasses
import gc
import math
import threading
import tracemalloc
import typing

import pytest
import torch
from conftest import get_model, hook_snapshot, inputs_for, supports

import vlmprune
from vlmprune.methods import METHODS
from vlmprune.testing import tiny_model

# ---- malformed configs, for every registered method (new methods are covered automatically) -------------------


def _fields(method: str) -> list[tuple[str, str]]:
    cls = METHODS.get(method)
    hints = typing.get_type_hints(cls)
    return [(f.name, str(hints[f.name])) for f in dataclasses.fields(cls) if f.init]


def _bad_values(annotation: str) -> list[typing.Any]:
    bad: list[typing.Any] = [object()]  # no field takes an arbitrary object
    if "str" not in annotation:
        bad.append("x")
    if "bool" not in annotation:
        bad.append(True)
    if "float" in annotation or "int" in annotation:
        bad.append(float("nan"))
    return bad


@pytest.mark.parametrize("method", vlmprune.list_methods())
def test_malformed_values_of_every_field_raise_config_errors(method):
    tried = 0
    for name, annotation in _fields(method):
        for value in _bad_values(annotation):
            with pytest.raises((vlmprune.ConfigError, vlmprune.UnknownMethodError)) as err:
                vlmprune.make_config(method, **{name: value})
            assert name in str(err.value) or repr(value) in str(err.value) or "method" in str(err.value)
            tried += 1
    keep_default = {f.name: f.default for f in dataclasses.fields(METHODS.get(method))}["keep"]
    for keep in (-1, 0, 0.0, 1.5, float("nan"), float("inf"), "0.5", True, None):
        if keep is None and keep_default is None:  # (DAMRO: None = "the default budget", documented)
            continue
        with pytest.raises(vlmprune.ConfigError, match="keep"):
            vlmprune.make_config(method, keep=keep)
    with pytest.raises(vlmprune.ConfigError, match="did you mean 'keep'"):
        vlmprune.make_config(method, kep=0.5)
    assert tried >= 3 * len(_fields(method))


# ---- models the patch cannot or must not work on ------------------------------------------------------------------


def test_replaced_vision_tower_is_reported_not_ignored():
    """A method reading the ViT (HiPrune) hooked the old tower: after a swap it raises instead of guessing; a
    method that needs no ViT signal keeps working (the cut is at the LLM input)."""
    model = tiny_model("llava", seed=1)
    inputs = inputs_for(model)
    with vlmprune.patched(model, method="hiprune", keep=0.25):
        model.model.vision_tower = tiny_model("llava", seed=2).model.vision_tower
        with pytest.raises(vlmprune.PatchBypassedError, match="attention probe"), torch.no_grad():
            model(**inputs)
    with vlmprune.patched(model, method="uniform", keep=0.25), torch.no_grad():
        model(**inputs)
        assert vlmprune.last_stats(model)["vision_tokens_out"] < vlmprune.last_stats(model)["vision_tokens_in"]


def test_torch_compile_patch_first_then_compile():
    model = tiny_model("llava", seed=1)
    inputs = inputs_for(model)
    compiled = torch.compile(model, backend="eager")
    with pytest.raises(vlmprune.UnsupportedModelError, match="Patch the model first, then compile"):
        vlmprune.patch(compiled, method="uniform", keep=0.25)
    assert not vlmprune.is_patched(model)
    vlmprune.patch(model, method="uniform", keep=0.25)
    with torch.no_grad():
        ref = model(**inputs).logits
        got = torch.compile(model, backend="eager")(**inputs).logits
    torch.testing.assert_close(got, ref)


def test_patch_on_the_meta_device_then_load_weights():
    """Patching only installs hooks, so a model built on the meta device (accelerate's init_empty_weights) can be
    patched before its weights are loaded."""
    real = tiny_model("qwen2_vl", seed=1)
    with torch.device("meta"):
        empty = tiny_model("qwen2_vl", seed=1)
    vlmprune.patch(empty, method="hiprune", keep=0.25)
    empty.to_empty(device="cpu")
    empty.load_state_dict(real.state_dict())
    for name, buf in real.named_buffers():  # non-persistent buffers (rotary tables) are rebuilt by the model
        empty.get_buffer(name).copy_(buf)
    inputs = inputs_for(real)
    with torch.no_grad():
        got = empty(**inputs).logits
        with vlmprune.patched(real, method="hiprune", keep=0.25):
            ref = real(**inputs).logits
    torch.testing.assert_close(got, ref)


def test_calls_after_unpatch():
    model = get_model("llava")
    inputs = inputs_for(model)
    with torch.no_grad():
        ref = model(**inputs).logits
    vlmprune.patch(model, method="random", keep=0.25)
    vlmprune.unpatch(model)
    for fn in (vlmprune.unpatch, vlmprune.last_stats, vlmprune.get_config):
        with pytest.raises(vlmprune.NotPatchedError):
            fn(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)


# ---- stability -------------------------------------------------------------------------------------------------


def _traced_kib(fn: typing.Callable[[], None]) -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    fn()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / 1024


@pytest.mark.parametrize("family", ["llava", "qwen3_vl"])
def test_a_thousand_patch_cycles_leave_nothing_behind(family):
    model = get_model(family)
    inputs = inputs_for(model)
    before = hook_snapshot(model)
    with torch.no_grad():
        ref = model(**inputs).logits
    methods = [m for m in vlmprune.list_methods() if supports(model, m)]  # the others are refused up front

    def cycles(n: int) -> None:
        for i in range(n):
            vlmprune.patch(model, method=methods[i % len(methods)])
            vlmprune.unpatch(model)

    cycles(50)  # warm caches (imports, registries)
    grown = _traced_kib(lambda: cycles(1000))
    assert hook_snapshot(model) == before
    assert grown < 64, f"{grown:.0f} KiB still allocated after 1000 patch/unpatch cycles"
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)


def test_two_hundred_patched_generations_do_not_grow():
    model = get_model("qwen2_vl")
    inputs = inputs_for(model)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=2, do_sample=False)

    def generations(n: int) -> None:
        with torch.no_grad():
            for _ in range(n):
                model.generate(**inputs, max_new_tokens=2, do_sample=False)

    def live_tensors() -> int:  # tracemalloc does not see tensor storage: count live tensors too
        gc.collect()
        return sum(1 for o in gc.get_objects() if torch.is_tensor(o))

    with vlmprune.patched(model, method="hiprune", keep=0.25):
        state = model._vlmprune_state
        generations(20)
        handles, tensors = len(state.handles), live_tensors()
        grown = _traced_kib(lambda: generations(200))
        assert live_tensors() <= tensors + 8, "tensors accumulate across patched generate() calls"
        assert len(state.handles) == handles and len(state._encoded) <= 2 * len(state.stats["images"])
        assert len(state._pruned_caches) <= 2
    assert grown < 256, f"{grown:.0f} KiB still allocated after 200 patched generate() calls"
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, max_new_tokens=2, do_sample=False), ref)


# ---- threads --------------------------------------------------------------------------------------------------


def test_two_patched_models_in_two_threads():
    """Each model has its own patch state: two patched models generate concurrently and give their
    single-threaded outputs."""
    models = [tiny_model("llava", seed=1), tiny_model("qwen2_vl", seed=1)]
    inputs = [inputs_for(m) for m in models]
    for m in models:
        vlmprune.patch(m, method="hiprune", keep=0.25)
    with torch.no_grad():
        refs = [m.generate(**x, max_new_tokens=4, do_sample=False) for m, x in zip(models, inputs, strict=True)]
    results: dict[int, typing.Any] = {}

    def work(i: int) -> None:
        try:
            with torch.no_grad():
                results[i] = [models[i].generate(**inputs[i], max_new_tokens=4, do_sample=False) for _ in range(5)]
        except Exception as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert not isinstance(results[i], Exception), results[i]
        assert all(torch.equal(out, refs[i]) for out in results[i])


@pytest.mark.parametrize("hold", ["vision_tower", "language_model"])
def test_one_model_from_two_threads_at_once_is_refused(hold):
    """A forward arriving from a second thread while one is in flight gets a named error, and the first one still
    runs pruned (the refusal must not disturb it)."""
    model = tiny_model("llava", seed=1)
    inputs = inputs_for(model)
    vlmprune.patch(model, method="uniform", keep=0.25)
    with torch.no_grad():
        expected = model(**inputs).logits
    entered, release = threading.Event(), threading.Event()

    def slow(mod, args, kwargs):  # hold the first forward inside the model
        if threading.current_thread() is not threading.main_thread():
            entered.set()
            release.wait(10)

    handle = getattr(model.model, hold).register_forward_pre_hook(slow, with_kwargs=True)
    results: list[typing.Any] = []

    def first() -> None:
        try:
            with torch.no_grad():
                results.append(model(**inputs).logits)
        except Exception as e:  # noqa: BLE001 - reported below
            results.append(e)

    t = threading.Thread(target=first)
    t.start()
    assert entered.wait(10)
    try:
        with pytest.raises(vlmprune.UnsupportedInputError, match="another thread"), torch.no_grad():
            model(**inputs)
    finally:
        release.set()
        t.join()
        handle.remove()
    assert len(results) == 1 and not isinstance(results[0], Exception), results
    assert torch.equal(results[0], expected)  # pruned, exactly as when alone
    with torch.no_grad():  # the model is usable again from any thread
        model(**inputs)


def test_generations_with_extra_unpruned_forwards_are_not_refused():
    """Legitimate interleavings keep working: classifier-free guidance's unconditional forwards, and a static cache
    that generate() resets and reuses for a text-only prompt after a pruned one."""
    model = get_model("llava")
    inputs = inputs_for(model)
    ids = torch.randint(3, 100, (1, 7))
    with vlmprune.patched(model, method="uniform", keep=0.25), torch.no_grad():
        cfg = model.generate(**inputs, max_new_tokens=3, do_sample=False, guidance_scale=1.5)
        assert cfg.shape[1] == inputs["input_ids"].shape[1] + 3
        for _ in range(2):
            model.generate(**inputs, max_new_tokens=3, do_sample=False, cache_implementation="static")
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=3,
                do_sample=False,
                cache_implementation="static",
            )


def test_interleaved_generations_on_one_model_are_refused():
    """Two generations interleaved on one patched model (what two threads taking turns do): the superseded one
    is refused at its next step instead of silently decoding against an unpruned view."""
    model = get_model("llava")
    inputs = inputs_for(model)
    with vlmprune.patched(model, method="uniform", keep=0.25), torch.no_grad():
        first = model(**inputs, use_cache=True)
        model(**inputs, use_cache=True)  # a second prefill replaces the first one's record
        nxt = first.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], 1)
        cache = first.cache if getattr(first, "cache", None) is not None else first.past_key_values
        with pytest.raises(vlmprune.UnsupportedInputError, match="interleaved"):
            model(input_ids=nxt, attention_mask=mask, past_key_values=cache)
    assert math.isfinite(float(first.logits.sum()))

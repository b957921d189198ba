"""Saved-activation recomputation in the heads' training step (upernet_fast.recompute).

What must hold: the rebuilt activations are bitwise the saved ones (so every gradient is bitwise the same
with and without recomputation), recomputation really runs (counted), it saves memory (counted in bytes
autograd keeps), an in-place change of something a recipe reads is refused, and a caller's own
saved-tensor hooks (offloading, checkpointing) are left in charge.
"""

import copy

import pytest
import torch
from models import batch, reference_model
from op_testing import require_backend

import upernet_fast
from upernet_fast import recompute

REAL_MIN_BYTES = recompute.MIN_BYTES  # (read before the fixture below sets it to 0 for each test)


@pytest.fixture(autouse=True)
def _small_maps_recompute(monkeypatch):
    """These tests' models are small: below recompute.MIN_BYTES the heads would not recompute at all (the rule's
    own tests below set it back)."""
    monkeypatch.setattr(recompute, "MIN_BYTES", 0)


def _converted(backend="cpp"):
    require_backend(backend)
    torch.manual_seed(0)
    model = upernet_fast.convert(reference_model("convnext", use_auxiliary_head=True), backend=backend)
    return model.train()


def _step(model):
    pixels, labels = batch()
    model.zero_grad(set_to_none=True)
    out = model(pixels, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_gradients_are_bitwise_the_same_with_and_without_recomputation():
    model = _converted()
    twin = copy.deepcopy(model)
    before = recompute.builds[0]
    loss, grads = _step(model)
    rebuilt = recompute.builds[0] - before
    with recompute.disabled():
        twin_loss, twin_grads = _step(twin)
    assert recompute.builds[0] - before == rebuilt  # nothing rebuilt while disabled
    # The FPN concat, the BN+ReLU outputs it is made of, the classifier's input, the PPM concat and its branches,
    # the auxiliary head's BN+ReLU output: at least these were rebuilt in the backward.
    assert rebuilt >= 4, rebuilt
    assert torch.equal(loss, twin_loss)
    assert grads.keys() == twin_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], twin_grads[name]), name
    # Running statistics are updated once per forward, recomputation or not.
    for (name, a), b in zip(model.named_buffers(), twin.buffers()):
        assert torch.equal(a, b), name


def _saved_bytes(model, pixels, labels, disabled):
    """Bytes of the distinct storages autograd keeps for the heads' backward (counted by an outer hook that
    sees what is saved while recomputation is off; with it on, what the recipes keep instead)."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    if disabled:
        with recompute.disabled(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(pixels, labels=labels)
        return sum(seen.values())
    # The recipes' own inputs, and the tensors saved as themselves: what stays alive until the backward.
    kept = {}
    original_pack = recompute._pack

    def counting_pack(t):
        saved = original_pack(t)
        tensors = [saved] if isinstance(saved, torch.Tensor) else _recipe_tensors(saved)
        for x in tensors:
            kept[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return saved

    recompute._pack = counting_pack
    try:
        model(pixels, labels=labels)
    finally:
        recompute._pack = original_pack
    return sum(kept.values())


def _recipe_tensors(recipe):
    out = []
    for value in recipe.inputs:
        if isinstance(value, recompute.Recipe):
            out += _recipe_tensors(value)
        elif isinstance(value, torch.Tensor):
            out.append(value)
    return out


def test_recomputation_keeps_fewer_bytes_for_the_backward():
    model = _converted()
    for p in model.backbone.parameters():  # the heads' activations only: the backbone saves the same either way
        p.requires_grad_(False)
    pixels, labels = batch(size=64)
    without = _saved_bytes(model, pixels, labels, disabled=True)
    with_recompute = _saved_bytes(model, pixels, labels, disabled=False)
    # The FPN concat (4 x hidden channels at 1/4 resolution) alone is the largest saved activation of the head.
    concat = 4 * 16 * 16 * 16 * 2 * 4  # 4 levels x hidden 16 channels, 16x16 at 1/4 of 64, batch 2, fp32
    assert with_recompute <= without - concat, (with_recompute, without)


def test_heads_recompute_only_from_min_bytes(monkeypatch):
    """The size rule: a head recomputes only when its largest saved map (the decode head's FPN concat) is at least
    recompute.MIN_BYTES, 8 MiB by default (this test model's concat is far smaller); gradients are bitwise the
    same either way."""
    assert REAL_MIN_BYTES == 8 * 2**20
    model = _converted()
    pixels, _ = batch()
    b, _, h, w = model.backbone(pixels).feature_maps[0].shape
    head = model.decode_head
    concat_bytes = 4 * b * len(head.in_channels) * head.channels * h * w
    assert concat_bytes < REAL_MIN_BYTES
    results = {}
    for bound in (concat_bytes + 1, concat_bytes):
        monkeypatch.setattr(recompute, "MIN_BYTES", bound)
        before = recompute.builds[0]
        results[bound] = (_step(copy.deepcopy(model)), recompute.builds[0] - before)
    (loss_off, grads_off), rebuilt_off = results[concat_bytes + 1]
    (loss_on, grads_on), rebuilt_on = results[concat_bytes]
    assert rebuilt_off == 0 and rebuilt_on >= 2, (rebuilt_off, rebuilt_on)
    assert torch.equal(loss_off, loss_on)
    for name in grads_on:
        assert torch.equal(grads_on[name], grads_off[name]), name


class _Entered(Exception):
    pass


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16 autocast"])
def test_heads_at_real_sizes_recompute_where_it_pays(monkeypatch, autocast):
    """The rule at the issue's sizes, read where each head enters recomputing() (a spy that stops the forward
    there: no convolution runs): ConvNeXt-T's decode head (4 x 512 channels) at batch 2, 256x256 (stride-4 maps
    64x64: a 64 MiB fp32 concat, 32 MiB in bf16) recomputes; at batch 1, 128x128 (32x32: 8 MiB) exactly at the
    bound in fp32, and not in bf16 (4 MiB); the auxiliary head (256 channels at stride 16: 0.5 MiB) does not."""
    monkeypatch.setattr(recompute, "MIN_BYTES", REAL_MIN_BYTES)
    entered = []

    def spy(enabled=True):
        entered.append(enabled)
        raise _Entered

    monkeypatch.setattr(recompute, "recomputing", spy)
    require_backend("cpp")
    model = upernet_fast.convert(reference_model("convnext", hidden_size=512, auxiliary_channels=256,
                                                 use_auxiliary_head=True), backend="cpp").train()
    expected = {(2, 64): True, (1, 32): not autocast}
    for (batch_size, side), want in expected.items():
        features = [torch.zeros(batch_size, c, side >> i, side >> i)
                    for i, c in enumerate(model.decode_head.in_channels)]
        for module, recomputes in ((model.decode_head, want), (model.auxiliary_head, False)):
            entered.clear()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), pytest.raises(_Entered):
                module(features)
            assert entered == [recomputes], (batch_size, side, type(module).__name__, entered)


def test_in_place_change_of_a_recipe_input_is_refused():
    model = _converted()
    pixels, labels = batch()
    loss = model(pixels, labels=labels).loss
    with torch.no_grad():
        model.decode_head.fpn_bottleneck.batch_norm.weight.mul_(2.0)  # read by the classifier input's recipe
    with pytest.raises(RuntimeError, match="modified"):
        loss.backward()


def test_callers_saved_tensor_hooks_stay_in_charge():
    model = _converted()
    twin = copy.deepcopy(model)
    before = recompute.builds[0]
    with torch.autograd.graph.save_on_cpu():
        loss, grads = _step(model)
    assert recompute.builds[0] == before  # the caller's hooks saved everything; no recipe was made or rebuilt
    twin_loss, twin_grads = _step(twin)
    assert torch.equal(loss, twin_loss)
    for name in grads:
        assert torch.equal(grads[name], twin_grads[name]), name


def test_eval_and_no_grad_make_no_recipes():
    model = _converted()
    pixels, _ = batch()
    with torch.no_grad():
        model(pixels)
    model.eval()
    model(pixels)
    assert len(recompute._recipes) == 0


def test_eager_backend_is_left_as_pytorch_builds_it():
    model = _converted("eager")
    before = recompute.builds[0]
    _step(model)
    assert recompute.builds[0] == before

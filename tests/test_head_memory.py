"""What the converted heads keep for their backward, and when their intermediate maps are freed (issue #12: the
CPU training step's peak memory at most 0.6x transformers' model's).

The bound below is computed from the shapes: the tensors that the heads' backward reads and that cannot be
rebuilt bitwise without rerunning a convolution. Anything else kept (an FPN sum, its NCHW copy, a concat, a
BN+ReLU output) is a regression: each of those is rebuilt in the backward from what is listed
(upernet_fast.recompute). Gradients with and without the rebuilding are compared bitwise in test_recompute.py.
"""

import contextlib
import copy
import weakref

import pytest
import torch
from models import batch, reference_model
from op_testing import require_backend

import upernet_fast
from upernet_fast import recompute
from upernet_fast.ops.conv_bn_relu import ConvBNReLU


@pytest.fixture(autouse=True)
def _small_maps_recompute(monkeypatch):
    """These tests' models are small: below recompute.MIN_BYTES the heads would not recompute at all, so the bound
    below is checked with the rule forced on. The issue's model qualifies (ConvNeXt-T's FPN concat at batch 2,
    256x256 is 64 MiB; tests/test_recompute.py checks the rule at that size)."""
    monkeypatch.setattr(recompute, "MIN_BYTES", 0)


def _converted():
    require_backend("cpp")
    torch.manual_seed(0)
    model = upernet_fast.convert(reference_model("convnext", use_auxiliary_head=True), backend="cpp").train()
    for p in model.backbone.parameters():  # the heads' activations only: the backbone keeps the same either way
        p.requires_grad_(False)
    return model


def _kept_bytes(model, pixels, labels) -> int:
    """Bytes of the distinct storages kept for the backward: tensors saved as themselves and the tensors the
    recipes read (parameters excluded: they are kept whatever the heads do)."""
    kept = {}
    original_pack = recompute._pack

    def keep(t):
        if not (t.requires_grad and t.grad_fn is None):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    def visit(saved):
        if isinstance(saved, recompute.Recipe):
            for value in saved.inputs:
                visit(value)
        elif isinstance(saved, torch.Tensor):
            keep(saved)

    def counting_pack(t):
        saved = original_pack(t)
        visit(saved)
        return saved

    recompute._pack = counting_pack
    try:
        out = model(pixels, labels=labels)
    finally:
        recompute._pack = original_pack
    del out
    return sum(kept.values())


def _must_keep_bytes(model, pixels) -> int:
    """From the shapes of one forward: the backbone maps the heads read (inputs of the lateral, PPM and auxiliary
    convolutions), the PPM's pooled maps (inputs of its 1x1 convolutions), and every block's convolution output
    and per-channel mean and 1/std (what BN+ReLU's backward reads). The loss runs outside the heads (its saved
    tensors, the logits plus a per-pixel log-sum-exp, are bounded in test_upsample_cross_entropy.py)."""
    shapes = []
    blocks = [m for m in model.modules() if isinstance(m, ConvBNReLU)]
    handles = [block.conv.register_forward_hook(lambda m, args, out: shapes.append(out.shape)) for block in blocks]
    handles += [
        branch.conv_block.conv.register_forward_hook(lambda m, args, out: shapes.append(args[0].shape))
        for branch in model.decode_head.psp_modules.blocks
    ]
    try:
        with torch.no_grad():
            features = model.backbone(pixels).feature_maps
            model.decode_head(features)
            model.auxiliary_head(features)
    finally:
        for handle in handles:
            handle.remove()
    floats = sum(f.numel() for f in features)
    floats += sum(shape.numel() for shape in shapes)
    floats += sum(2 * block.conv.out_channels for block in blocks)  # mean and 1/std
    return 4 * floats


def test_heads_keep_only_what_their_backward_cannot_rebuild():
    model = _converted()
    pixels, labels = batch(size=64)
    bound = _must_keep_bytes(model, pixels)
    kept = _kept_bytes(model, pixels, labels)
    # Equal today (184000 bytes). Before the FPN sums' NCHW copies were rebuilt too, kept was bound + 45056.
    assert kept <= bound, (kept, bound)


def test_fpn_maps_are_freed_before_fpn_bottleneck_runs():
    """No list of the head holds an FPN sum or an fpn_convs output while fpn_bottleneck's convolution runs (the
    CPU demo's forward peak, batch 2 at 256x256 on ConvNeXt-T: these held 42 MiB of its 480 MiB)."""
    model = _converted()
    head = model.decode_head
    maps: list[weakref.ref] = []
    alive_at_bottleneck: list[int] = []

    def keep_input(module, args):
        maps.append(weakref.ref(args[0]))

    def keep_output(module, args, output):
        maps.append(weakref.ref(output))

    def count_alive(module, args):
        alive_at_bottleneck.append(sum(ref() is not None for ref in maps))

    handles = [block.register_forward_pre_hook(keep_input) for block in head.fpn_convs]
    handles += [block.register_forward_hook(keep_output) for block in head.fpn_convs]
    handles.append(head.fpn_bottleneck.conv.register_forward_pre_hook(count_alive))
    pixels, labels = batch(size=64)
    try:
        model(pixels, labels=labels).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    assert len(maps) == 2 * len(head.fpn_convs)
    assert alive_at_bottleneck == [0]


def test_frozen_backbone_gradients_are_bitwise_the_same_with_and_without_recomputation():
    """With a frozen backbone nothing the heads read requires grad, yet their convolutions save it for their
    weights' gradients: the NCHW copies are rebuilt there too, and must give the same bits."""
    model = _converted()
    twin = copy.deepcopy(model)
    pixels, labels = batch(size=64)
    grads = []
    before = recompute.builds[0]
    for m, context in ((model, contextlib.nullcontext()), (twin, recompute.disabled())):
        with context:
            m(pixels, labels=labels).loss.backward()
        grads.append({name: p.grad for name, p in m.named_parameters() if p.grad is not None})
    assert recompute.builds[0] > before  # the first run rebuilt what it saved as recipes
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name

"""mmsegmentation checkpoint import: key renames and the missing/unexpected report."""

import pytest
import torch
from models import reference_model

import upernet_fast
from upernet_fast.convert import mmseg_key_to_hf


def to_mmseg(state_dict):
    out = {}
    for key, value in state_dict.items():
        if key.startswith(("decode_head.", "auxiliary_head.")):
            key = key.replace(".batch_norm.", ".bn.").replace(".classifier.", ".conv_seg.")
        out[key] = value.clone()
    return out


def test_key_mapping():
    assert mmseg_key_to_hf("decode_head.bottleneck.bn.running_var") == "decode_head.bottleneck.batch_norm.running_var"
    assert mmseg_key_to_hf("decode_head.conv_seg.weight") == "decode_head.classifier.weight"
    assert mmseg_key_to_hf("auxiliary_head.convs.0.bn.weight") == "auxiliary_head.convs.0.batch_norm.weight"
    assert mmseg_key_to_hf("decode_head.psp_modules.0.1.bn.bias") == "decode_head.psp_modules.0.1.batch_norm.bias"
    assert mmseg_key_to_hf("backbone.stages.0.bn.weight") == "backbone.stages.0.bn.weight"  # backbone untouched


def test_mmseg_checkpoint_loads_into_converted_model():
    source = reference_model(seed=3)
    target = upernet_fast.convert(reference_model(seed=4))
    checkpoint = {"meta": {}, "state_dict": to_mmseg(source.state_dict())}
    result = upernet_fast.load_mmseg_state_dict(target, checkpoint)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert result.renamed["decode_head.conv_seg.weight"] == "decode_head.classifier.weight"
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_missing_and_unexpected_keys_are_reported():
    model = reference_model()
    state = to_mmseg(model.state_dict())
    del state["decode_head.conv_seg.bias"]
    state["decode_head.extra.weight"] = torch.zeros(1)
    with pytest.warns(UserWarning, match="1 missing keys"):
        result = upernet_fast.load_mmseg_state_dict(model, state)
    assert result.missing_keys == ["decode_head.classifier.bias"]
    assert result.unexpected_keys == ["decode_head.extra.weight"]
    with pytest.raises(KeyError, match="1 unexpected keys"):
        upernet_fast.load_mmseg_state_dict(model, state, strict=True)
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        upernet_fast.load_mmseg_state_dict(model, [1, 2])

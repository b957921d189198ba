"""The backend switch: per-call argument, set_backend, the environment variable, auto rules, loud fallback."""

import warnings

import pytest
import torch

import upernet_fast
from upernet_fast import backend, ops


@pytest.fixture
def toy_op():
    """A throw-away op with an eager and a 'triton' implementation that refuses float16 inputs."""
    calls = []
    backend.register("toy", "eager", lambda x: calls.append("eager") or x)
    backend.register(
        "toy",
        "triton",
        lambda x: calls.append("triton") or x,
        why_not=lambda x: "float16 is not supported" if x.dtype == torch.float16 else None,
    )
    yield calls
    del backend._REGISTRY["toy"]
    backend._warned.clear()


def test_explicit_backend_wins_over_the_process_override(toy_op):
    upernet_fast.set_backend("triton")
    backend.select("toy", "eager", torch.ones(1)).fn(torch.ones(1))
    assert toy_op == ["eager"]


def test_set_backend_and_env_var(toy_op, monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "eager")
    assert backend.get_backend() == "eager"
    upernet_fast.set_backend("triton")  # set_backend beats the environment variable
    assert backend.get_backend() == "triton"
    upernet_fast.set_backend(None)
    assert backend.get_backend() == "eager"
    monkeypatch.setenv(backend.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="UPERNET_FAST_BACKEND must be one of"):
        backend.get_backend()
    with pytest.raises(ValueError, match=r"set_backend\(name\) must be one of"):
        upernet_fast.set_backend("gpu")


def test_forced_backend_that_cannot_run_raises_with_the_reason(toy_op):
    with pytest.raises(RuntimeError, match="backend='triton' was asked for, but it cannot run toy here: float16"):
        backend.select("toy", "triton", torch.ones(1, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="toy has no cpp implementation"):
        backend.select("toy", "cpp", torch.ones(1))
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.select("toy", "fast", torch.ones(1))


def test_auto_on_cpu_never_picks_triton(toy_op):
    assert backend.select("toy", "auto", torch.ones(1)).backend == "eager"


def test_auto_fallback_on_cuda_inputs_warns_once(toy_op, monkeypatch):
    # Pretend the inputs live on CUDA: only the device type is consulted by the auto order.
    monkeypatch.setattr(backend, "_device_kind", lambda t: "cuda")
    with pytest.warns(RuntimeWarning, match="toy falls back from triton to eager: float16 is not supported"):
        assert backend.select("toy", "auto", torch.ones(1, dtype=torch.float16)).backend == "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second identical fallback is silent
        assert backend.select("toy", "auto", torch.ones(1, dtype=torch.float16)).backend == "eager"
    assert backend.select("toy", "auto", torch.ones(1)).backend == "triton"


def test_eager_asked_for_reads_nothing_of_the_call(toy_op, monkeypatch):
    # Eager takes every call: asked for by name, by set_backend or by the environment variable, it is chosen once
    # per op, without the (device, dtypes) of the inputs (the dispatch cost of every eager op call).
    def placement(*args):
        raise AssertionError("the inputs' placement was read")

    monkeypatch.setattr(backend, "_placement", placement)
    assert backend.select("toy", "eager", torch.ones(1)).backend == "eager"
    assert backend.select("toy", "eager", torch.ones(1, dtype=torch.float16)).backend == "eager"
    upernet_fast.set_backend("eager")
    assert backend.select("toy", "auto", torch.ones(1)).backend == "eager"
    upernet_fast.set_backend(None)
    monkeypatch.setenv(backend.ENV_VAR, "eager")
    assert backend.select("toy", "auto", torch.ones(1)).backend == "eager"
    monkeypatch.delenv(backend.ENV_VAR)
    with pytest.raises(AssertionError, match="placement was read"):  # auto must read it
        backend.select("toy", "auto", torch.ones(1))


def test_a_cached_choice_still_runs_its_per_call_check(monkeypatch):
    # auto's choice is cached per (op, device, dtypes); an op-specific check (here: at most two elements) still
    # runs on every call, and a refusal falls back (warned once) without spoiling the cache for the next call.
    checked = []

    def why_not(x):
        checked.append(x.numel())
        return "more than two elements" if x.numel() > 2 else None

    backend.register("toy_checked", "eager", lambda x: "eager")
    backend.register("toy_checked", "triton", lambda x: "triton", why_not=why_not)
    monkeypatch.setattr(backend, "_device_kind", lambda t: "cuda")
    try:
        assert backend.select("toy_checked", "auto", torch.ones(1)).backend == "triton"
        assert backend.select("toy_checked", "auto", torch.ones(2)).backend == "triton"
        with pytest.warns(RuntimeWarning, match="falls back from triton to eager: more than two elements"):
            assert backend.select("toy_checked", "auto", torch.ones(3)).backend == "eager"
        assert backend.select("toy_checked", "auto", torch.ones(1)).backend == "triton"
        assert checked[1:] == [2, 3, 3, 1]  # the cached choice's check, then the full selection's for 3
    finally:
        del backend._REGISTRY["toy_checked"]
        backend._warned.clear()
        backend.clear_cache()


def test_entry_points_hand_select_the_placement_it_would_read(monkeypatch):
    """Entry points that saw one device and one dtype among the tensors an op judges hand select a tensor to read
    them from (``like``) rather than have it read every judged tensor: that reading must be the full one, for every
    dtype mix (one
    dtype, mixed floating dtypes, integer labels, class weights in another dtype, BatchNorm and conv parameters in
    another dtype, BatchNorm without affine parameters or running statistics), or the cached choice of another
    placement would be taken. Every backend name, so that both the fixed eager choice and auto's path see it."""
    real_select = backend.select
    handed = []

    def checked_select(op, name, *args, like=None, **kwargs):
        if like is not None:
            placed = ("cpu" if like.is_cpu else like.device.type), (like.dtype,)
            assert placed == backend._placement(op, args, kwargs), (op, placed)
            handed.append(op)
        return real_select(op, name, *args, like=like, **kwargs)

    monkeypatch.setattr(backend, "select", checked_select)
    gen = torch.Generator().manual_seed(3)
    for dtype, other in ((torch.float32, torch.float32), (torch.float64, torch.float64),
                         (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float64),
                         (torch.bfloat16, torch.float32)):
        low, lateral = torch.randn(2, 3, 4, 5, generator=gen).to(dtype), torch.randn(2, 3, 8, 9, generator=gen)
        lateral = lateral.to(other)
        logits = torch.randn(2, 4, 3, 3, generator=gen).to(dtype)
        labels = torch.randint(0, 4, (2, 6, 6), generator=gen)
        for name in ("auto", "eager", "cpp"):
            if name == "cpp" and backend.backend_unavailable("cpp") is not None:
                continue
            ops.upsample_add(low, lateral, backend=name)
            ops.upsample_concat([lateral, low], (8, 9), backend=name)
            ops.adaptive_avg_pool_multi(low, (1, 2, 3), backend=name)
            for weight in (None, torch.rand(4, generator=gen).to(dtype), torch.rand(4, generator=gen).to(other)):
                for label_dtype in (torch.int64, torch.int32):
                    try:
                        ops.upsample_cross_entropy(logits, labels.to(label_dtype), weight=weight, backend=name)
                    except RuntimeError:  # PyTorch's own cross-entropy takes no weight of another dtype (the
                        if weight is None or weight.dtype == dtype:  # placement was checked before it ran)
                            raise
            for bn_dtype, conv_dtype, affine, stats in ((dtype, dtype, True, True), (other, dtype, True, True),
                                                         (dtype, other, False, True), (dtype, dtype, False, False)):
                bn = torch.nn.BatchNorm2d(3, affine=affine, track_running_stats=stats).to(bn_dtype).eval()
                conv = torch.nn.Conv2d(3, 3, 1).to(conv_dtype)
                for call in (lambda: ops.bn_relu(low, bn, backend=name),
                             lambda: ops.conv_bn_relu(low, conv, bn, backend=name)):
                    try:
                        call()
                    except RuntimeError:  # PyTorch's own modules take no parameters of another dtype
                        if bn_dtype == dtype and conv_dtype == dtype:
                            raise
    assert set(handed) == {"upsample_add", "upsample_concat", "adaptive_avg_pool_multi", "upsample_cross_entropy",
                           "bn_relu", "conv_bn_relu"}


def test_describe_lists_every_op_and_backend():
    rows = backend.describe()
    names = {r["op"] for r in rows}
    assert {"adaptive_avg_pool_multi", "upsample_add", "upsample_concat", "upsample_cross_entropy", "conv_bn_relu"} <= names
    assert all(r["status"] in ("available", "unavailable", "absent") for r in rows)
    assert all(r["why"] for r in rows if r["status"] != "available")
    assert all(r["status"] == "available" for r in rows if r["backend"] == "eager")


@pytest.fixture
def cpp_unavailable(monkeypatch):
    """The C++ backend as on a machine without a compiler: asked for by name, it must raise with the reason."""
    import dataclasses

    declared = backend.BACKENDS_DECLARED["cpp"]
    monkeypatch.setitem(
        backend.BACKENDS_DECLARED, "cpp", dataclasses.replace(declared, why_unavailable=lambda: "no C++ compiler")
    )
    backend.clear_cache()


def test_module_backend_is_used_by_the_converted_model(cpp_unavailable):
    from models import batch, reference_model

    model = upernet_fast.convert(reference_model(), backend="cpp")
    pixels, _ = batch()
    with pytest.raises(RuntimeError, match="backend='cpp' was asked for"):
        model(pixels)
    upernet_fast.set_backend_of(model, "eager")
    model.eval()
    assert model(pixels).logits.shape == (2, 3, 32, 32)


def test_env_override_applies_to_ops(monkeypatch, cpp_unavailable):
    monkeypatch.setenv(backend.ENV_VAR, "cpp")
    with pytest.raises(RuntimeError, match="backend='cpp' was asked for"):
        ops.upsample_add(torch.randn(1, 1, 2, 2), torch.randn(1, 1, 4, 4))

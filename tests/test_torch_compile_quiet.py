"""torch.compile over gpuad.torch's ops traces gpuad's argument checks without a warning (Dynamo
warns about functools.lru_cache-wrapped functions it traces through), and gives eager's values."""
import logging
import warnings

import pytest

torch = pytest.importorskip("torch")
gt = pytest.importorskip("gpuad.torch")


def _loss(x, w, b, targets):
    return gt.cross_entropy(gt.linear(x, w, b), targets) + gt.linear_cross_entropy(x, w, targets)


def test_compiled_ops_trace_without_warnings(caplog):
    """Dynamo's "eager" backend: the trace (where the warnings come from) without Inductor's compile."""
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=gen, requires_grad=True) for s in ((6, 3), (5, 3), (5,)))
    targets = torch.tensor([0, 1, 2, 4, -100, 3])
    torch._dynamo.reset()
    compiled = torch.compile(_loss, backend="eager", fullgraph=True)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        loss = compiled(x, w, b, targets)
        loss.backward()
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "lru_cache" in m or "Dynamo" in m], messages
    grads = [a.grad.clone() for a in (x, w, b)]
    for a in (x, w, b):
        a.grad = None
    want = _loss(x, w, b, targets)
    want.backward()
    torch.testing.assert_close(loss, want)
    for got, a in zip(grads, (x, w, b)):
        torch.testing.assert_close(got, a.grad)

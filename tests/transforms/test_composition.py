"""Random nestings of remat, offload, amp and accumulate equal the plain gradients.

Each transform is a rewrite (DESIGN.md, principle 2), so any nesting of them computes the
plain function's loss and grads: bitwise for remat/offload, to float32 accumulation order
for accumulate (rtol 1e-5), and within bf16's stated error when amp runs in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fsharding as fs

POLICIES = [
    fs.policies.nothing_saveable,
    fs.policies.dots_saveable,
    fs.policies.everything_saveable,
]


def loss_fn(p, batch):
    h = F.layer_norm(batch["x"] @ p["w1"] + p["b1"], (p["b1"].shape[0],))
    h = torch.tanh(h) @ p["w2"]
    return F.cross_entropy(h, batch["y"])


def problem(seed, rows, d, h, c):
    g = torch.Generator().manual_seed(seed)
    params = {
        "w1": torch.randn(d, h, generator=g) / d**0.5,
        "b1": torch.randn(h, generator=g) * 0.1,
        "w2": torch.randn(h, c, generator=g) / h**0.5,
    }
    batch = {"x": torch.randn(rows, d, generator=g), "y": torch.randint(0, c, (rows,), generator=g)}
    return params, batch


@st.composite
def nestings(draw):
    layers = draw(
        st.lists(st.sampled_from(["remat", "offload_cpu", "offload_dir", "amp"]), max_size=4)
    )
    return layers, draw(st.integers(0, 2)), draw(st.sampled_from(["fp32", "bf16"]))


@given(nestings(), st.sampled_from([1, 2, 4]), st.integers(0, 10**6))
def test_random_nestings_equal_plain_grads(tmp_path_factory, nesting, k, seed):
    layers, policy_i, amp_policy = nesting
    params, batch = problem(seed, rows=8, d=5, h=8, c=3)
    f = loss_fn
    uses_bf16 = False
    for layer in layers:  # innermost first
        if layer == "remat":
            f = fs.remat(f, policy=POLICIES[policy_i])
        elif layer == "offload_cpu":
            f = fs.offload(f, to="cpu")
        elif layer == "offload_dir":
            f = fs.offload(f, to=tmp_path_factory.mktemp("offload"))
        else:
            f = fs.amp(f, policy=amp_policy)
            uses_bf16 |= amp_policy == "bf16"
    grad_fn = fs.accumulate(fs.value_and_grad(f), steps=k)
    loss, grads = grad_fn(params, batch)
    ref_loss, ref_grads = fs.value_and_grad(loss_fn)(params, batch)
    tol = {"rtol": 5e-2, "atol": 2e-2} if uses_bf16 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(loss, ref_loss, **tol)
    for name in ref_grads:
        assert grads[name].dtype == params[name].dtype
        torch.testing.assert_close(grads[name], ref_grads[name], **tol)

"""GPT: the reference architecture against a hand-written float64 forward, through fs.functional."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fsharding as fs
from fsharding.models import GPT, PRESETS, Block, GPTConfig, decay_mask, generate


def _ln(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def reference_forward(params: dict, ids: torch.Tensor, cfg: GPTConfig) -> torch.Tensor:
    """The GPT written out by hand: explicit masked softmax attention, erf GELU, manual LN."""
    b, t = ids.shape
    d, h = cfg.d_model, cfg.n_heads
    x = params["tok_emb.weight"][ids] + params["pos_emb.weight"][:t]
    mask = torch.ones(t, t, dtype=torch.bool).triu(1)
    for layer in range(cfg.n_layers):
        p = {k.split(".", 2)[2]: v for k, v in params.items() if k.startswith(f"blocks.{layer}.")}
        y = _ln(x, p["ln1.weight"], p["ln1.bias"])
        qkv = y @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]
        q, k, v = (z.reshape(b, t, h, d // h).transpose(1, 2) for z in qkv.split(d, -1))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // h)
        att = scores.masked_fill(mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + y @ p["attn.proj.weight"].T + p["attn.proj.bias"]
        y = _ln(x, p["ln2.weight"], p["ln2.bias"])
        y = y @ p["mlp.fc.weight"].T + p["mlp.fc.bias"]
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
        x = x + y @ p["mlp.proj.weight"].T + p["mlp.proj.bias"]
    x = _ln(x, params["ln_f.weight"], params["ln_f.bias"])
    return x @ params["head.weight"].T


configs = st.builds(
    lambda heads, hd, layers, seq, vocab: GPTConfig(
        vocab_size=vocab, seq_len=seq, d_model=heads * hd, n_layers=layers, n_heads=heads
    ),
    heads=st.integers(1, 3),
    hd=st.integers(1, 6),
    layers=st.integers(1, 2),
    seq=st.integers(1, 9),
    vocab=st.integers(2, 17),
)


def _perturbed(params: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()
    }


def test_small_preset_matches_anchor_param_count():
    cfg = GPTConfig.preset("small")
    shape = (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.seq_len)
    assert shape == (256, 384, 6, 6, 128)
    model = GPT(cfg, device="meta")  # shapes only: nothing allocated
    assert sum(p.numel() for p in model.parameters()) == 10_893_312
    assert model.head.bias is None  # untied head, no bias
    assert model.head.weight is not model.tok_emb.weight


def test_tiny_preset_is_much_smaller():
    n_tiny = sum(p.numel() for p in GPT(PRESETS["tiny"]).parameters())
    assert n_tiny < 10_893_312 // 10


@given(cfg=configs, batch=st.integers(1, 3), data=st.data())
def test_apply_equals_hand_written_forward_and_module(cfg, batch, data):
    t = data.draw(st.integers(1, cfg.seq_len))
    seed = data.draw(st.integers(0, 2**16))
    model = GPT(cfg, seed=seed).double()
    apply, params = fs.functional(model)
    ids = torch.randint(
        0, cfg.vocab_size, (batch, t), generator=torch.Generator().manual_seed(seed)
    )
    # Module's own params: apply == module forward == the hand-written model.
    ref = reference_forward(params, ids, cfg)
    torch.testing.assert_close(apply(params, ids), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model(ids), ref, rtol=1e-10, atol=1e-10)
    # Passed params that differ from the module's: apply must use them.
    other = _perturbed(params, seed + 1)
    torch.testing.assert_close(
        apply(other, ids), reference_forward(other, ids, cfg), rtol=1e-10, atol=1e-10
    )


@given(cfg=configs, data=st.data())
def test_grads_equal_module_autograd_and_reference(cfg, data):
    t = data.draw(st.integers(1, cfg.seq_len))
    model = GPT(cfg, seed=data.draw(st.integers(0, 100))).double()
    apply, params = fs.functional(model)
    ids = torch.randint(0, cfg.vocab_size, (2, t))
    y = torch.randint(0, cfg.vocab_size, (2, t))

    def loss_fn(p, batch):
        return F.cross_entropy(apply(p, batch["x"]).flatten(0, 1), batch["y"].flatten())

    loss, grads = fs.value_and_grad(loss_fn)(params, {"x": ids, "y": y})
    # 1. the module's own autograd
    model.zero_grad()
    module_loss = F.cross_entropy(model(ids).flatten(0, 1), y.flatten())
    module_loss.backward()
    torch.testing.assert_close(loss, module_loss.detach(), rtol=1e-12, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)
    # 2. autograd through the hand-written forward
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    ref_loss = F.cross_entropy(reference_forward(leaves, ids, cfg).flatten(0, 1), y.flatten())
    ref_grads = torch.autograd.grad(ref_loss, list(leaves.values()))
    for (name, _), g in zip(leaves.items(), ref_grads):
        torch.testing.assert_close(grads[name], g, rtol=1e-9, atol=1e-12, msg=name)


def test_causal_earlier_logits_ignore_future_tokens():
    cfg = GPTConfig(vocab_size=32, seq_len=16, d_model=24, n_layers=2, n_heads=3)
    apply, params = fs.functional(GPT(cfg, seed=3).double())
    ids = torch.randint(0, 32, (2, 16))
    base = apply(params, ids)
    for t in (0, 5, 15):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 7) % 32
        out = apply(params, changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-12)
        assert (out[:, t:] - base[:, t:]).abs().amax() > 1e-6  # the change is seen from t on


def test_wrap_selects_every_block_with_its_own_params():
    cfg = GPTConfig(vocab_size=16, seq_len=8, d_model=8, n_layers=3, n_heads=2)
    model = GPT(cfg)
    seen = []

    def record(block_apply):
        def run(block_params, x):
            seen.append(sorted(block_params))
            return block_apply(block_params, x)

        return run

    apply, params = fs.functional(model, wrap={Block: record})
    plain, _ = fs.functional(model)
    ids = torch.randint(0, 16, (2, 8))
    torch.testing.assert_close(apply(params, ids), plain(params, ids), rtol=0, atol=0)
    assert len(seen) == 3
    assert seen[0] == sorted(n for n, _ in model.blocks[0].named_parameters())


def test_init_is_gpt2_like_and_seeded():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    cfg = GPTConfig.preset("tiny")
    a, b, c = GPT(cfg, seed=1), GPT(cfg, seed=1), GPT(cfg, seed=2)
    torch.testing.assert_close(torch.rand(3), before)  # the global RNG is untouched
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.ndim == 2:
            assert not torch.equal(pa, pc), name
    assert abs(a.tok_emb.weight.std().item() - 0.02) < 0.002
    assert abs(a.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    proj_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    assert abs(a.blocks[0].mlp.proj.weight.std().item() - proj_std) < 0.1 * proj_std
    assert torch.equal(a.blocks[1].ln2.weight, torch.ones(cfg.d_model))
    assert torch.equal(a.blocks[1].mlp.fc.bias, torch.zeros(4 * cfg.d_model))
    # meta build + later materialisation gives the same values as a direct build
    m = GPT(cfg, seed=1, device="meta")
    assert all(p.is_meta for p in m.parameters())
    m.to_empty(device="cpu")
    m.reset_parameters(1)
    for (name, pa), pm in zip(a.named_parameters(), m.parameters()):
        assert torch.equal(pa, pm), name


def test_dropout_is_supported_and_off_in_eval():
    cfg = GPTConfig(vocab_size=16, seq_len=8, d_model=8, n_layers=1, n_heads=2)
    ids = torch.randint(0, 16, (2, 8))
    wet = GPT(cfg.with_(dropout=0.5), seed=0)
    dry = GPT(cfg, seed=0)
    assert not torch.equal(wet(ids), wet(ids))
    wet.eval()
    torch.testing.assert_close(wet(ids), dry(ids), rtol=0, atol=0)


def test_generate_greedy_matches_reference_and_crops_context():
    cfg = GPTConfig(vocab_size=20, seq_len=4, d_model=8, n_layers=1, n_heads=2)
    model = GPT(cfg, seed=5).double()
    apply, params = fs.functional(model)
    params = _perturbed(params, 0)  # sampling must use the passed params
    prompt = torch.tensor([[3, 1], [7, 7]])
    out = generate(apply, params, prompt, 6, temperature=0.0)
    assert out.shape == (2, 8) and torch.equal(out[:, :2], prompt)
    ids = prompt
    for _ in range(6):
        nxt = reference_forward(params, ids[:, -cfg.seq_len :], cfg)[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
    assert torch.equal(out, ids)
    assert generate(apply, params, torch.tensor([4]), 3, temperature=0.0).shape == (4,)


def test_generate_sampling_is_seeded():
    cfg = GPTConfig(vocab_size=256, seq_len=8, d_model=16, n_layers=1, n_heads=2)
    apply, params = fs.functional(GPT(cfg))
    prompt = torch.tensor([100, 101])

    def sample(seed):
        return generate(apply, params, prompt, 30, 1.0, torch.Generator().manual_seed(seed))

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))
    assert int(sample(2).max()) < 256


def test_decay_mask_only_matrices_of_linear_layers():
    _, params = fs.functional(GPT(GPTConfig.preset("tiny")))
    mask = decay_mask(params)
    decayed = {k for k, v in mask.items() if v}
    assert decayed == {k for k in params if k.endswith("weight") and "ln" not in k} - {
        "tok_emb.weight",
        "pos_emb.weight",
    }
    assert "head.weight" in decayed and "blocks.0.mlp.fc.weight" in decayed


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="n_heads=5 must divide d_model=384"):
        GPTConfig(n_heads=5)
    with pytest.raises(ValueError, match="unknown preset 'huge'.*'small', 'tiny'"):
        GPTConfig.preset("huge")
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.0)
    with pytest.raises(ValueError, match="exceeds config.seq_len=64"):
        GPT(PRESETS["tiny"])(torch.zeros(1, 65, dtype=torch.long))

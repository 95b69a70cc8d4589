"""split_gpt: pipeline stages of the GPT against the unsplit model (one process).

The stages composed give the model's logits bit for bit (any stage count and block split,
hypothesis); their params are the model's own tensors, each exactly once, under its names;
through ``fs.pipeline`` on a local mesh (all stages in this process) loss and grads equal
``fs.value_and_grad`` of the whole model (float64), also with ``fs.remat`` per block;
a rank that keeps only its stage keeps only that stage's weights; bad arguments raise.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fsharding as fs
from fsharding.models import GPT, Block, GPTConfig, GPTStage, split_gpt

CFG = GPTConfig(vocab_size=13, seq_len=6, d_model=8, n_layers=4, n_heads=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread (two threads on a loaded 2-core machine wait on
    each other ~100x longer than the ops take)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


MODELS: dict[int, GPT] = {}  # by n_layers: built once (hypothesis draws many splits)


def model_with(n_layers: int) -> GPT:
    if n_layers not in MODELS:
        MODELS[n_layers] = GPT(CFG.with_(n_layers=n_layers), seed=1)
    return MODELS[n_layers]


def ids(b: int = 4, t: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


@st.composite
def splits(draw):
    """(n_layers, n, layers or None): any stage count; explicit counts may leave the first
    and last stage without blocks."""
    n_layers = draw(st.integers(1, 4))
    n = draw(st.integers(1, n_layers + 2))
    if n <= n_layers and draw(st.booleans()):
        return n_layers, n, None
    if n - 2 > n_layers:  # more middle stages than blocks
        return n_layers, n_layers, None
    layers = [0] + [1] * (n - 2) + [0] if n > 1 else [0]
    extra = n_layers - sum(layers)
    for s in draw(st.lists(st.integers(0, n - 1), min_size=extra, max_size=extra)):
        layers[s] += 1
    return n_layers, n, layers


@given(splits())
def test_stages_composed_are_the_model_bit_for_bit_and_own_its_params_once(split):
    n_layers, n, layers = split
    model = model_with(n_layers)
    stages = split_gpt(model, n, layers=layers)
    assert len(stages) == n and all(isinstance(s, GPTStage) for s in stages)
    x = ids()
    a = x
    for s in stages:
        a = s(a)
    assert torch.equal(a, model(x))
    # the stages' params are the model's tensors (no copy), each once, under its names
    named = [(k, v) for s in stages for k, v in s.named_parameters()]
    assert sorted(k for k, _ in named) == sorted(k for k, _ in model.named_parameters())
    own = dict(model.named_parameters())
    assert all(v is own[k] for k, v in named)
    blocks = [i for s in stages for i in s.layers]
    assert blocks == list(range(n_layers))
    if layers is None:  # as even as possible, the extra blocks on the last stages
        counts = [len(s.layers) for s in stages]
        assert max(counts) - min(counts) <= 1 and counts == sorted(counts)
    assert stages[0].first and stages[-1].last
    assert not any(s.first for s in stages[1:]) and not any(s.last for s in stages[:-1])


def gpt_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.parametrize("n", [2, 3])
def test_split_through_fs_pipeline_equals_the_whole_model(n, remat):
    model = GPT(CFG, seed=2).double()
    x, y = ids(seed=3), ids(seed=4)
    apply, full = fs.functional(model)
    ref_loss, ref_grads = fs.value_and_grad(lambda p: gpt_loss(apply(p, x), y))(full)
    wrap = {Block: fs.remat} if remat else None
    applies, params = zip(*(fs.functional(s, wrap=wrap) for s in split_gpt(model, n)))
    f = fs.pipeline(
        list(applies),
        gpt_loss,
        mesh=fs.Mesh(pp=1),
        virtual_stages=n,
        microbatches=2,
        schedule="gpipe",
    )
    loss, grads = f(list(params), x, y)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    seen = set()
    for g in grads:
        for k, v in g.items():
            torch.testing.assert_close(v, ref_grads[k], rtol=1e-8, atol=1e-12, msg=k)
            seen.add(k)
    assert seen == set(ref_grads)


def test_a_rank_keeping_its_stage_keeps_only_its_weights():
    model = GPT(CFG, seed=0)
    stages = split_gpt(model, 2)
    other = weakref.ref(stages[0].blocks["0"].attn.qkv.weight)
    head = weakref.ref(model.head.weight)
    mine = stages[1]
    del model, stages
    gc.collect()
    assert other() is None  # the first stage's weights are gone
    assert head() is mine.head.weight  # this stage's stay
    assert mine(torch.randn(2, 5, CFG.d_model)).shape == (2, 5, CFG.vocab_size)


def test_bad_arguments_raise_clear_errors():
    model = GPT(CFG)
    cases = [
        (lambda: split_gpt(torch.nn.Linear(2, 2), 2), TypeError, "model must be a GPT"),
        (lambda: split_gpt(model, 0), ValueError, "n must be >= 1"),
        (lambda: split_gpt(model, True), TypeError, "n must be an int"),
        (lambda: split_gpt(model, 5), ValueError, "at most 4"),
        (lambda: split_gpt(model, 2, layers=[1, 2]), ValueError, "summing to the model's 4"),
        (lambda: split_gpt(model, 3, layers=[2, 0, 2]), ValueError, "middle stage 1"),
        (lambda: split_gpt(model, 2, layers=[2.0, 2]), TypeError, "sequence of ints"),
        (lambda: split_gpt(model, 2)[0](torch.zeros(2, 3)), ValueError, "integer tensor"),
        (lambda: split_gpt(model, 2)[0](ids(t=7)), ValueError, "exceeds config.seq_len=6"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()

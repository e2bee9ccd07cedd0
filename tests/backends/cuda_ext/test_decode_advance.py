"""The decode step's one-kernel bookkeeping (bitlab::cuda_ext_decode_advance) against the torch ops it
replaces (bitmodels.bitnet.decode_state.advance_torch), on a CUDA device (skipped where there is none)."""
import pytest
import torch

from bitmodels.bitnet.decode_state import advance_torch



@pytest.fixture(scope="module")
def advance(cuda_ext_ops):
    from backends.cuda_ext.decode_advance import advance

    return advance


def _state(batch, slots, n_stop, seed, prompt_len=5, cols=9, pos=None):
    g = torch.Generator().manual_seed(seed)
    pad = torch.randint(0, prompt_len, (batch,), generator=g)
    return dict(
        ids=torch.randint(0, 50, (batch,), generator=g),
        done=torch.rand(batch, generator=g) < 0.3,
        pad_id=torch.tensor(7),
        stop_ids=torch.randint(0, 50, (n_stop,), generator=g),
        out=torch.randint(0, 50, (batch, cols), generator=g),
        pos=torch.tensor(prompt_len + 3 if pos is None else pos),
        prompt_len=prompt_len,
        tokens=torch.randint(0, 50, (batch,), generator=g),
        pad=pad,
        positions=torch.randint(0, 9, (batch, 1), generator=g),
        mask=torch.rand(batch, slots, generator=g) < 0.5,
    )


def _run(fn, state, device):
    s = {k: v.to(device) if torch.is_tensor(v) else v for k, v in state.items()}
    fn(**s)
    return s


@pytest.mark.gpu
@pytest.mark.parametrize("batch, slots, n_stop", [(1, 640, 2), (3, 77, 0), (8, 1024, 1), (64, 576, 3), (1100, 70, 2)])
def test_matches_the_torch_ops(advance, batch, slots, n_stop):
    for seed in range(3):
        state = _state(batch, slots, n_stop, seed)
        state["ids"][: batch // 2] = state["stop_ids"][0] if n_stop else 1  # some rows stop now
        want = _run(advance_torch, state, "cuda")
        got = _run(advance, state, "cuda")
        for name in ("done", "out", "pos", "tokens", "positions", "mask"):
            assert torch.equal(got[name], want[name]), (name, batch, slots, n_stop, seed)


@pytest.mark.gpu
def test_replays_in_a_cuda_graph_and_advances_each_time(advance):
    s = {k: v.cuda() if torch.is_tensor(v) else v for k, v in _state(4, 128, 1, 0, cols=12, pos=5).items()}
    ref = {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
    advance(**s)  # load outside the capture
    advance_torch(**ref)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        advance(**s)  # capture runs nothing
    for step in range(4):
        new_ids = torch.randint(0, 50, (4,), device="cuda")
        s["ids"].copy_(new_ids)
        ref["ids"].copy_(new_ids)
        graph.replay()
        advance_torch(**ref)
        for name in ("done", "out", "pos", "tokens", "positions", "mask"):
            assert torch.equal(s[name], ref[name]), (name, step)


@pytest.mark.gpu
def test_bad_input_is_named(advance):
    s = {k: v.cuda() if torch.is_tensor(v) else v for k, v in _state(2, 16, 1, 0).items()}
    with pytest.raises(ValueError, match="tokens must be a contiguous int64 tensor"):
        advance(**{**s, "tokens": s["tokens"].int()})
    with pytest.raises(ValueError, match="mask must be a contiguous bool tensor"):
        advance(**{**s, "mask": s["mask"].float()})
    with pytest.raises(ValueError, match="one value per row"):
        advance(**{**s, "pad": s["pad"][:1]})
    with pytest.raises(ValueError, match=r"out must be \[2, columns\]"):
        advance(**{**s, "out": s["out"][:1]})
    with pytest.raises(ValueError, match=r"ids \(and every other tensor\) must be on a CUDA device, got cpu"):
        advance(**{**s, "ids": s["ids"].cpu()})
    with pytest.raises(ValueError, match="pad must be a contiguous int64 tensor on cuda"):
        advance(**{**s, "pad": s["pad"].cpu()})
    with pytest.raises(ValueError, match=r"one value per row \(2\), got done 1, tokens 2"):
        advance(**{**s, "done": s["done"][:1]})




@pytest.mark.gpu
def test_the_op_itself_raises_on_bad_shapes(advance):
    """The C++ checks behind the Python ones raise too: their messages once streamed integers and shapes, which
    crashed the GPU machine's build (a wrong locale facet in the extension's number formatting); now built with
    std::to_string."""
    s = {k: v.cuda() if torch.is_tensor(v) else v for k, v in _state(2, 16, 1, 0).items()}
    op = torch.ops.bitlab.cuda_ext_decode_advance
    names = ["ids", "done", "pad_id", "stop_ids", "out", "pos", "prompt_len", "tokens", "pad", "positions", "mask"]
    for bad, match in [("pad", r"one value per row \(2\), got 2, 2, 1, 2"), ("done", "one value per row"),
                       ("out", r"out must be \[2, columns\] and mask \[2, slots\], got \[1, 9\] and \[2, 16\]")]:
        args = {**s, bad: s[bad][:1]}
        with pytest.raises(RuntimeError, match=match):
            op(*[args[n] for n in names])

def test_inputs_on_the_cpu_are_named_without_a_gpu():
    """The wrapper's own check runs before the op (no extension needed to see it)."""
    from backends.cuda_ext.decode_advance import check_inputs

    s = _state(2, 16, 1, 0)
    s.pop("prompt_len")
    with pytest.raises(ValueError, match=r"ids \(and every other tensor\) must be on a CUDA device, got cpu"):
        check_inputs(**s)

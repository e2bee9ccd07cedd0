"""The decode step's buffers and its bookkeeping in torch ops (the CPU path; the GPU kernel is compared with it in
tests/backends/cuda_ext/test_decode_advance.py)."""
import torch

from bitmodels.bitnet.decode_state import DecodeState, advance_torch, use_advance_kernel
from bitmodels.bitnet.generate import KVCache


def test_step_bookkeeping_in_torch_ops():
    done = torch.tensor([False, True, False])
    out = torch.full((3, 6), -1)
    pos, tokens, positions = torch.tensor(10), torch.zeros(3, dtype=torch.long), torch.zeros(3, 1, dtype=torch.long)
    pad, mask = torch.tensor([0, 2, 4]), torch.zeros(3, 14, dtype=torch.bool)
    advance_torch(torch.tensor([5, 6, 2]), done, torch.tensor(0), torch.tensor([2, 9]), out, pos, 8, tokens, pad,
                  positions, mask)
    assert tokens.tolist() == [5, 0, 2] and out[:, 3].tolist() == [5, 0, 2]  # a stopped row takes the pad id
    assert done.tolist() == [False, True, True] and int(pos) == 11  # the third row produced a stop token
    assert positions.view(-1).tolist() == [11, 9, 7]
    assert mask.tolist() == [[pad_b <= k <= 11 for k in range(14)] for pad_b in (0, 2, 4)]
    assert use_advance_kernel("cpu") == (advance_torch, "torch (not a CUDA device)")


def test_refresh_inputs_gives_the_first_step_its_positions_and_mask():
    cache = KVCache([torch.zeros(2, 1, 16, 4)], [torch.zeros(2, 1, 16, 4)])
    st = DecodeState(cache, prompt_len=6, max_new=4, stop_ids=[1], pad_id=0, device="cpu")
    st.pad.copy_(torch.tensor([0, 3]))
    st.pos.fill_(6)
    st.refresh_inputs()
    assert st.positions.view(-1).tolist() == [6, 3]
    assert st.mask.tolist() == [[pad <= k <= 6 for k in range(16)] for pad in (0, 3)]
    assert len(st.mutable) == 5 and st.out.shape == (2, 4 + 2 + 1)  # max_new + warm-up steps + 1

"""Packed trees (fc_edge/eval/forward.py) against Hugging Face's own forward: every branch of a
tree, run packed beside other trees in one padded batch, gives the logits the full model gives
for the sequence prefix + that branch alone (sliding-window layers included)."""

from __future__ import annotations

import pytest
import torch

from fc_edge.eval.forward import LayerStack, Tree


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2", "sliding_qwen2"])
@pytest.mark.parametrize("batch_tokens", [1, 64])
def test_each_branch_sees_the_prefix_and_itself_only(request, name, batch_tokens):
    model = request.getfixturevalue(name)
    stack = LayerStack(model)
    g = torch.Generator().manual_seed(1)
    # (prefix, branch lengths): several branches, an empty one, a tree without branches, one
    # long enough for the window (5) to matter
    shapes = [(7, (3, 1, 5)), (2, (0, 4)), (9, ()), (12, (8, 2))]
    seqs = [(torch.randint(0, 256, (p,), generator=g),
             [torch.randint(0, 256, (k,), generator=g) for k in ks]) for p, ks in shapes]
    trees = [Tree(p, ks) for p, ks in shapes]
    with torch.inference_mode():
        inputs = [stack.base.embed_tokens(torch.cat([pre, *br])) for pre, br in seqs]
        outs, kept = stack.run_trees(inputs, trees, 0, stack.num_layers, keep=[2],
                                     batch_tokens=batch_tokens)
        for tree, (pre, branches), out, mid in zip(trees, seqs, outs, kept[2], strict=True):
            assert out.shape == (tree.rows, stack.hidden_size) and mid.shape == out.shape
            got = stack.logits(out)
            want_pre = model(pre[None]).logits[0]
            assert torch.allclose(got[: tree.prefix], want_pre, atol=1e-5, rtol=1e-4)
            for j, br in enumerate(branches):
                a = tree.branch_start(j)
                ref = model(torch.cat([pre, br])[None], output_hidden_states=True)
                want = ref.logits[0, tree.prefix:]
                assert torch.allclose(got[a: a + len(br)], want, atol=1e-5, rtol=1e-4), j
                # the activation kept after layer 1 (Hugging Face hidden_states[2])
                want_mid = ref.hidden_states[2][0, tree.prefix:]
                assert torch.allclose(mid[a: a + len(br)], want_mid, atol=1e-5, rtol=1e-4)


def test_tree_layout():
    t = Tree(3, (2, 0, 1))
    assert t.rows == 6
    assert t.positions() == [0, 1, 2, 3, 4, 3]
    assert t.segments() == [0, 0, 0, 1, 1, 3]
    assert [t.branch_start(j) for j in range(3)] == [3, 5, 5]

"""Scoring multiple-choice items with a codec at the split, every setting in one pass.

Items are scored in groups (:func:`score_items`): the choices of an item that share a context are
one packed tree (the context once, each continuation a branch), and the trees of many items share
forward batches. The uncompressed reference runs once through all layers; on the way it keeps
the activation after each requested split layer L, and every codec setting then runs only
layers[L:] on its reconstruction. The codec sees each scored sequence's own (S, D) activation
(S = that sequence's length, no padding) — exactly what a device would send for that prompt. The
final norm and lm_head run only at the rows that predict continuation tokens.
:func:`score_item_per_choice` (every choice's whole sequence, item by item) is the slower
reference path the tests compare with.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fc_edge.eval.forward import LayerStack, Tree, pad_batch
from fc_edge.eval.scoring import Traffic
from fc_edge.eval.settings import CodecSetting, relative_error
from fc_edge.eval.tasks import Encoded


@dataclass
class ChoiceScores:
    """One item under one setting: each choice's summed continuation log-likelihood (nats) and
    the messages its sequences took."""

    ll: list[float]
    traffic: Traffic = field(default_factory=Traffic)

    def record(self) -> dict[str, Any]:
        return {"ll": list(self.ll), **self.traffic.record()}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> ChoiceScores:
        return cls(list(rec["ll"]), Traffic.from_record(rec))


@dataclass
class ItemScores:
    """One item: the uncompressed log-likelihoods (``ref``) and, per ``"L:label"``, each
    setting's :class:`ChoiceScores`."""

    ref: list[float] | None  # None: not scored (taken from an earlier run's records)
    settings: dict[str, ChoiceScores] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The item's part of a records line: ``{"ref": [...], "s": {key: ...}}``."""
        return {"ref": None if self.ref is None else list(self.ref),
                "s": {k: v.record() for k, v in self.settings.items()}}


def setting_key(layer: int, setting: CodecSetting) -> str:
    """How records name a (split layer, setting): ``"1:rotated"``."""
    return f"{layer}:{setting.label}"


def send_whole(setting: CodecSetting, x: Tensor, traffic: Traffic) -> Tensor:
    """One (S, D) activation through the codec as one message (a prefill), counted in
    ``traffic``; returns the reconstruction."""
    x_hat, nbytes, fell_back = setting.send(x)
    traffic.add(nbytes, x.numel() * 4, relative_error(x, x_hat), fell_back)
    return x_hat


def send_prefills(setting: CodecSetting, h: Tensor, lengths: Sequence[int],
                  traffic: Traffic | None = None) -> Tensor:
    """Each row of a right-padded batch h (B, S, D), its first ``lengths[r]`` positions, through
    the codec as one message (:func:`send_whole`); the padding is kept."""
    out = h.clone()
    t = Traffic() if traffic is None else traffic
    for r, n in enumerate(lengths):
        out[r, :n] = send_whole(setting, h[r, :n], t)
    return out


def codec_settings(stack: LayerStack, model: Any, layers: Sequence[int],
                   settings: Sequence[CodecSetting], items: Sequence[tuple[Sequence[int],
                                                                          ItemScores]]
                   ) -> Iterator[tuple[int, CodecSetting, list[ChoiceScores]]]:
    """Fill each item's uncompressed settings (the reference's log-likelihoods, float32 bytes);
    ``items``: (sequence lengths, scores) per item. Yield (layer, setting, each item's fresh
    :class:`ChoiceScores`, already in its ``settings``) for each codec, bound to the model at
    that layer; the caller fills in the log-likelihoods."""
    for L in layers:
        for s in settings:
            key = setting_key(L, s)
            if s.codec is None:
                for lengths, out in items:
                    if out.ref is None:
                        raise ValueError("the uncompressed setting needs the reference scores")
                    out.settings[key] = ChoiceScores(
                        list(out.ref), Traffic.uncompressed(lengths, stack.hidden_size))
                continue
            s.bind(model, L)
            fresh = []
            for lengths, out in items:
                out.settings[key] = scores = ChoiceScores([0.0] * len(lengths))
                fresh.append(scores)
            yield L, s, fresh


def _gather_targets(ids: Tensor, lengths: Sequence[int], starts: Sequence[int]
                    ) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """(row, position) of the logits that predict each continuation token, the tokens, and how
    many belong to each row."""
    rows, cols, toks, counts = [], [], [], []
    for r, (n, s) in enumerate(zip(lengths, starts, strict=True)):
        pos = torch.arange(s - 1, n - 1)
        rows.append(torch.full_like(pos, r))
        cols.append(pos)
        toks.append(ids[r, s:n])
        counts.append(n - s)
    return torch.cat(rows), torch.cat(cols), torch.cat(toks), counts


def _logliks(stack: LayerStack, h: Tensor, rows: Tensor, cols: Tensor, toks: Tensor,
             counts: list[int]) -> list[float]:
    logits = stack.logits_at(h, rows, cols)
    lp = torch.log_softmax(logits.double(), dim=-1).cpu().gather(1, toks.view(-1, 1)).view(-1)
    return [float(x.sum()) for x in lp.split(counts)]


@torch.inference_mode()
def score_item_per_choice(stack: LayerStack, model: Any, enc: Encoded, layers: Sequence[int],
                          settings: Sequence[CodecSetting], pad_id: int,
                          reference: bool = True) -> ItemScores:
    """One item, every choice's whole sequence through all layers (the reference path);
    ``reference`` False leaves the uncompressed scores out (``ref`` None)."""
    ids, lengths = pad_batch(enc.sequences, pad_id)
    rows, cols, toks, counts = _gather_targets(ids, lengths, enc.starts)
    h, ctx, kept = stack.forward_keeping(ids, layers, to_end=reference)
    out = ItemScores(_logliks(stack, h, rows, cols, toks, counts) if reference else None)
    for L, s, (scores,) in codec_settings(stack, model, layers, settings, [(lengths, out)]):
        a_hat = kept[L].clone()
        for r, n in enumerate(lengths):
            a_hat[r, :n] = send_whole(s, kept[L][r, :n], scores.traffic)
        hh = stack.run(a_hat, ctx, L, stack.num_layers)
        scores.ll = _logliks(stack, hh, rows, cols, toks, counts)
    return out


@dataclass
class _Group:
    """Choices of item ``item`` scored in one tree: ``members`` (choice indices) share the first
    ``prefix`` rows of their sequences (the same context tokens for the reference; the same
    coded rows for a codec), each continuation a branch."""

    item: int
    members: list[int]
    prefix: int
    conts: list[list[int]]  # each member's continuation tokens

    def tree(self, full: bool) -> Tree:
        """Every token (``full``: the rows a device codes) or all but each continuation's last:
        that token's output predicts nothing scored, so the scoring pass leaves it out."""
        return Tree(self.prefix, tuple(len(c) - (0 if full else 1) for c in self.conts))

    def branch_rows(self, j: int) -> slice:
        """Rows of member j's continuation in the full tree."""
        a = self.tree(True).branch_start(j)
        return slice(a, a + len(self.conts[j]))

    def scoring_rows(self, full: Tensor) -> Tensor:
        """The rows of :meth:`tree` (``full`` False) taken from the full tree's rows."""
        return torch.cat([full[: self.prefix]]
                         + [full[self.branch_rows(j)][:-1] for j in range(len(self.conts))])


def _group_logliks(stack: LayerStack, groups: Sequence[_Group], finals: Sequence[Tensor],
                   chunk: int = 256) -> list[list[float]]:
    """Each member's summed continuation log-probability from its group's scoring pass (rows of
    ``group.tree(False)``): the first token from the prefix's last row, token t from the row of
    token t - 1 in the member's branch."""
    sel, toks, owner = [], [], []
    base = 0
    for g, grp in enumerate(groups):
        tree = grp.tree(False)
        first = base + grp.prefix - 1
        for j, cont in enumerate(grp.conts):
            a = base + tree.branch_start(j)
            sel.extend([first, *range(a, a + len(cont) - 1)])
            toks.extend(cont)
            owner.extend([(g, j)] * len(cont))
        base += tree.rows
    hidden = torch.cat(list(finals))
    uniq, inverse = torch.unique(torch.as_tensor(sel), return_inverse=True)
    lp = torch.empty(len(sel), dtype=torch.float64)
    tok = torch.as_tensor(toks)
    for a in range(0, len(uniq), chunk):
        rows = uniq[a: a + chunk]
        logp = torch.log_softmax(stack.logits(hidden[rows.to(hidden.device)]).double(), -1).cpu()
        hit = (inverse >= a) & (inverse < a + len(rows))
        lp[hit] = logp[inverse[hit] - a, tok[hit]]
    out = [[0.0] * len(grp.conts) for grp in groups]
    for (g, j), v in zip(owner, lp.tolist(), strict=True):
        out[g][j] += v
    return out


def _context_groups(encs: Sequence[Encoded]) -> list[_Group]:
    """Each item's choices grouped by their context tokens (one group per distinct context)."""
    groups: list[_Group] = []
    for it, enc in enumerate(encs):
        by_ctx: dict[tuple[int, ...], list[int]] = {}
        for i, (seq, st) in enumerate(zip(enc.sequences, enc.starts, strict=True)):
            by_ctx.setdefault(tuple(seq[:st]), []).append(i)
        for ctx_ids, members in by_ctx.items():
            c = len(ctx_ids)
            groups.append(_Group(it, members, c, [list(enc.sequences[i][c:]) for i in members]))
    return groups


@torch.inference_mode()
def score_items(stack: LayerStack, model: Any, encs: Sequence[Encoded], layers: Sequence[int],
                settings: Sequence[CodecSetting], batch_tokens: int = 256,
                reference: bool = True) -> list[ItemScores]:
    """Several items at once, each shared context run once (the same result as
    :func:`score_item_per_choice` item by item, up to float rounding).

    The choices of an item that share a context are one tree: the context once and each
    continuation as a branch that sees the context and itself only (:class:`Tree`), and the
    trees of all the items are packed into batches of ``batch_tokens`` rows. The reference runs
    every token to the deepest split layer (those are the rows a device codes), then all but
    each continuation's last token to the end. A codec still codes each choice's whole (S, D)
    sequence as one message, exactly as the device would send it; choices whose coded context
    rows are bit-identical (all of them for a codec that codes rows on their own with a fixed
    quantizer; those whose rate control picked the same step for ``rotated``) share a tree
    again, the others (all of them for whole-block codecs) are trees of their own.
    ``reference`` False runs the uncompressed model only to the deepest split layer and leaves
    its scores out (``ref`` None).
    """
    N, top = stack.num_layers, max(layers)
    groups = _context_groups(encs)
    ids = torch.cat([torch.tensor(list(encs[g.item].sequences[g.members[0]][: g.prefix])
                                  + [t for cont in g.conts for t in cont]) for g in groups])
    emb = stack.base.embed_tokens(ids.to(stack.device))
    full = [g.tree(True) for g in groups]
    top_rows, kept = stack.run_trees(list(emb.split([t.rows for t in full])), full, 0, top,
                                     keep=layers, batch_tokens=batch_tokens)
    refs = [[0.0] * len(e.sequences) for e in encs]
    if reference:
        finals, _ = stack.run_trees([g.scoring_rows(h) for g, h in zip(groups, top_rows,
                                                                         strict=True)],
                                    [g.tree(False) for g in groups], top, N,
                                    batch_tokens=batch_tokens)
        for g, lls in zip(groups, _group_logliks(stack, groups, finals), strict=True):
            for i, v in zip(g.members, lls, strict=True):
                refs[g.item][i] = v
    outs = [ItemScores(r if reference else None) for r in refs]
    of_item: list[list[_Group]] = [[] for _ in encs]
    for g in groups:
        of_item[g.item].append(g)
    # each choice's whole activation after split layer L: its context rows + its branch rows
    acts: dict[int, list[list[Tensor]]] = {
        L: [[torch.empty(0)] * len(e.sequences) for e in encs] for L in layers}
    for L in layers:
        for g, h in zip(groups, kept[L], strict=True):
            for j, i in enumerate(g.members):
                acts[L][g.item][i] = torch.cat([h[: g.prefix], h[g.branch_rows(j)]])
    lengths = [[len(q) for q in e.sequences] for e in encs]
    coded_groups: dict[int, list[_Group]] = {L: [] for L in layers}
    inputs: dict[int, list[Tensor]] = {L: [] for L in layers}
    owners: dict[int, list[ChoiceScores]] = {L: [] for L in layers}
    for L, s, fresh in codec_settings(stack, model, layers, settings,
                                      list(zip(lengths, outs, strict=True))):
        for it, scores in enumerate(fresh):
            coded = [send_whole(s, x, scores.traffic) for x in acts[L][it]]
            for g in of_item[it]:
                for sub in _identical_prefixes(coded, g):
                    coded_groups[L].append(sub)
                    inputs[L].append(torch.cat([coded[sub.members[0]][: sub.prefix]] + [
                        coded[i][sub.prefix: -1] for i in sub.members]))
                    owners[L].append(scores)
    for L in layers:
        if not coded_groups[L]:
            continue
        finals, _ = stack.run_trees(inputs[L], [g.tree(False) for g in coded_groups[L]], L, N,
                                    batch_tokens=batch_tokens)
        for g, scores, lls in zip(coded_groups[L], owners[L],
                                  _group_logliks(stack, coded_groups[L], finals), strict=True):
            for i, v in zip(g.members, lls, strict=True):
                scores.ll[i] = v
    return outs


def _identical_prefixes(coded: Sequence[Tensor], g: _Group) -> list[_Group]:
    """``g``'s members split into groups whose coded context rows are bit-identical."""
    subs: list[_Group] = []
    for j, i in enumerate(g.members):
        for sub in subs:
            if torch.equal(coded[sub.members[0]][: g.prefix], coded[i][: g.prefix]):
                sub.members.append(i)
                sub.conts.append(g.conts[j])
                break
        else:
            subs.append(_Group(g.item, [i], g.prefix, [g.conts[j]]))
    return subs

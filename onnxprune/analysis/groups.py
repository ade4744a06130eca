"""Channel groups: the sets of channels that must be removed together.

Built from an :class:`~onnxprune.analysis.context.AnalysisContext` after every handler
ran. Each union class of channel elements is one channel; allocations that share a
class belong to one group, whose channels are numbered in the order of its first
allocation (so a group rooted at a Conv output numbers channels like that output).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from onnxprune.analysis.context import AnalysisContext, CostTerm, Role, TensorChannels


@dataclass(frozen=True, eq=False)
class Member:
    """Where a group's channels live in one constant.

    Attributes:
        tensor: initializer name; ``node``/``op``: the node that reads it.
        axis: axis of ``tensor`` that carries the channels.
        role: what the slice is to the channel (producer filter, consumer slice, BN, ...).
        positions: int64 [P]: indices along ``axis`` that belong to this group.
        channels: int64 [P]: the group channel of each position.
        rows: optional [start, stop) restriction on axis 0 (grouped convolutions).
    """

    tensor: str
    node: str
    op: str
    axis: int
    role: Role
    positions: np.ndarray
    channels: np.ndarray
    rows: tuple[int, int] | None = None


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """A set of channels whose members are cut together.

    Attributes:
        id: index in :attr:`Analysis.groups`.
        name: name of the node that creates the group's first channels (unique).
        op: that node's op type.
        size: number of channels.
        members: every weight slice that belongs to the group's channels.
        blocked_reason: why the group cannot be pruned, or None.
        blocks: channels form ``blocks`` equal contiguous blocks from each of which the
            same number must be kept (grouped convolution); 1 otherwise.
        keep_one_of: sorted channel index arrays, from each of which at least one channel
            must be kept: the channels of a tensor that holds only part of the group
            (a Split or Slice output), which must not become empty.
    """

    id: int
    name: str
    op: str
    size: int
    members: tuple[Member, ...]
    blocked_reason: str | None = None
    blocks: int = 1
    keep_one_of: tuple[np.ndarray, ...] = ()

    @property
    def prunable(self) -> bool:
        return self.blocked_reason is None and self.size > self.blocks

    def nodes(self) -> tuple[str, ...]:
        """Names of the nodes whose weights are members, in order, without repeats."""
        return tuple(dict.fromkeys(m.node for m in self.members))


@dataclass(frozen=True, eq=False)
class Analysis:
    """Result of :func:`onnxprune.analysis.analyze`.

    Attributes:
        groups: all channel groups (blocked ones included).
        channels: channel elements of every tracked activation tensor.
        elem_group / elem_channel: int64 [num elements]: group and channel of each element.
        costs: MACs and params terms of every node that has them.
        fixed_params: parameters of float constants that no term covers (never change).
        shapes: concrete tensor shapes the analysis used.
        opset: default-domain opset.
    """

    groups: tuple[ChannelGroup, ...]
    channels: Mapping[str, TensorChannels]
    elem_group: np.ndarray
    elem_channel: np.ndarray
    costs: tuple[CostTerm, ...]
    fixed_params: int
    shapes: Mapping[str, tuple[int, ...]]
    opset: int

    def group(self, name: str) -> ChannelGroup:
        """The group called ``name``. Raises KeyError when there is none."""
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def removed_elements(self, removed: Mapping[int, np.ndarray]) -> np.ndarray:
        """bool [num elements] from ``{group id: removed channel indices}``."""
        mask_by_group = [np.zeros(g.size, dtype=bool) for g in self.groups]
        for gid, idx in removed.items():
            mask_by_group[gid][np.asarray(idx, dtype=np.int64)] = True
        offsets = np.cumsum([0] + [g.size for g in self.groups])
        flat = np.concatenate(mask_by_group) if mask_by_group else np.zeros(0, dtype=bool)
        return flat[offsets[self.elem_group] + self.elem_channel]

    def count(self, kind: str, removed_elems: np.ndarray | None = None) -> int:
        """Total MACs (``kind="macs"``) or params (``"params"``) with elements removed."""
        if removed_elems is None:
            removed_elems = np.zeros(len(self.elem_group), dtype=bool)
        total = sum(term_value(t, removed_elems) for t in self.costs if t.kind == kind)
        if kind == "params":
            total += self.fixed_params
        return int(round(total))

    def count_by_node(self, kind: str) -> dict[str, float]:
        """Unpruned MACs or params of each node that has any, in graph order."""
        none = np.zeros(len(self.elem_group), dtype=bool)
        out: dict[str, float] = {}
        for t in self.costs:
            if t.kind == kind:
                out[t.node] = out.get(t.node, 0.0) + term_value(t, none)
        return out

    def freed(self, kind: str) -> list[np.ndarray]:
        """Per group, float64 [size]: MACs or params freed by removing each channel alone."""
        offsets = np.cumsum([0] + [g.size for g in self.groups])
        out = np.zeros(offsets[-1], dtype=np.float64)
        gidx = offsets[self.elem_group] + self.elem_channel
        for t in self.costs:
            if t.kind != kind:
                continue
            b = t.blocks
            n_out = 1 if t.out is None else len(t.out) // b
            n_in = 1 if t.inp is None else len(t.inp) // b
            if t.out is not None:
                np.add.at(out, gidx[t.out], t.coef * n_in)
            if t.inp is not None:
                np.add.at(out, gidx[t.inp], t.coef * n_out)
        return [out[offsets[i]:offsets[i + 1]] for i in range(len(self.groups))]


def term_value(t: CostTerm, removed: np.ndarray) -> float:
    """Value of one bilinear cost term (MACs or params) with ``removed`` (bool per element) gone."""
    def kept(e):
        return None if e is None else (~removed[e]).reshape(t.blocks, -1).sum(axis=1)

    ko, ki = kept(t.out), kept(t.inp)
    if ko is None and ki is None:
        return t.coef
    if ko is None:
        return t.coef * float(ki.sum())
    if ki is None:
        return t.coef * float(ko.sum())
    return t.coef * float((ko * ki).sum())


class _DSU:
    def __init__(self, n: int) -> None:
        self.p = list(range(n))

    def find(self, x: int) -> int:
        while self.p[x] != x:
            self.p[x] = self.p[self.p[x]]
            x = self.p[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.p[max(ra, rb)] = min(ra, rb)


def _partial_tensors(ctx: AnalysisContext, elem_group: np.ndarray, elem_channel: np.ndarray,
                     sizes: list[int]) -> list[tuple[np.ndarray, ...]]:
    """Per group, the channel sets of tensors that hold only part of it (must keep one)."""
    found: list[dict[tuple[int, ...], np.ndarray]] = [{} for _ in sizes]
    for tc in ctx.channels.values():
        if len(tc.elems) == 0:
            continue
        gids = np.unique(elem_group[tc.elems])
        if len(gids) != 1:
            continue  # a tensor spanning groups: apply_plan still refuses to empty it
        gid = int(gids[0])
        chans = np.unique(elem_channel[tc.elems])
        if len(chans) < sizes[gid]:
            found[gid].setdefault(tuple(chans.tolist()), chans)
    return [tuple(v for _, v in sorted(f.items())) for f in found]


def build_analysis(ctx: AnalysisContext, float_constants: Mapping[str, int]) -> Analysis:
    """Turn the handlers' records into groups, members and cost terms.

    Args:
        ctx: the context after every node was analysed.
        float_constants: element count of every float constant in the graph (for params).
    """
    space = ctx.space
    roots = space.roots()
    n_alloc = len(space.allocs)
    dsu = _DSU(n_alloc)
    first_alloc: dict[int, int] = {}
    alloc_of = np.asarray(space.alloc_of, dtype=np.int64)
    for e in range(len(roots)):
        r = int(roots[e])
        a = int(alloc_of[e])
        if r in first_alloc:
            dsu.union(first_alloc[r], a)
        else:
            first_alloc[r] = a
    comp: dict[int, list[int]] = {}
    for a in range(n_alloc):
        comp.setdefault(dsu.find(a), []).append(a)

    elem_group = np.full(len(roots), -1, dtype=np.int64)
    elem_channel = np.full(len(roots), -1, dtype=np.int64)
    infos = []  # (name, op, size, blocked_reason)
    used_names: dict[str, int] = {}
    node_ops = {n.name: n.op for n in ctx.graph.nodes}
    for gid, allocs in enumerate(sorted(comp.values(), key=lambda c: c[0])):
        numbering: dict[int, int] = {}
        reason = None
        for a in allocs:
            for e in space.allocs[a][2].tolist():
                r = int(roots[e])
                if r not in numbering:
                    numbering[r] = len(numbering)
        for a in allocs:
            ids = space.allocs[a][2]
            elem_group[ids] = gid
            elem_channel[ids] = [numbering[int(roots[e])] for e in ids.tolist()]
            if reason is None:
                for e in ids.tolist():
                    if e in space.blocked:
                        reason = space.blocked[e]
                        break
        node = space.allocs[allocs[0]][0]
        k = used_names.get(node, 0)
        used_names[node] = k + 1
        infos.append([node if k == 0 else f"{node}#{k}", node_ops.get(node, "input"), len(numbering), reason, 1])

    for node, elems, g in ctx.block_requirements:
        gids = np.unique(elem_group[elems])
        info = infos[int(gids[0])]
        ok = (len(gids) == 1 and len(elems) == info[2]
              and np.array_equal(elem_channel[elems], np.arange(len(elems))))
        blocks = math.lcm(info[4], g)
        if ok and info[2] % blocks == 0:
            info[4] = blocks
        else:
            for gid in gids.tolist():
                infos[gid][3] = infos[gid][3] or f"grouped Conv {node} reads channels it cannot cut in {g} equal blocks"

    members: list[list[Member]] = [[] for _ in infos]
    for w in ctx.weights:
        groups_here = elem_group[w.elems]
        for gid in np.unique(groups_here).tolist():
            pos = np.nonzero(groups_here == gid)[0]
            members[gid].append(Member(w.tensor, w.node, w.op, w.axis, w.role, pos.astype(np.int64),
                                       elem_channel[w.elems[pos]], w.rows))

    keep_one = _partial_tensors(ctx, elem_group, elem_channel, [info[2] for info in infos])
    groups = tuple(ChannelGroup(i, name, op, size, tuple(members[i]), reason, blocks, keep_one[i])
                   for i, (name, op, size, reason, blocks) in enumerate(infos))
    counted = {t.tensor for t in ctx.costs if t.kind == "params" and t.tensor}
    fixed = sum(n for name, n in float_constants.items() if name not in counted)
    return Analysis(groups, dict(ctx.channels), elem_group, elem_channel, tuple(ctx.costs), int(fixed),
                    dict(ctx.shapes), ctx.opset)

"""Speculation under load: which tree a batched step verifies, from a cost model of this device.

A Medusa tree pays when the tokens it adds per step outweigh the rows it adds to the step. With
one request a 64-node tree is nearly free (the step reads the weights once either way); with 32
requests it multiplies the step's GEMM rows by 64. So the batcher picks, at every step, one tree
for all speculating slots from a ladder of nested trees, the engine's tree cut to its first k
paths by rank (top-1 chains first, see :func:`ranked_paths`), down to plain decoding (k = 0).

- The cost model (:class:`CostModel`) is measured on this device when the batcher starts: the
  time of a packed step against its row count and slot count, interpolated between measured points.
- The gain is each tree node's chance of being accepted, counted from the steps served (a prior
  of 0.5 for a top-1 draft, halved per level and per rank below top-1, until a node has been tried). A tree of k nodes yields
  1 + sum(p_i) tokens per slot and step: nodes at one depth are disjoint events (at most one
  token matches the greedy continuation).
- The policy (``speculation``): ``auto`` picks the k with the most tokens per second for the
  slots running now, each mode's predicted time scaled by how much slower its served steps
  really ran (k = 0 included: a tree must promise 25% more than plain decoding, so
  speculation is not chosen where the model says it loses or barely wins);
  ``fixed`` always verifies the engine's whole tree; ``off-above:N`` the whole tree up to N active
  slots, plain decoding above.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from medusa_forge.errors import ForgeError
from medusa_forge.tree.choice_tree import ChoiceTree, TreeBuffers, tree_buffers

PRIOR_ACCEPT = 0.5  # prior chance that an untried head's top-1 is accepted; each lower rank and each
# level deeper halves it, so the priors of one depth's nodes (disjoint events) sum to less than 1
PRIOR_WEIGHT = 4.0  # the prior counts as this many observed steps
OBSERVED_WEIGHT = 0.2  # each timed step's pull on a mode's observed/predicted time ratio
TREE_MARGIN = 1.25  # a tree must promise 25% more tokens per second than plain decoding: the probe
# times prefill-shaped steps once, on a machine that may be busy; a tree step also pays acceptance, K/V
# moves and drafts (served CPU tree steps ran 1.1-1.3x their prediction), and a loss must not result


def ranked_paths(tree: ChoiceTree) -> list[tuple[int, ...]]:
    """The tree's paths by rank: lowest sum of top-k ranks first, then shallower. Every prefix of
    this list is a valid tree (a path's parent has a lower or equal sum and is shorter)."""
    return sorted(tree.paths, key=lambda p: (sum(p), len(p), p))


@dataclass
class Ladder:
    """Nested trees of the engine's tree: ``sizes[i]`` draft nodes, plain decoding for size 0."""

    paths: list[tuple[int, ...]]
    sizes: list[int]
    buffers: dict[int, TreeBuffers]
    path_ranks: dict[int, list[list[int]]]  # size -> that tree's node -> rank positions (1-based) root..node
    depths: dict[int, int]  # size -> the heads that tree reads: its longest path (0 for plain decoding)

    def depth(self, size: int) -> int:
        return self.depths[size]

    @classmethod
    def of(cls, tree: ChoiceTree, device) -> Ladder:
        paths = ranked_paths(tree)
        n = len(paths)
        sizes = sorted({0, n, *(k for k in (1, 2, 4, 8, 16, 32) if k < n)})
        buffers, path_ranks = {}, {}
        for k in sizes[1:]:
            sub = ChoiceTree.from_paths([list(p) for p in paths[:k]], name=f"{tree.name}[:{k}]")
            buffers[k] = tree_buffers(sub, device=device)
            rank = {p: i + 1 for i, p in enumerate(paths[:k])}
            path_ranks[k] = [[]] + [[rank[p[:d]] for d in range(1, len(p) + 1)] for p in sub.paths]
        depths = {k: max((len(p) for p in paths[:k]), default=0) for k in sizes}
        return cls(paths, sizes, buffers, path_ranks, depths)


@dataclass
class CostModel:
    """Step time (s) against packed rows and slots: t = f(rows) + per_slot * slots, f piecewise
    linear between measured row counts (extrapolated linearly past the last), plus ``heads`` (every
    head's GEMMs over the speculating slots' rows, the next tree's drafts) in the share a tree step
    refreshes: a tree k heads deep refreshes k of them."""

    rows: list[int]
    seconds: list[float]
    per_slot: float
    device: str = ""
    heads: float = 0.0

    def time(self, rows: int, slots: int, heads_share: float = 0.0) -> float:
        """Seconds for a step of ``rows`` rows over ``slots`` slots that refreshes ``heads_share`` of
        the heads (the depth of the tree it drafts for over the engine's)."""
        r, s = np.asarray(self.rows, dtype=float), np.asarray(self.seconds)
        if rows > r[-1]:
            slope = (s[-1] - s[-2]) / (r[-1] - r[-2]) if len(r) > 1 else s[-1] / r[-1]
            base = s[-1] + slope * (rows - r[-1])
        else:
            base = float(np.interp(rows, r, s))
        return base + self.per_slot * slots + self.heads * heads_share

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "seconds": [round(x, 6) for x in self.seconds],
            "per_slot_s": round(self.per_slot, 6),
            "heads_s": round(self.heads, 6),
            "device": self.device,
        }

    @classmethod
    def measure(
        cls,
        run: Callable[[int, int], None],
        max_rows: int,
        max_slots: int,
        device: str = "",
        reps: int = 5,
        heads: Callable[[int], None] | None = None,
    ) -> CostModel:
        """``run(rows, slots)`` runs one packed step of that shape, ``heads(slots)`` the heads over
        that many rows; the best of ``reps`` counts. The shapes take turns, so a neighbour's burst
        of work slows one run of each, not all runs of one."""
        grid = sorted({1, *(r for r in (2, 4, 8, 16, 32, 64, 128, 256, 512) if r < max_rows), max_rows})
        shapes = [(r, 1) for r in grid] + ([(max_slots, max_slots)] if max_slots > 1 else [])
        if heads is not None:
            shapes.append((0, max_slots))  # rows 0: the heads alone
        step = run

        def run(rows: int, slots: int) -> None:
            if rows == 0:
                heads(slots)
            else:
                step(rows, slots)

        best = dict.fromkeys(shapes, float("inf"))
        for rep in range(reps + 1):  # the first round warms up
            for shape in shapes:
                t0 = time.perf_counter()
                run(*shape)
                if rep:
                    best[shape] = min(best[shape], time.perf_counter() - t0)
        # More rows never cost less: a point measured slower than a bigger one was disturbed.
        seconds = np.minimum.accumulate([best[(r, 1)] for r in grid][::-1])[::-1].tolist()
        per_slot = 0.0
        if max_slots > 1:
            one = float(np.interp(max_slots, grid, seconds))
            per_slot = max(0.0, (best[(max_slots, max_slots)] - one) / (max_slots - 1))
        return cls(grid, seconds, per_slot, device, best[(0, max_slots)] if heads is not None else 0.0)


@dataclass
class Acceptance:
    """Per ranked node: steps whose tree held it, and steps that accepted it."""

    prior_exponent: list[int]  # per ranked node: its depth plus the sum of its top-k ranks
    tried: np.ndarray = field(init=False)
    hits: np.ndarray = field(init=False)

    def __post_init__(self):
        self.tried = np.zeros(len(self.prior_exponent) + 1)
        self.hits = np.zeros(len(self.prior_exponent) + 1)

    def record(self, size: int, accepted_ranks: list[int]) -> None:
        """One slot's tree step: a tree of ``size`` ranked nodes, these ranks on the accepted path."""
        self.tried[1 : size + 1] += 1
        self.hits[accepted_ranks] += 1

    def probs(self) -> np.ndarray:
        prior = PRIOR_ACCEPT ** np.asarray([0, *self.prior_exponent], dtype=float)
        return (self.hits + PRIOR_WEIGHT * prior) / (self.tried + PRIOR_WEIGHT)


class Policy:
    """Chooses each step's tree size (0 = plain decoding) from the ladder (module docstring)."""

    def __init__(self, spec: str, ladder: Ladder, cost: CostModel | None):
        self.spec = spec
        self.mode, self.limit = parse_speculation(spec)
        self.ladder, self.cost = ladder, cost
        self.acceptance = Acceptance([len(p) + sum(p) for p in ladder.paths])
        # Served steps' time over the cost model's, for plain (False) and tree (True) steps: a tree
        # step pays bookkeeping the start-up probe does not time (acceptance, K/V moves, drafts), and
        # load may change after the probe; scaling each mode by what it really took keeps auto from
        # choosing a tree that loses against plain decoding.
        self.slowdown = {False: 1.0, True: 1.0}

    def predict(self, size: int, tree_slots: int, other_rows: int, other_slots: int) -> float:
        """The cost model's time for a step of tree ``size`` (0: plain), before the observed slowdown."""
        rows = tree_slots * (size + 1) + other_rows
        share = self.ladder.depth(size) / max(1, self.ladder.depth(self.ladder.sizes[-1]))
        return self.cost.time(rows, tree_slots + other_slots, share)

    def observe(self, tree: bool, predicted: float, seconds: float) -> None:
        """A served step took ``seconds`` where the cost model predicted ``predicted``."""
        if predicted > 0 and seconds > 0:
            ratio = min(max(seconds / predicted, 0.5), 2.0)  # one preempted step cannot swing the choice
            self.slowdown[tree] += OBSERVED_WEIGHT * (ratio - self.slowdown[tree])

    def choose(self, tree_slots: int, other_rows: int, other_slots: int) -> int:
        """The tree size for ``tree_slots`` speculating slots beside ``other_rows`` other rows."""
        full = self.ladder.sizes[-1]
        if tree_slots == 0 or full == 0 or self.mode == "fixed":
            return full
        if self.mode == "off-above":
            return full if tree_slots + other_slots <= self.limit else 0
        p = self.acceptance.probs()
        gains = np.concatenate([[0.0], np.cumsum(p[1:])])
        best, best_rate, plain = 0, -1.0, 0.0
        for k in self.ladder.sizes:
            seconds = self.predict(k, tree_slots, other_rows, other_slots) * self.slowdown[k > 0]
            rate = tree_slots * (1.0 + gains[k]) / seconds
            plain = plain or rate
            if rate > best_rate * 1.0001 and rate >= plain * (TREE_MARGIN if k else 1.0):  # bigger must win outright
                best, best_rate = k, rate
        return best

    def to_dict(self) -> dict:
        out = {"speculation": self.spec, "tree_sizes": self.ladder.sizes}
        if self.cost is not None:
            out["cost_model"] = self.cost.to_dict()
            out["observed_slowdown"] = {"plain": round(self.slowdown[False], 3), "tree": round(self.slowdown[True], 3)}
        return out


def parse_speculation(spec: str) -> tuple[str, int]:
    """``auto`` | ``fixed`` | ``off-above:N`` -> (mode, N)."""
    if spec in ("auto", "fixed"):
        return spec, 0
    if spec.startswith("off-above:"):
        n = spec.split(":", 1)[1]
        if n.isdigit() and int(n) >= 1:
            return "off-above", int(n)
    raise ForgeError(f"speculation {spec!r}: expected auto, fixed or off-above:N (N >= 1 active requests)")

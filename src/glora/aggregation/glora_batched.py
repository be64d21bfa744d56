"""GLoRA's mathematics (method.md steps 1-5), once for both routes of the rule (glora.py).

Steps 2-5 are one function, :func:`_core`, of two *sides*: each holds one side's stacked
canonical columns Z (X or Y), with a leading batch shape ``*``, and gives the core the
few products with Z it needs. Two kinds of side:

- :class:`_ExactSide`, the reference route (:func:`glora_layer`): Z explicit from thin QRs,
  the consensus basis from an SVD of the tall weighted Z. One layer, ``*`` = (): the
  clients' numerical ranks differ between layers, and 2-D products round as the recorded
  runs did (a batch of one would take the batched kernels, which round differently).
- :class:`_GramSide`, the batched route (:func:`glora_batch`): ``*`` = (L,) layers that
  share a shape and the clients' ranks; Z = F^T blockdiag(T), F the stacked factor rows,
  never formed. The tall factorisations become one Gram product ``GB = Bt Bt^T`` (n, n),
  n = sum r_i (cost d_out n^2), whose diagonal blocks give the canonical forms (step 1)
  by (r, r) eigen-decompositions, and small batched eigen-decompositions for the basis
  (step 2); the core (step 3) is an (R, n) x (n, d_in) product and only the (R, d_in)
  core gets an SVD. No (d_out, d_in) matrix, no (d, n) one but the stacked factors.

Accuracy of the Gram route. A Gram matrix squares the condition number: the canonical
forms lose about eps * kappa digits, kappa the largest condition number of a client's
B^T B or A A^T, and the basis a further factor lam_1 / lam_R (the spread of the kept
eigenvalues of the projector average). A layer's result stands only when
``eps * kappa * lam_1 / lam_R <= GRAM_TOL[dtype]`` and its R kept eigenvalues are clearly
non-zero (duplicated client directions make some exactly zero, which a Gram matrix cannot
tell from rounding); any other layer comes back as None, for the exact route.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from glora.lowrank import LowRank, numerical_rank

# Largest predicted relative error (eps * kappa * lam_1 / lam_R) a layer may have on the
# Gram route before it is sent to the exact route. float64: agreement with that route to
# about 1e-10, far below anything training can see; float32: 1e-4, about the rounding of
# the bfloat16 / float16 factors clients usually train in, so the server adds no error
# that the clients' own arithmetic does not already carry.
GRAM_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}

# One layer's state as its thin SVD: Ub (d_out, k), lam (k,), Q (d_in, k).
Thin = tuple[Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class Options:
    """One round's GLoRA options (see :class:`glora.aggregation.glora.GLoRA`), R resolved."""

    rank: int
    threshold: float | None
    energy: bool
    sides: int
    rtol: float
    memory: float = 0.0


@dataclass(frozen=True)
class Basis:
    """One side's top consensus directions U (*, d, m), held as ``V``: U itself on the exact
    route, U's coefficients on the canonical columns (U = Z V, (L, n, m)) on the Gram route.
    ``ok``: per layer, whether the route was accurate enough."""

    V: Tensor
    ok: list[bool]


def _consensus_weights(w: Tensor, sig: Tensor, energy: bool) -> Tensor:
    """(*, n) weight of each canonical column in step 2: sqrt(w_i), times sig for "energy";
    zero for a column dropped below the numerical rank (sig = 0)."""
    return w.sqrt() * (sig if energy else (sig > 0).to(w.dtype))


def _kept(eig: Tensor, k: int, opts: Options) -> int:
    """How many directions of one layer's consensus eigenvalues ``eig`` (decreasing) to keep:
    ``k`` (at most R and the numerical rank), fewer where ``threshold`` cuts them."""
    if opts.threshold is not None and k:
        ref = float(eig[0]) if opts.energy else 1.0
        k = min(k, int((eig >= opts.threshold * ref).sum()))
    return k


def _core(
    left: _ExactSide | _GramSide, right: _ExactSide | _GramSide, wsig: Tensor, opts: Options
) -> tuple[Tensor, Tensor, Tensor, list[bool]]:
    """Steps 2-5 from the two sides and wsig (*, n), w_i sig_i for each canonical column: the
    state's thin SVD before truncation, Ub (*, d_out, p), lam (*, p), Q (*, d_in, p), and
    per layer whether the route was accurate enough."""
    U = left.basis(opts)
    coeff = left.coords(U) * wsig[..., None, :]  # (*, m, n): w_i U^T X_i diag(sig_i)
    if opts.sides == 1:
        P, lam, Qh = torch.linalg.svd(right.times_T(coeff), full_matrices=False)  # core U^T sum_i w_i Delta_i
        Q, ok = Qh.mT, U.ok
    else:
        V = right.basis(opts)
        P, lam, Qh = torch.linalg.svd(coeff @ right.coords_T(V), full_matrices=False)  # (m, m) core U^T Delta V
        Q, ok = right.lift(V, Qh.mT), [a and b for a, b in zip(U.ok, V.ok, strict=True)]
    return left.lift(U, P), lam, Q, ok


def _thin(Ub: Tensor, lam: Tensor, Q: Tensor, ok: list[bool], rtol: float) -> list[Thin | None]:
    """Each layer's state (Ub, lam, Q (L, ...)) cut to its numerical rank, or None where not ok."""
    out: list[Thin | None] = []
    for l, fine in enumerate(ok):
        k = numerical_rank(lam[l], rtol)
        out.append((Ub[l, :, :k].contiguous(), lam[l, :k].contiguous(), Q[l, :, :k].contiguous()) if fine else None)
    return out


@dataclass(frozen=True)
class _ExactSide:
    """One side of one layer, its canonical columns Z (d, n) explicit; col (n,) their step-2
    weights; prev: the previous state's basis on this side (d, p) and its lam (p,), blended
    in with weight ``opts.memory``, or None."""

    Z: Tensor
    col: Tensor
    prev: tuple[Tensor, Tensor] | None

    def basis(self, opts: Options) -> Basis:
        M = self.Z * self.col
        if self.prev is not None:
            pcol = torch.full_like(self.prev[1], opts.memory**0.5)
            if opts.energy:
                pcol = pcol * self.prev[1]
            M = torch.cat([M * (1 - opts.memory) ** 0.5, self.prev[0].to(M.dtype) * pcol], dim=1)
        if M.shape[1] == 0:
            return Basis(M.new_zeros(M.shape[0], 0), [True])
        U, S, _ = torch.linalg.svd(M, full_matrices=False)
        # S**2: the eigenvalues of the weighted projector (or energy) average.
        return Basis(U[:, : _kept(S**2, min(opts.rank, numerical_rank(S, opts.rtol)), opts)], [True])

    def coords(self, b: Basis) -> Tensor:
        return b.V.mT @ self.Z  # U^T Z

    def coords_T(self, b: Basis) -> Tensor:
        return self.Z.mT @ b.V  # Z^T U

    def times_T(self, H: Tensor) -> Tensor:
        return H @ self.Z.mT

    def lift(self, b: Basis, P: Tensor) -> Tensor:
        return b.V @ P  # U P


def glora_layer(
    updates: Sequence[LowRank], weights: Tensor, opts: Options, dtype: torch.dtype, prev: Thin | None
) -> Thin:
    """One layer's state on the exact route: thin QRs for the canonical forms (step 1) and SVDs
    of the tall stacked matrices. updates: the K clients' (checked) updates; weights (K,)
    float64 summing to 1; dtype: the server math dtype; prev: the previous state (Ub, lam, Q)
    to blend with ``opts.memory``, or None."""
    forms = [u.canonical(opts.rtol, dtype) for u in updates]
    w = torch.cat([wi.to(dtype).repeat(f.rank) for f, wi in zip(forms, weights, strict=True)])
    sig = torch.cat([f.sig for f in forms])
    col = _consensus_weights(w, sig, opts.energy)
    left = _ExactSide(torch.cat([f.X for f in forms], dim=1), col, None if prev is None else (prev[0], prev[1]))
    right = _ExactSide(torch.cat([f.Y for f in forms], dim=1), col, None if prev is None else (prev[2], prev[1]))
    Ub, lam, Q, ok = _core(left, right, w * sig, opts)
    return _thin(Ub[None], lam[None], Q[None], ok, opts.rtol)[0]  # type: ignore[return-value]


@dataclass(frozen=True)
class Groups:
    """Clients sorted by rank, as runs of equal rank: (row offset, clients, rank) each.

    ``order`` maps sorted position to client index; rows of the stacked factors follow it.
    """

    order: list[int]
    runs: list[tuple[int, int, int]]

    @staticmethod
    def of(ranks: Sequence[int]) -> Groups:
        order = sorted(range(len(ranks)), key=lambda i: ranks[i])
        runs, offset = [], 0
        for r, c in sorted(Counter(ranks).items()):
            runs.append((offset, c, r))
            offset += c * r
        return Groups(order, runs)

    def repeat(self, per_client: Tensor) -> Tensor:
        """(..., K) values per client (sorted order) to (..., n): each repeated r_i times."""
        sizes = torch.tensor([r for _, c, r in self.runs for _ in range(c)])
        return torch.repeat_interleave(per_client, sizes, dim=-1)


def stack_factors(layers: Sequence[Sequence[LowRank]], groups: Groups, side: str, dtype: torch.dtype) -> Tensor:
    """The clients' B^T (side "B": (L, n, d_out)) or A (side "A": (L, n, d_in)) stacked by rows in
    ``groups.order``, converted to ``dtype`` by the copy itself."""
    first = layers[0][0]
    d = first.d_out if side == "B" else first.d_in
    n = sum(c * r for _, c, r in groups.runs)
    out = torch.empty(len(layers), n, d, dtype=dtype)
    for l, ups in enumerate(layers):
        parts = [ups[i].B.T if side == "B" else ups[i].A for i in groups.order]
        torch.cat(parts, dim=0, out=out[l])
    return out


def diag_blocks(G: Tensor, offset: int, count: int, r: int) -> Tensor:
    """The ``count`` diagonal (r, r) blocks of G (L, n, n) from row/column ``offset``: (L, count, r, r)."""
    sub = G[:, offset : offset + count * r, offset : offset + count * r]
    sub = sub.unflatten(1, (count, r)).unflatten(3, (count, r))  # (L, c, r, c, r)
    return torch.diagonal(sub, dim1=1, dim2=3).permute(0, 3, 1, 2)


def blockdiag_apply(blocks: list[Tensor], groups: Groups, M: Tensor, transpose: bool) -> Tensor:
    """blockdiag(T_1, ..., T_K) @ M (or its transpose @ M) without forming the (n, n) matrix.

    blocks: one (L, c, r, r) tensor per run of ``groups``; M: (L, n, m). Cost n * sum r_i^2 * m / n.
    """
    out = []
    for T, (o, c, r) in zip(blocks, groups.runs, strict=True):
        rows = M[:, o : o + c * r].unflatten(1, (c, r))  # (L, c, r, m)
        out.append(((T.mT if transpose else T) @ rows).flatten(1, 2))
    return torch.cat(out, dim=1)


@dataclass(frozen=True)
class ClientForms:
    """Every client's canonical form X_i = B_i T_i, sig_i, Y_i = A_i^T S_i, batched.

    T, S: one (L, c, r, r) tensor per run (columns beyond the numerical rank are zero);
    sig: (L, n) the singular values in stacked order (zero where dropped);
    kappa: (L,) the largest condition number of any client's B^T B or A A^T.
    """

    T: list[Tensor]
    S: list[Tensor]
    sig: Tensor
    kappa: Tensor


def _gram_factor(G: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For symmetric PSD G (..., r, r): F with F^T F = G, F^-1, the condition number, and
    whether G is exactly zero (a zero factor: the client's update is zero)."""
    e, V = torch.linalg.eigh(G)
    top = e[..., -1:]
    zero = top[..., 0] <= 0
    kappa = torch.where(zero, 1.0, top[..., 0] / e[..., 0].clamp_min(0)).nan_to_num(posinf=torch.inf)
    # Clamp rounding-level eigenvalues so that the inverse stays finite; such a layer fails
    # the accuracy check through kappa and is recomputed by the exact route anyway.
    e = torch.where(zero[..., None], 1.0, e.clamp_min(top * torch.finfo(G.dtype).eps))
    return e.sqrt()[..., :, None] * V.mT, V * e.rsqrt()[..., None, :], kappa, zero


def client_forms(GB: list[Tensor], GA: list[Tensor], scales: Tensor, groups: Groups, rtol: float) -> ClientForms:
    """Step 1 for every client of every layer from its (r, r) Gram blocks.

    GB, GA: per run of ``groups``, the clients' B^T B and A A^T, (L, c, r, r) each;
    scales (L, K) in sorted client order. With F^T F a client's Gram block, B = Q_B F_B and
    A^T = Q_A F_A; the core s F_B F_A^T = P diag(sig) W^T gives X = B F_B^-1 P and
    Y = A^T F_A^-1 W, the canonical form of lowrank.canonical without touching a tall matrix.
    """
    T, S, sigs, kappa = [], [], [], torch.ones(scales.shape[0], dtype=scales.dtype)
    k = 0
    for gb, ga, (_, c, _) in zip(GB, GA, groups.runs, strict=True):
        FB, FBi, kB, zB = _gram_factor(gb)
        FA, FAi, kA, zA = _gram_factor(ga)
        P, sig, Wh = torch.linalg.svd(scales[:, k : k + c, None, None] * (FB @ FA.mT))
        zero = zB | zA
        sig = torch.where(zero[..., None], 0.0, sig)
        keep = (sig > rtol * sig[..., :1]).to(sig.dtype)  # numerical rank, as lowrank.canonical
        T.append((FBi @ P) * keep[..., None, :])
        S.append((FAi @ Wh.mT) * keep[..., None, :])
        sigs.append((sig * keep).flatten(1))
        kappa = torch.maximum(kappa, torch.where(zero, 1.0, torch.maximum(kB, kA)).amax(dim=1))
        k += c
    return ClientForms(T, S, torch.cat(sigs, dim=1), kappa)


@dataclass(frozen=True)
class _GramSide:
    """One side of L layers, its canonical columns Z = F^T blockdiag(T) (L, d, n) never formed.

    F: (L, n, d) the stacked factor rows (B^T or A, see ``stack_factors``); T: per run of
    ``groups``, (L, c, r, r); G: (L, n, n) = Z^T Z; col: (L, n) step-2 weights; kappa: (L,)
    the clients' worst condition number. F and G are None on the input side of one-sided
    GLoRA, which needs only ``times_T`` (it reads the clients' factors one by one).
    """

    layers: Sequence[Sequence[LowRank]]
    groups: Groups
    side: str
    F: Tensor | None
    T: list[Tensor]
    G: Tensor | None
    col: Tensor
    kappa: Tensor

    def basis(self, opts: Options) -> Basis:
        """Top eigenvectors of diag(col) G diag(col), with the accuracy gate of the Gram route."""
        G, col = self.G, self.col
        L, n = col.shape
        m = min(opts.rank, n)
        lam, E = torch.linalg.eigh(col[:, :, None] * G * col[:, None, :])
        lam, E = lam[:, -m:].flip(-1), E[:, :, -m:].flip(-1)  # (L, m), (L, n, m) decreasing
        tol = GRAM_TOL[G.dtype] / torch.finfo(G.dtype).eps
        n_eff = (col > 0).sum(dim=1).tolist()
        oks = []
        mask = torch.zeros(L, m, dtype=G.dtype)
        for l in range(L):
            k0 = min(opts.rank, n_eff[l])
            top, low = (float(lam[l, 0]), float(lam[l, k0 - 1])) if k0 else (0.0, 0.0)
            oks.append(k0 == 0 or (low > 0 and float(self.kappa[l]) * top / low <= tol))
            mask[l, : _kept(lam[l], k0, opts)] = 1.0
        return Basis(col[:, :, None] * E * (lam.clamp_min(torch.finfo(G.dtype).tiny).rsqrt() * mask)[:, None, :], oks)

    def coords(self, b: Basis) -> Tensor:
        return b.V.mT @ self.G  # U^T Z

    def coords_T(self, b: Basis) -> Tensor:
        return self.G @ b.V  # Z^T U

    def times_T(self, H: Tensor) -> Tensor:
        """H (L, m, n) @ Z^T: through blockdiag(T)^T, then the clients' factor rows one by one,
        rather than through a stacked copy: the same reads, no copy to hold."""
        H = blockdiag_apply(self.T, self.groups, H.mT, transpose=False).mT
        L, m, _ = H.shape
        first = self.layers[0][0]
        out = H.new_zeros(L, m, first.d_out if self.side == "B" else first.d_in)
        for l, ups in enumerate(self.layers):
            o = 0
            for i in self.groups.order:
                rows = ups[i].B.T if self.side == "B" else ups[i].A
                out[l].addmm_(H[l, :, o : o + rows.shape[0]], rows.to(H.dtype))
                o += rows.shape[0]
        return out

    def lift(self, b: Basis, P: Tensor) -> Tensor:
        return self.F.mT @ (blockdiag_apply(self.T, self.groups, b.V, transpose=False) @ P)  # U P


def glora_batch(
    layers: Sequence[Sequence[LowRank]], weights: Tensor, opts: Options, dtype: torch.dtype
) -> list[Thin | None]:
    """Every layer's state on the Gram route, or None for a layer that must take the exact
    route (the accuracy gate failed, or squared factors overflow the server dtype).

    layers: L layers, each the K clients' (checked) updates, all with the same (d_out, d_in)
    and the same client ranks, with sum r_i <= d_out (and <= d_in for ``sides=2``); weights
    (K,) float64 summing to 1; dtype: the server math dtype. No ``memory`` blend here.
    """
    groups = Groups.of([u.rank for u in layers[0]])
    scales = torch.tensor([[ups[i].scale for i in groups.order] for ups in layers], dtype=dtype)
    Bt = stack_factors(layers, groups, "B", dtype)
    GB = Bt @ Bt.mT  # (L, n, n): the one O(d_out n^2) product
    gb = [diag_blocks(GB, o, c, r) for o, c, r in groups.runs]
    At = GA = None
    if opts.sides == 2:
        At = stack_factors(layers, groups, "A", dtype)
        GA = At @ At.mT
        ga = [diag_blocks(GA, o, c, r) for o, c, r in groups.runs]
    else:
        # One-sided GLoRA needs only each client's own A A^T: no stacked copy of the A's.
        ga = _client_grams(layers, groups, dtype)
    finite = torch.isfinite(GB).flatten(1).all(1)
    for g in ga:
        finite &= torch.isfinite(g).flatten(1).all(1)
    if not bool(finite.all()):
        # Checked (finite) factors whose squares, or server-dtype copies, overflow: one such
        # matrix would fail the batched eigen-decompositions of all, and it is rare enough
        # that the whole batch can take the exact route.
        return [None] * len(layers)
    forms = client_forms(gb, ga, scales, groups, opts.rtol)
    wcol = groups.repeat(weights[groups.order].to(dtype))
    col = _consensus_weights(wcol, forms.sig, opts.energy)
    left = _GramSide(layers, groups, "B", Bt, forms.T, _congruence(forms.T, groups, GB), col, forms.kappa)
    del GB, gb  # only X^T X from here on
    GY = None if GA is None else _congruence(forms.S, groups, GA)
    right = _GramSide(layers, groups, "A", At, forms.S, GY, col, forms.kappa)
    return _thin(*_core(left, right, wcol * forms.sig, opts), opts.rtol)


def _client_grams(layers: Sequence[Sequence[LowRank]], groups: Groups, dtype: torch.dtype) -> list[Tensor]:
    """Each client's A_i A_i^T, per run of ``groups``: (L, c, r, r), cost d_in * sum r_i^2."""
    out, start = [], 0
    for _, c, _ in groups.runs:
        members = groups.order[start : start + c]
        out.append(torch.stack([torch.stack([_gram_rows(ups[i].A.to(dtype)) for i in members]) for ups in layers]))
        start += c
    return out


def _gram_rows(A: Tensor) -> Tensor:
    return A @ A.T


def _congruence(blocks: list[Tensor], groups: Groups, G: Tensor) -> Tensor:
    """blockdiag(T)^T G blockdiag(T) for symmetric G (L, n, n): the Gram matrix of the canonical columns."""
    return blockdiag_apply(blocks, groups, blockdiag_apply(blocks, groups, G, transpose=True).mT, transpose=True)

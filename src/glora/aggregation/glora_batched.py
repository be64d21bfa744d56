"""GLoRA for many layers at once, from Gram matrices (method.md steps 1-5, batched).

The per-layer rule (glora.py) factorises the tall stacked matrices with QR and SVD. Here
the layers that share a shape and the clients' ranks are stacked along a batch axis, and
every tall factorisation is replaced by one Gram matrix product and small batched
eigen-decompositions:

- B_i^T B_j for all client pairs is one (n, n) Gram matrix ``GB = Bt Bt^T`` with
  n = sum r_i (cost d_out n^2, one GEMM); its diagonal blocks give each client's QR-free
  canonical form (step 1) through (r, r) eigen-decompositions and SVDs;
- the consensus basis (step 2) is the top of the (n, n) eigen-decomposition of
  diag(col) T^T GB T diag(col), the Gram matrix of the stacked [col_i X_i], instead of
  the SVD of that (d_out, n) matrix;
- the core (step 3) is one (R, n) x (n, d_in) product with the stacked A's, and only the
  final (R, d_in) core gets a (short and wide) SVD.

Nothing of size d_out x d_in is formed, and no (d, n) matrix other than the stacked
factors themselves.

Accuracy. A Gram matrix squares the condition number: the canonical forms built from
it lose about eps * kappa digits, with kappa the largest condition number of a client's
B^T B or A A^T, and the consensus basis a further factor lam_1 / lam_R (the spread of
the kept eigenvalues of the projector average). A layer takes this route only when
``eps * kappa * lam_1 / lam_R <= GRAM_TOL[dtype]``, and only when its R kept consensus
eigenvalues are all clearly non-zero (duplicated client directions make some exactly
zero, which a Gram matrix cannot tell apart from rounding); every other layer is
returned as ``None`` for the caller to run through the exact QR + SVD path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from glora.lowrank import LowRank, numerical_rank

# Largest predicted relative error (eps * kappa * lam_1 / lam_R) a layer may have on the
# Gram route before it is sent to the QR + SVD path. float64: agreement with that path to
# about 1e-10, far below anything training can see; float32: 1e-4, about the rounding of
# the bfloat16 / float16 factors clients usually train in, so the server adds no error
# that the clients' own arithmetic does not already carry.
GRAM_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


@dataclass(frozen=True)
class Options:
    """The GLoRA options the batched route needs (see :class:`glora.aggregation.glora.GLoRA`)."""

    rank: int
    threshold: float | None
    energy: bool
    sides: int
    rtol: float


@dataclass(frozen=True)
class Groups:
    """Clients sorted by rank, as runs of equal rank: (row offset, clients, rank) each.

    ``order`` maps sorted position to client index; rows of the stacked factors follow it.
    """

    order: list[int]
    runs: list[tuple[int, int, int]]

    @property
    def n(self) -> int:
        """Total stacked rank, sum r_i."""
        return sum(c * r for _, c, r in self.runs)

    @staticmethod
    def of(ranks: Sequence[int]) -> Groups:
        order = sorted(range(len(ranks)), key=lambda i: ranks[i])
        runs: list[tuple[int, int, int]] = []
        offset = 0
        for i in order:
            r = ranks[i]
            if runs and runs[-1][2] == r:
                o, c, _ = runs[-1]
                runs[-1] = (o, c + 1, r)
            else:
                runs.append((offset, 1, r))
            offset += r
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
    out = torch.empty(len(layers), groups.n, d, dtype=dtype)
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
    # the accuracy check through kappa and is recomputed by the exact path anyway.
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
class Basis:
    """Top consensus directions of one side: the basis is (stacked factors)^T @ Z.

    Z: (L, n, m) coefficients on the stacked rows (zero columns beyond each layer's k);
    V1: (L, n, m) the same directions on the canonical columns (Z = blockdiag(T) V1);
    lam: (L, m) eigenvalues, decreasing; k: kept directions per layer; ok: (L,) whether the
    Gram route is accurate enough for the layer.
    """

    Z: Tensor
    V1: Tensor
    lam: Tensor
    k: list[int]
    ok: list[bool]


def consensus_basis(
    G: Tensor, col: Tensor, blocks: list[Tensor], groups: Groups, kappa: Tensor, opts: Options
) -> Basis:
    """Step 2: top eigenvectors of diag(col) G diag(col), G (L, n, n) the Gram matrix of the
    canonical columns (X^T X or Y^T Y), col (L, n) their weights (sqrt(w_i), times sig for
    "energy"; zero for dropped columns)."""
    L, n = col.shape
    m = min(opts.rank, n)
    lam, E = torch.linalg.eigh(col[:, :, None] * G * col[:, None, :])
    lam, E = lam[:, -m:].flip(-1), E[:, :, -m:].flip(-1)  # (L, m), (L, n, m) decreasing
    tol = GRAM_TOL[G.dtype] / torch.finfo(G.dtype).eps
    n_eff = (col > 0).sum(dim=1).tolist()
    ks, oks = [], []
    mask = torch.zeros(L, m, dtype=G.dtype)
    for l in range(L):
        k0 = min(opts.rank, n_eff[l])
        top, low = (float(lam[l, 0]), float(lam[l, k0 - 1])) if k0 else (0.0, 0.0)
        ok = k0 == 0 or (low > 0 and float(kappa[l]) * top / low <= tol)
        k = k0
        if opts.threshold is not None and k:
            ref = top if opts.energy else 1.0
            k = min(k, int((lam[l] >= opts.threshold * ref).sum()))
        mask[l, :k] = 1.0
        ks.append(k)
        oks.append(ok)
    V1 = col[:, :, None] * E * (lam.clamp_min(torch.finfo(G.dtype).tiny).rsqrt() * mask)[:, None, :]
    return Basis(blockdiag_apply(blocks, groups, V1, transpose=False), V1, lam, ks, oks)


def glora_batch(
    layers: Sequence[Sequence[LowRank]], weights: Tensor, opts: Options, dtype: torch.dtype
) -> list[tuple[Tensor, Tensor, Tensor] | None]:
    """GLoRA's state of every layer as its thin SVD (Ub (d_out, k), lam (k,), Q (d_in, k)), or
    None for a layer that must take the exact QR + SVD path (accuracy check failed, or its
    factors hold NaN / Inf, which that path reports).

    layers: L layers, each the K clients' updates, all with the same (d_out, d_in) and the
    same client ranks, with sum r_i <= d_out (and <= d_in for ``sides=2``); weights (K,)
    float64 summing to 1; dtype: the server math dtype.
    """
    groups = Groups.of([u.rank for u in layers[0]])
    scales = torch.tensor([[ups[i].scale for i in groups.order] for ups in layers], dtype=dtype)
    w = weights[groups.order].to(dtype)
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
        # NaN / Inf in some layer's factors (or squares beyond the float range): those layers go
        # to the exact path, which names the offending client; the rest are redone without them.
        fine = finite.tolist()
        kept = [ups for ups, f in zip(layers, fine, strict=True) if f]
        rest = iter(glora_batch(kept, weights, opts, dtype) if kept else [])
        return [next(rest) if f else None for f in fine]
    forms = client_forms(gb, ga, scales, groups, opts.rtol)
    wcol = groups.repeat(w)
    col = wcol.sqrt() * (forms.sig if opts.energy else (forms.sig > 0).to(dtype))
    GX = _congruence(forms.T, groups, GB)  # X^T X
    del GB
    left = consensus_basis(GX, col, forms.T, groups, forms.kappa, opts)
    coeff = (left.V1.mT @ GX) * (wcol * forms.sig)[:, None, :]  # (L, m, n): w_i U^T X_i diag(sig_i)
    if opts.sides == 1:
        H = blockdiag_apply(forms.S, groups, coeff.mT, transpose=False).mT  # coeff @ blockdiag(S)^T
        P, lam, Qh = torch.linalg.svd(_times_A(H, layers, groups), full_matrices=False)  # core U^T sum w_i Delta_i
        Q = Qh.mT
        oks = left.ok
    else:
        GY = _congruence(forms.S, groups, GA)  # Y^T Y
        right = consensus_basis(GY, col, forms.S, groups, forms.kappa, opts)
        P, lam, Qh = torch.linalg.svd(coeff @ (GY @ right.V1), full_matrices=False)  # (m, m) core U^T Delta V
        Q = At.mT @ (right.Z @ Qh.mT)
        oks = [a and b for a, b in zip(left.ok, right.ok, strict=True)]
    Ub = Bt.mT @ (left.Z @ P)
    out: list[tuple[Tensor, Tensor, Tensor] | None] = []
    for l, ok in enumerate(oks):
        if not ok:
            out.append(None)
            continue
        keep = numerical_rank(lam[l], opts.rtol)
        out.append((Ub[l, :, :keep].contiguous(), lam[l, :keep].contiguous(), Q[l, :, :keep].contiguous()))
    return out


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


def _times_A(H: Tensor, layers: Sequence[Sequence[LowRank]], groups: Groups) -> Tensor:
    """H (L, m, n) times the stacked A's (n, d_in) of each layer, client by client: (L, m, d_in).

    Client by client rather than through a stacked copy: the same reads, no copy to hold."""
    L, m, _ = H.shape
    out = H.new_zeros(L, m, layers[0][0].d_in)
    for l, ups in enumerate(layers):
        o = 0
        for i in groups.order:
            A = ups[i].A
            out[l].addmm_(H[l, :, o : o + A.shape[0]], A.to(H.dtype))
            o += A.shape[0]
    return out


def _congruence(blocks: list[Tensor], groups: Groups, G: Tensor) -> Tensor:
    """blockdiag(T)^T G blockdiag(T) for symmetric G (L, n, n): the Gram matrix of the canonical columns."""
    return blockdiag_apply(blocks, groups, blockdiag_apply(blocks, groups, G, transpose=True).mT, transpose=True)

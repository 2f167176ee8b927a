"""An independent float64 emulation of DESIGN.md section 2, written from the text, used as the
reference the library is checked against. Deliberately naive: loops and full SVDs."""
import torch

ALPHAS = (0.5, 0.75, 1.0, 1.25, 1.5)


def canonical(u):
    u = u.clone()
    for j in range(u.shape[1]):
        col = u[:, j]
        i = int(torch.argmax(col.abs()))  # first maximal = lowest row
        if col[i] < 0:
            u[:, j] = -col
    return u


def block_u(mat, size):
    """U of svd(mat) (size x M) with canonical signs, embedded in a size x size identity."""
    r = mat.shape[0]
    u = torch.linalg.svd(mat, full_matrices=True).U
    out = torch.eye(size, dtype=torch.float64)
    out[:r, :r] = canonical(u)
    return out


def permutation(w, ls):
    k = w.shape[1]
    e = (w ** 2).mean(0)
    e = (1 - ls) * e + ls * e.mean()
    order = sorted(range(k), key=lambda c: -float(e[c]))  # Python's sort is stable
    p = []
    lo, hi = 0, k - 1
    while lo <= hi:
        p.append(order[lo])
        if lo != hi:
            p.append(order[hi])
        lo, hi = lo + 1, hi - 1
    return torch.tensor(p)


def quantize_row(row, bits):
    qmax = 2 ** (bits - 1) - 1
    best = None
    for a in ALPHAS:
        s = max(float(row.abs().max()) / qmax / a, 1e-8)
        codes = torch.clamp(torch.round(row / s), -qmax - 1, qmax)
        err = float(((codes * s - row) ** 2).mean())
        if best is None or err < best[0]:
            best = (err, s, codes)
    return best[2], best[1]


def pack(w, bias, wbits=4, block=16, block_out=None, permute=True, ls=0.15, row_rot="restore"):
    w = w.to(torch.float64)
    n, k = w.shape
    bo = block_out or block
    p = permutation(w, ls) if permute else torch.arange(k)
    wp = w[:, p]
    nb = -(-k // block)
    r_in = [block_u(wp[:, i * block:(i + 1) * block].T, block) for i in range(nb)]
    w1 = wp.clone()
    for i in range(nb):
        c0, c1 = i * block, min(k, (i + 1) * block)
        w1[:, c0:c1] = wp[:, c0:c1] @ r_in[i][: c1 - c0, : c1 - c0]
    w2, r_out = w1.clone(), None
    if row_rot == "restore":
        r_out = []
        for j in range(-(-n // bo)):
            r0, r1 = j * bo, min(n, (j + 1) * bo)
            u = block_u(w[r0:r1, :], bo)
            r_out.append(u)
            w2[r0:r1] = u[: r1 - r0, : r1 - r0] @ w1[r0:r1]
    if wbits in (0, 16):
        wq = w2
    else:
        wq = torch.empty_like(w2)
        for r in range(n):
            codes, s = quantize_row(w2[r], wbits)
            wq[r] = codes * s
    return dict(perm=p, r_in=r_in, r_out=r_out, wq=wq, bias=None if bias is None else bias.to(torch.float64),
                block=block, block_out=bo)


def transform(x, pk):
    x = x.to(torch.float64)[:, pk["perm"]]
    b, k = pk["block"], x.shape[1]
    out = x.clone()
    for i, r in enumerate(pk["r_in"]):
        c0, c1 = i * b, min(k, (i + 1) * b)
        out[:, c0:c1] = x[:, c0:c1] @ r[: c1 - c0, : c1 - c0]
    return out


def forward(x, pk, abits=8, act_scale=None):
    """act_scale None: dynamic per-token; a tensor: static (per layer or per channel)."""
    xt = transform(x, pk)
    if abits not in (0, 16):
        qmax = 2 ** (abits - 1) - 1
        s = (xt.abs().amax(1, keepdim=True) / qmax).clamp_min(1e-8) if act_scale is None else act_scale.double()
        xt = torch.clamp(torch.round(xt / s), -qmax - 1, qmax) * s
    y = xt @ pk["wq"].T
    if pk["r_out"] is not None:
        bo, n = pk["block_out"], y.shape[1]
        out = y.clone()
        for j, r in enumerate(pk["r_out"]):
            r0, r1 = j * bo, min(n, (j + 1) * bo)
            out[:, r0:r1] = y[:, r0:r1] @ r[: r1 - r0, : r1 - r0]
        y = out
    if pk["bias"] is not None:
        y = y + pk["bias"]
    return y

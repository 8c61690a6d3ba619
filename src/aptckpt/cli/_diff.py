"""``aptckpt diff``: which tensors and values differ between two checkpoints.

Exit status as diff(1): 0 the states are identical, 1 they differ, 2 trouble (a
checkpoint is missing, unreadable or damaged).

Both states are loaded on the CPU and flattened to key paths spelled as
``aptckpt inspect`` and error messages spell them (``state['model']['w']``). Tensors are compared
bitwise first (exact for every dtype); changed float and complex tensors also get the
max absolute difference and the relative L2 change, computed in float64 slices of
:data:`_DIFF_SLICE` elements so the extra memory stays bounded.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np
import torch

import aptckpt
from aptckpt.cli._common import (
    dtype_str,
    fmt_num,
    fmt_value,
    key_path_items,
    options_for,
    print_json,
    render_table,
)

#: Elements per slice when diffing float tensors in float64, bounding extra memory.
_DIFF_SLICE = 1 << 22

_STATUSES = ("same", "changed", "only in A", "only in B")


def _flat_dict(state: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in key_path_items(state):
        name, n = key, 1
        while name in out:  # keys with one repr (two NaN keys) spell alike; keep both
            n += 1
            name = f"{key} ({n})"
        out[name] = value
    return out


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)


def _compare_tensors(key: str, a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    row: dict[str, Any] = {"key": key, "status": "changed", "dtype": dtype_str(a)}
    row.update(shape=list(a.shape), numel=a.numel())
    if a.dtype != b.dtype:
        return {**row, "detail": f"dtype {dtype_str(a)} -> {dtype_str(b)}"}
    if a.shape != b.shape:
        return {**row, "detail": f"shape {tuple(a.shape)} -> {tuple(b.shape)}"}
    a8, b8 = _bytes_of(a), _bytes_of(b)  # bitwise first: exact, and covers every dtype
    if torch.equal(a8, b8):
        return {**row, "status": "same", "differing": 0, "detail": "same"}
    n = a.numel()
    row.update(differing=int((a8 != b8).view(n, -1).any(dim=1).sum()), detail="changed")
    if a.is_floating_point() or a.is_complex():
        row.update(_float_change(a, b))
    return row


def _float_change(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Max abs difference and ||b - a|| / ||a||, in float64 slices; equal NaNs count as equal."""
    wide = torch.complex128 if a.is_complex() else torch.float64
    fa, fb = a.detach().reshape(-1), b.detach().reshape(-1)
    max_abs = diff_sq = ref_sq = 0.0
    for i in range(0, fa.numel(), _DIFF_SLICE):
        x, y = fa[i : i + _DIFF_SLICE].to(wide), fb[i : i + _DIFF_SLICE].to(wide)
        equal = (x == y) | (torch.isnan(x) & torch.isnan(y))
        d = torch.where(equal, torch.zeros((), dtype=wide), y - x).abs()
        m = float(d.max())  # NaN if any difference is NaN, and then it stays NaN
        if math.isnan(m) or m > max_abs:
            max_abs = m
        diff_sq += float((d * d).sum())
        ref_sq += float((x.abs() ** 2).sum())
    if ref_sq > 0:
        rel = math.sqrt(diff_sq) / math.sqrt(ref_sq)
    else:
        rel = 0.0 if diff_sq == 0 else math.inf
    return {"max_abs_diff": max_abs, "rel_l2": rel}


def _parts(value: Any) -> tuple[Any, list[tuple[str, torch.Tensor]]] | None:
    """A value that is not a dense tensor but is made of them -- a numpy array, a sparse or
    quantized tensor -- as ``(what must be equal, [(part name, dense tensor), ...])``;
    None for anything else. (Comparing such values directly crashes torch or numpy.)"""
    if isinstance(value, np.ndarray):
        dense = torch.from_numpy(np.ascontiguousarray(value).reshape(value.shape))
        return ("array", value.dtype.str, value.shape), [("", dense)]
    if not isinstance(value, torch.Tensor):
        return None
    if value.is_quantized:
        scheme = value.qscheme()
        if scheme == torch.per_tensor_affine:
            params: Any = (value.q_scale(), value.q_zero_point())
            parts = [(".int_repr", value.int_repr())]
        else:
            params = value.q_per_channel_axis()
            parts = [
                (".int_repr", value.int_repr()),
                (".scales", value.q_per_channel_scales()),
                (".zero_points", value.q_per_channel_zero_points()),
            ]
        return ("quantized", str(value.dtype), str(scheme), params), parts
    meta: tuple[Any, ...]
    if value.layout == torch.sparse_coo:
        meta = ("sparse", str(value.layout), tuple(value.shape), value.is_coalesced())
        return meta, [(".indices", value._indices()), (".values", value._values())]
    if value.layout in (torch.sparse_csr, torch.sparse_bsr):
        meta = ("sparse", str(value.layout), tuple(value.shape))
        names = (".crow_indices", ".col_indices", ".values")
        return meta, list(
            zip(names, (value.crow_indices(), value.col_indices(), value.values()), strict=True)
        )
    if value.layout in (torch.sparse_csc, torch.sparse_bsc):
        meta = ("sparse", str(value.layout), tuple(value.shape))
        names = (".ccol_indices", ".row_indices", ".values")
        return meta, list(
            zip(names, (value.ccol_indices(), value.row_indices(), value.values()), strict=True)
        )
    return None


def _compare_composites(key: str, a: Any, b: Any) -> dict[str, Any]:
    pa, pb = _parts(a), _parts(b)
    if pa is None or pb is None or pa[0] != pb[0] or len(pa[1]) != len(pb[1]):
        what = [p[0][0] if p is not None else type(v).__name__ for p, v in ((pa, a), (pb, b))]
        detail = f"{what[0]} -> {what[1]}" if what[0] != what[1] else f"{what[0]} layout changed"
        return {"key": key, "status": "changed", "detail": detail}
    rows = [
        _compare_tensors(key + name, x, y) for (name, x), (_, y) in zip(pa[1], pb[1], strict=True)
    ]
    changed = [r for r in rows if r["status"] != "same"]
    if not changed:
        return {"key": key, "status": "same", "detail": "same"}
    detail = ", ".join(f"{r['key'][len(key) :] or 'values'}: {r['detail']}" for r in changed)
    return {"key": key, "status": "changed", "detail": detail}


def _compare_values(key: str, a: Any, b: Any) -> dict[str, Any]:
    def same() -> bool:
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return True
        if isinstance(a, np.generic) or isinstance(b, np.generic):  # bitwise: NaN equals NaN
            return type(a) is type(b) and bytes(np.asarray(a).tobytes()) == bytes(
                np.asarray(b).tobytes()
            )
        return type(a) is type(b) and bool(a == b)

    if same():
        return {"key": key, "status": "same", "detail": "same"}
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        kind = ("tensor" if isinstance(x, torch.Tensor) else type(x).__name__ for x in (a, b))
        return {"key": key, "status": "changed", "detail": "type {} -> {}".format(*kind)}
    detail = f"{fmt_value(a, 30)} -> {fmt_value(b, 30)}"
    return {"key": key, "status": "changed", "detail": detail, "a": a, "b": b}


def _compare(key: str, a: Any, b: Any) -> dict[str, Any]:
    if _parts(a) is not None or _parts(b) is not None:
        return _compare_composites(key, a, b)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return _compare_tensors(key, a, b)
    return _compare_values(key, a, b)


def _only(key: str, side: str) -> dict[str, Any]:
    status = f"only in {side}"
    return {"key": key, "status": status, "detail": status}


def cmd_diff(args: argparse.Namespace) -> int:
    state_a, state_b = (
        _flat_dict(aptckpt.load(p, map_location="cpu", storage_options=options_for(args, p)))
        for p in (args.a, args.b)
    )
    rows = [
        _compare(key, a, state_b[key]) if key in state_b else _only(key, "A")
        for key, a in state_a.items()
    ]
    rows += [_only(key, "B") for key in state_b if key not in state_a]
    counts = {s: sum(r["status"] == s for r in rows) for s in _STATUSES}
    identical = counts["same"] == len(rows)
    code = 0 if identical else 1
    if args.json:
        print_json({"a": str(args.a), "b": str(args.b), "summary": counts, "keys": rows})
        return code
    shown = [r for r in rows if args.all or r["status"] != "same"]
    if shown:
        table = [
            (
                r["key"],
                r["detail"],
                f"{r['differing']}/{r['numel']}" if "differing" in r else "",
                fmt_num(r.get("max_abs_diff")),
                fmt_num(r.get("rel_l2")),
            )
            for r in shown
        ]
        header = ("key", "change", "differing", "max abs diff", "rel L2")
        print(render_table(header, table, (2, 3, 4)))
        print()
    verdict = "identical" if identical else "different"
    print(f"{verdict}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return code

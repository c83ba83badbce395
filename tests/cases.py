"""The one case list of Taylor attention tests: every feature of the problem description (dense and packed rows,
grouped-query heads, end-aligned causal, key padding, an initial state, the final state) as readable cases, the
inputs each case draws (fresh and seeded per case, never zeros), and its float64 ground truth (the definition,
``naive.taylor_attention_naive``, per sequence). Backends are tested against it case by case (tests/test_taylor.py).

Tolerances follow flash-attention's rule: a kernel's error against the float64 ground truth is at most twice the
error of a plain PyTorch implementation in the same dtype (``plain_error``), plus a floor for float64 / float32.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from linattn_cuda.feature_map import feature_dim
from linattn_cuda.ops.taylor import naive
from linattn_cuda.ops.taylor.state import TaylorState

from .helpers import seed_for


@dataclass(frozen=True)
class Case:
    lq: tuple  # query lengths of the sequences (dense: one length repeated B times)
    lk: tuple
    h: int = 4
    hkv: int = 4
    d: int = 16
    dv: int = 32
    causal: bool = False
    packed: bool = False
    mask: bool = False  # key padding (dense only)
    state_in: bool = False
    state_out: bool = False

    @property
    def id(self) -> str:
        lens = (f"L{'_'.join(map(str, self.lq))}" if self.lq == self.lk
                else f"Lq{'_'.join(map(str, self.lq))}-Lk{'_'.join(map(str, self.lk))}")
        parts = ["packed" if self.packed else f"B{len(self.lq)}", lens, f"H{self.h}", f"Hkv{self.hkv}",
                 f"D{self.d}", f"Dv{self.dv}", "causal" if self.causal else "full"]
        parts += [name for name, on in (("mask", self.mask), ("s0", self.state_in), ("sT", self.state_out)) if on]
        return "-".join(parts)

    @property
    def size(self) -> int:
        """A rough amount of work (query-key pairs x heads), to keep slow backends on small cases."""
        return sum(a * b for a, b in zip(self.lq, self.lk)) * self.h * (self.d + self.dv)


def dense(b, lq, lk=None, **kw) -> Case:
    return Case(lq=(lq,) * b, lk=((lk if lk is not None else lq),) * b, **kw)


def packed(lq, lk=None, **kw) -> Case:
    return Case(lq=tuple(lq), lk=tuple(lk if lk is not None else lq), packed=True, **kw)


_BASE = [
    dense(2, 37),
    dense(2, 37, causal=True),
    dense(1, 130, causal=True, dv=64),  # more than one chunk of 64 (cpu linear form), a partial last one
    dense(2, 300, causal=True, d=8, dv=24),  # beyond the cpu's quadratic limit (256): the chunked form
    dense(2, 29, d=5, dv=3),  # odd dims
    dense(2, 23, causal=True, d=7, dv=33, mask=True),
    dense(2, 41, mask=True),
    dense(2, 17, 53, causal=True),  # end-aligned causal (Lq < Lk)
    dense(2, 17, 53),
    dense(2, 31, causal=True, h=4, hkv=2),  # grouped-query attention
    dense(2, 31, h=8, hkv=2, mask=True),
    dense(1, 19, 67, causal=True, h=8, hkv=2, mask=True),
    dense(1, 1, 40, causal=True, h=4, hkv=1),  # one query against a cache (decode): the non-causal path
    dense(1, 33, causal=True, state_in=True, state_out=True),  # chunked prefill: a state in, the state out
    dense(2, 21, causal=True, h=4, hkv=2, mask=True, state_in=True, state_out=True),
    dense(2, 19, state_in=True),  # non-causal with an initial state (context parallelism's prefix)
    dense(2, 23, 31, state_out=True, mask=True),
    dense(1, 0, 29, state_out=True),  # the state of keys alone (no query)
    dense(1, 13, 0, state_in=True),  # queries reading only a state (no key)
    packed([0, 1, 17, 64, 130]),
    packed([0, 1, 17, 64, 130], causal=True),
    packed([5, 0, 33, 2], [9, 4, 40, 2], causal=True, h=8, hkv=2),  # per-sequence end-aligned, an empty query seq
    packed([12, 7, 25], h=4, hkv=1),
    packed([9, 14], causal=True, state_in=True, state_out=True, h=4, hkv=2),
    packed([6, 0, 11], [6, 3, 11], state_in=True, state_out=True),
]
CASES = _BASE


def head_dim_cases() -> list:
    """Real models' head dims beyond the Based shape (Gemma: 256)."""
    return [dense(1, 33, causal=True, d=128, dv=128, h=2, hkv=1), dense(1, 20, causal=True, d=256, dv=256, h=2, hkv=2)]


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: Optional[torch.Tensor]
    cu_q: Optional[torch.Tensor]
    cu_k: Optional[torch.Tensor]
    state: Optional[TaylorState]

    def tensors(self) -> list:
        return [self.q, self.k, self.v] + (list(self.state) if self.state is not None else [])

    def to(self, dtype, requires_grad=False) -> "Inputs":
        def cast(t, dt):
            return t.detach().to(dt).requires_grad_(requires_grad)

        state = None
        if self.state is not None:
            sd = torch.float64 if dtype == torch.float64 else torch.float32
            state = TaylorState(cast(self.state.kv, sd), cast(self.state.k_sum, sd))
        return dataclasses.replace(self, q=cast(self.q, dtype), k=cast(self.k, dtype), v=cast(self.v, dtype),
                                   state=state)


def make_inputs(case: Case, *, seed=0) -> Inputs:
    """float64 inputs of a case: standard normal q, k, v; a key padding mask with ~30 % padding (the first keys of
    sequence 0 padded, so causal queries that see only padding occur); a positive initial state (the state of a few
    random keys, as a real prefix would leave)."""
    gen = torch.Generator().manual_seed(seed_for(case.id, seed))
    n = len(case.lq)
    f64 = torch.float64
    if case.packed:
        tq, tk = sum(case.lq), sum(case.lk)
        q = torch.randn(tq, case.h, case.d, generator=gen, dtype=f64)
        k = torch.randn(tk, case.hkv, case.d, generator=gen, dtype=f64)
        v = torch.randn(tk, case.hkv, case.dv, generator=gen, dtype=f64)
        cu_q = torch.tensor([0] + list(torch.tensor(case.lq).cumsum(0).tolist()), dtype=torch.int32)
        cu_k = torch.tensor([0] + list(torch.tensor(case.lk).cumsum(0).tolist()), dtype=torch.int32)
        mask = None
    else:
        q = torch.randn(n, case.h, case.lq[0], case.d, generator=gen, dtype=f64)
        k = torch.randn(n, case.hkv, case.lk[0], case.d, generator=gen, dtype=f64)
        v = torch.randn(n, case.hkv, case.lk[0], case.dv, generator=gen, dtype=f64)
        cu_q = cu_k = None
        mask = None
        if case.mask:
            mask = torch.rand(n, case.lk[0], generator=gen) < 0.3
            mask[0, : min(3, case.lk[0])] = True
    state = None
    if case.state_in:
        prefix = 5
        kp = torch.randn(n, case.hkv, prefix, case.d, generator=gen, dtype=f64)
        vp = torch.randn(n, case.hkv, prefix, case.dv, generator=gen, dtype=f64)
        state = naive.state_of_keys(kp, vp, scale=case.d**-0.5)
        assert state.kv.shape[2] == feature_dim(case.d)
    return Inputs(q, k, v, mask, cu_q, cu_k, state)


def _sequences(x, cu):
    bounds = cu.tolist()
    return [x[bounds[i] : bounds[i + 1]].transpose(0, 1).unsqueeze(0) for i in range(len(bounds) - 1)]


def expected(case: Case, x: Inputs):
    """The ground truth ``(out, state)`` of the case's inputs in their dtype's accumulation (float64 inputs: the
    float64 definition), through plain autograd-able PyTorch: per sequence for packed inputs."""
    if not case.packed:
        return naive.taylor_attention_naive(x.q, x.k, x.v, causal=case.causal, key_padding_mask=x.mask,
                                            initial_state=x.state, return_state=case.state_out)
    outs, kvs, sums = [], [], []
    for n, (qs, ks, vs) in enumerate(zip(_sequences(x.q, x.cu_q), _sequences(x.k, x.cu_k), _sequences(x.v, x.cu_k))):
        s0 = None if x.state is None else TaylorState(x.state.kv[n : n + 1], x.state.k_sum[n : n + 1])
        out, st = naive.taylor_attention_naive(qs, ks, vs, causal=case.causal, initial_state=s0,
                                               return_state=case.state_out)
        outs.append(out[0].transpose(0, 1))
        if case.state_out:
            kvs.append(st.kv)
            sums.append(st.k_sum)
    out = torch.cat(outs, 0)
    return out, (TaylorState(torch.cat(kvs, 0), torch.cat(sums, 0)) if case.state_out else None)


def plain_low_precision(case: Case, x: Inputs):
    """The plain quadratic formula computed entirely in the inputs' dtype (no float32 accumulation): the baseline of
    the tolerance rule. Returns ``(out, state)`` like :func:`expected`."""
    dt = x.q.dtype

    def one(q, k, v, mask, s0):
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        scale = q.shape[-1] ** -0.5
        s = (q @ k.transpose(-1, -2)) * scale
        w = 1 + s + s * s / 2
        lq, lk = q.shape[2], k.shape[2]
        hidden = torch.zeros(lq, lk, dtype=torch.bool)
        if case.causal and lq > 1:
            hidden = torch.arange(lk)[None, :] > torch.arange(lq)[:, None] + (lk - lq)
        hidden = hidden[None, None]
        if mask is not None:
            hidden = hidden | mask[:, None, None, :]
        w = w.masked_fill(hidden, 0)
        num, den = w @ v, w.sum(-1)
        if s0 is not None:
            n0, d0 = naive.read_state(q, TaylorState(s0.kv.to(dt), s0.k_sum.to(dt)), scale)
            num, den = num + n0.to(dt), den + d0.to(dt)
        out = torch.where(den.unsqueeze(-1) != 0, num / torch.where(den != 0, den, 1).unsqueeze(-1), 0)
        return out

    if not case.packed:
        out = one(x.q, x.k, x.v, x.mask, x.state)
    else:
        outs = []
        for n, (qs, ks, vs) in enumerate(zip(_sequences(x.q, x.cu_q), _sequences(x.k, x.cu_k), _sequences(x.v, x.cu_k))):
            s0 = None if x.state is None else TaylorState(x.state.kv[n : n + 1], x.state.k_sum[n : n + 1])
            outs.append(one(qs, ks, vs, None, s0)[0].transpose(0, 1))
        out = torch.cat(outs, 0)
    return out


FLOOR = {torch.float64: 1e-11, torch.float32: 2e-6, torch.bfloat16: 2e-3, torch.float16: 2e-4}


def rel_err(a, b) -> float:
    """max |a - b| / max(1, max |b|)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if b.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()

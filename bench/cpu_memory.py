"""Peak extra memory of one CPU forward, measured in a fresh process (issue target: non-causal forward at
L=16K under 1.5x the bytes of inputs + outputs).

    python -m bench.cpu_memory --length 16384 [--causal] [--backend cpu]

"extra" = peak resident memory during the call (VmHWM, reset just before the call) minus resident memory
just before it (inputs allocated, extension loaded, one tiny warm-up call made so that library
initialization is not counted).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import json, resource, sys, torch, linattn_cuda as la
b, h, length, d, dv, causal, backend = json.loads(sys.argv[1])
torch.manual_seed(0)
q, k = torch.randn(b, h, length, d), torch.randn(b, h, length, d)
v = torch.randn(b, h, length, dv)
la.taylor_attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], causal=causal, backend=backend)  # warm-up
def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024
def hwm_kib():  # this process's peak RSS (VmHWM); ru_maxrss would include the parent's peak from before exec
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the current RSS
except OSError:
    pass
before = rss_kib()
out = la.taylor_attention(q, k, v, causal=causal, backend=backend)
peak = hwm_kib()
io_bytes = sum(t.numel() * t.element_size() for t in (q, k, v, out))
print(json.dumps({"before_kib": before, "peak_kib": peak, "extra_bytes": (peak - before) * 1024,
                  "inputs_outputs_bytes": io_bytes}))
"""


def measure(length: int, *, causal: bool = False, backend: str = "cpu", b: int = 1, h: int = 4, d: int = 16, dv: int = 64) -> dict:
    args = json.dumps([b, h, length, d, dv, causal, backend])
    res = subprocess.run([sys.executable, "-c", _CHILD, args], capture_output=True, text=True, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["ratio"] = out["extra_bytes"] / out["inputs_outputs_bytes"]
    out.update(length=length, causal=causal, backend=backend, shape=[b, h, length, d, dv])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--backend", default="cpu")
    args = parser.parse_args(argv)
    r = measure(args.length, causal=args.causal, backend=args.backend)
    print(json.dumps(r, indent=1))
    print(f"peak extra memory = {r['ratio']:.2f} x (inputs + outputs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The machine header every results table carries: CPU model, cores, GPU, library versions, date, commit."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from importlib import metadata

__all__ = ["machine_info", "format_machine_header"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:  # macOS, Windows
        import cpuinfo  # py-cpuinfo

        return cpuinfo.get_cpu_info().get("brand_raw", "") or platform.processor()
    except Exception:
        return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: str = "cpu") -> dict:
    """A JSON-able description of the machine and software the benchmark ran on."""
    import torch

    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "linattn_cuda_commit": _git_commit(),
        "peers": {
            "flash-linear-attention": _version("fla-core") or _version("flash-linear-attention"),
            "pytorch-fast-transformers": _version("pytorch-fast-transformers"),
        },
        "device": device,
        "gpu": None,
    }
    try:
        import linattn_cuda

        info["backends"] = linattn_cuda.available_backends(device if device != "cuda" or torch.cuda.is_available() else "cpu")
        if linattn_cuda.extension_loaded():
            import linattn_cuda._C as ext

            info["extension"] = ext.__file__
    except Exception as exc:  # the header must never fail
        info["backends"] = f"unavailable: {exc}"
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
    return info


def format_machine_header(info: dict) -> str:
    peers = ", ".join(f"{k} {v}" for k, v in (info.get("peers") or {}).items() if v) or "none installed"
    lines = [
        f"- **Date:** {info.get('date')}",
        f"- **CPU:** {info.get('cpu')} — {info.get('cpu_count')} logical cores, torch threads {info.get('torch_threads')}",
    ]
    if info.get("gpu"):
        lines.append(f"- **GPU:** {info['gpu']}")
    lines += [
        f"- **Software:** Python {info.get('python')}, torch {info.get('torch')}"
        + (f" (CUDA {info['torch_cuda']})" if info.get("torch_cuda") else "")
        + f", Triton {info.get('triton') or 'not installed'}",
        f"- **linattn_cuda:** commit {info.get('linattn_cuda_commit') or 'unknown'}, backends on {info.get('device')}: "
        f"{info.get('backends')}" + (f" (extension {info['extension']})" if info.get("extension") else ""),
        f"- **Peers:** {peers}",
    ]
    if info.get("note"):
        lines.append(f"- **Note:** {info['note']}")
    return "\n".join(lines)

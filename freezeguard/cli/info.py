"""`freezeguard info`: versions, devices and each backend with why it is (un)available."""
from __future__ import annotations

import argparse
import json
import platform

HELP = "print versions, devices and which fused-op backends can run here (and why not)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def collect() -> dict:
    import torch

    from freezeguard._version import __version__
    from freezeguard.backends import AUTO_ORDER, BACKEND_NAMES, status

    versions = {"freezeguard": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "diffusers", "accelerate", "peft", "safetensors"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    backends = [{"name": s.name, "available": s.available, "reason": s.reason}
                for s in (status(n) for n in BACKEND_NAMES)]
    from freezeguard.backends.cuda_backend import hardware_note

    return {"versions": versions, "devices": devices, "backends": backends,
            "auto_order": {k: list(v) for k, v in AUTO_ORDER.items()}, "gpu_verification": hardware_note()}


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("versions: " + ", ".join(f"{k} {v or '-'}" for k, v in info["versions"].items()))
    print("devices:  " + ", ".join(info["devices"]))
    print("backends:")
    for b in info["backends"]:
        print(f"  {b['name']:<7} {'yes' if b['available'] else 'no ':<4} {b['reason']}")
    print("auto:     " + "; ".join(f"{dev}: {' > '.join(order)}" for dev, order in info["auto_order"].items()))
    print("GPU:      " + info["gpu_verification"])
    return 0

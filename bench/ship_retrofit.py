"""Copy a retrofit run into the package as a shipped retrofit (``python/dms_runtime/adapters/NAME``).

What ships: ``dms_weights.safetensors`` (the adapter in float32; a LoRA update's factors in
bfloat16, half the bytes, loaded back into the model's dtype), ``dms_config.json``, ``log.jsonl``
(the run's log, or several runs' logs given with ``--logs``). The recipe is written by hand.
Evaluate the shipped folder, not the run: the bfloat16 factors are what users load.

    .venv/bin/python bench/ship_retrofit.py bench/runs/cr8-lora16-lr5e-4 smollm2-135m-instruct-dms-cr8

``--to FOLDER`` writes the same files there instead: a LoRA run's small committed starting point for
a later sitting (``dms retrofit --init-from FOLDER``), where the run's float32 weights and optimiser
state (60 MB) stay uncommitted.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dms_runtime.models.lora import is_lora_parameter

ADAPTERS = Path(__file__).resolve().parents[1] / "python" / "dms_runtime" / "adapters"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="the retrofit run's folder (dms_weights.safetensors, dms_config.json)")
    ap.add_argument("name", help="the shipped name, e.g. smollm2-135m-instruct-dms-cr8")
    ap.add_argument("--logs", type=Path, nargs="+", help="log.jsonl files to ship, in order (default: the run's)")
    ap.add_argument("--to", type=Path, help="write into this folder instead of the package (name is then only a label)")
    args = ap.parse_args(argv)
    weights = load_file(str(args.run / "dms_weights.safetensors"))
    unexpected = [n for n in weights if not (".dms_proj_alpha" in n or is_lora_parameter(n))]
    if unexpected:
        raise SystemExit(f"run: {args.run} holds more than DMS weights (never ship the base): {unexpected[:3]}")
    out = args.to or ADAPTERS / args.name
    out.mkdir(parents=True, exist_ok=True)
    shipped = {n: (w.to(torch.bfloat16) if is_lora_parameter(n) else w).contiguous() for n, w in weights.items()}
    save_file(shipped, str(out / "dms_weights.safetensors"), metadata={"format": "pt"})
    settings = json.loads((args.run / "dms_config.json").read_text())
    (out / "dms_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    logs = args.logs or [args.run / "log.jsonl"]
    with open(out / "log.jsonl", "w") as f:
        for log in logs:
            f.write(log.read_text())
    size = (out / "dms_weights.safetensors").stat().st_size
    print(f"shipped {args.run} as {out} ({len(shipped)} tensors, {size / 1e6:.1f} MB)"
          + ("; write its recipe.md" if args.to is None else ""))


if __name__ == "__main__":
    main()

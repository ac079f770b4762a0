"""``fastadapter export``: write an adapter made by ``fastadapter train`` in the layout of PEFT, litgpt or the
original LLaMA-Adapter v1 (see :mod:`fastadapter.adapters.adapter_export`)."""
from __future__ import annotations

import os

from ._paths import check_outputs

HELP = "write a fastadapter adapter as a PEFT folder, a litgpt checkpoint or an original LLaMA-Adapter v1 file"


def add_arguments(parser) -> None:
    parser.add_argument("--to", required=True, choices=("peft", "litgpt", "v1"), help="the target layout")
    parser.add_argument("adapter", metavar="ADAPTER", help="the adapter file (OUT/adapter.safetensors of a run)")
    parser.add_argument("out", metavar="OUT", help="peft: a folder; litgpt and v1: a .pth file (never the ADAPTER)")
    parser.add_argument("--base-model", default="",
                        help="peft: base_model_name_or_path written to adapter_config.json")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files (atomically)")


def run(args) -> int:
    from ..adapters.adapter_export import PEFT_FILES, export_adapter

    if not os.path.isfile(args.adapter):
        raise FileNotFoundError(f"adapter not found: {args.adapter}")
    outputs = {"OUT": args.out}
    if args.to == "peft":
        outputs.update({f"OUT/{name}": os.path.join(args.out, name) for name in PEFT_FILES})
    check_outputs(outputs, {"ADAPTER": args.adapter}, overwrite=args.overwrite,
                  folders=("OUT",) if args.to == "peft" else ())
    for path in export_adapter(args.adapter, args.out, args.to, base_model_name=args.base_model):
        print(path)
    return 0

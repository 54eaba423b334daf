"""`sdtune inspect`: what an adapter, embedding or checkpoint file is, which model it is for and which tools read it,
from its key names, shapes and metadata (no weights loaded)."""

from __future__ import annotations

from sdtune.commands.options import command_parser

EPILOG = """examples:
  sdtune inspect loras/my_lora.safetensors          # format, family, rank/alpha per block, metadata, readers
  sdtune inspect runs/my_lora                       # a run directory: its adapter and training settings
  sdtune inspect export/my_lora_peft --json         # machine-readable
  sdtune inspect models/v1-5-pruned.safetensors     # a single-file checkpoint: SD1, SD2, SDXL, SD3 or Flux

PATH is a .safetensors file (kohya LoRA/LoCon, LyCORIS LoHa/LoKr, diffusers or peft LoRA, kohya Flux LoRA,
textual-inversion embedding, original-layout checkpoint), a .ckpt (its key names are searched, never unpickled), a
peft or diffusers adapter folder, a diffusers pipeline folder or an sdtune run directory. A file that is none of
these, or damaged, is one error line and exit code 2.
"""


def main(args: list[str]) -> int:
    parser = command_parser(
        "inspect",
        "Say what a LoRA, embedding or checkpoint file is: format, model family, adapted blocks with rank and alpha, "
        "training metadata, and which tools (diffusers, A1111/Forge, ComfyUI, kohya, peft) read it.",
        EPILOG,
    )
    parser.add_argument("path", metavar="PATH", help="file or folder to inspect")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    ns = parser.parse_args(args)
    from sdtune.export.inspect import inspect, to_text

    report = inspect(ns.path)
    print(report.to_json() if ns.json else to_text(report))
    return 0

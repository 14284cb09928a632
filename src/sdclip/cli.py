"""The ``sdclip`` command.  Data goes to stdout, messages to stderr; exit 0 ok, 1 failure, 2 bad input."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import sdclip

from .errors import BadInput, SdclipError


def read_prompts(prompts: Sequence[str], file: str | None) -> list[str]:
    """Prompts from arguments, then from ``file`` (.txt: one per line; .jsonl: one JSON string per line)."""
    out = list(prompts)
    if file is not None:
        path = Path(file)
        try:
            text = sys.stdin.read() if file == "-" else path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(f"{file}: cannot read prompts ({e})") from None
        if path.suffix == ".jsonl":
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except ValueError as e:
                    raise BadInput(f"{file}:{n}: not a JSON string ({e})") from None
                if not isinstance(value, str):
                    raise BadInput(f"{file}:{n}: expected a JSON string, got {type(value).__name__}")
                out.append(value)
        else:
            out.extend(text.splitlines())
    if not out:
        raise BadInput("no prompts: give them as arguments or with --file")
    return out


def _add_prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts (or use --file)")
    p.add_argument("--file", "-f", help="prompts from a file: .txt one per line, .jsonl one JSON string per line; - = stdin")


def cmd_tokenize(args: argparse.Namespace) -> None:
    if args.model:
        tokenizer = sdclip.load(args.model, tokenizer_mode=args.mode).tokenizers[0]
    else:
        tokenizer = sdclip.Tokenizer(mode=args.mode)
    for prompt in read_prompts(args.prompts, args.file):
        print(json.dumps(tokenizer.encode(prompt)))


def cmd_encode(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    prompts = read_prompts(args.prompts, args.file)
    te = sdclip.load(args.model, dtype=args.dtype, device=args.device, tokenizer_mode=args.mode)
    out = te.encode(prompts, encoder=args.encoder, layer=args.layer, final_norm=args.final_norm)
    usage = te.usages[args.encoder - 1]
    tensors = {"hidden": out.hidden, "pooled": out.pooled}
    if out.pooled_projected is not None:
        tensors["pooled_projected"] = out.pooled_projected
    metadata = {"model": str(args.model), "family": te.family, "encoder": str(args.encoder),
                "layer": str(usage.layer if args.layer is None else args.layer),
                "final_norm": str(usage.final_norm if args.final_norm is None else args.final_norm),
                "prompts": json.dumps(prompts), "sdclip": sdclip.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, args.out, metadata=metadata)
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in tensors.items())
    print(f"wrote {args.out}: {shapes}", file=sys.stderr)


def cmd_info(args: argparse.Namespace) -> None:
    te = sdclip.load(args.model)
    info = te.info.as_dict()
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"source:  {info['source']}")
    print(f"layout:  {info['layout']}")
    print(f"family:  {info['family']}")
    for n, e in enumerate(info["encoders"], 1):
        print(f"encoder {n}: {e['role']} ({e['architecture']}) at '{e['key_prefix']}' [{e['naming']} names]")
        print(f"  layers {e['layers']}, width {e['width']}, heads {e['heads']}, mlp {e['mlp_width']}, "
              f"activation {e['activation']}, projection {e['projection_dim'] or 'none'}, pad id {e['pad_id']}")
        print(f"  dtype {e['dtype']}, {e['parameters']:,} parameters; SD default: layer {e['default_layer']}"
              f"{' + final LN' if e['default_final_norm'] else ', no final LN'}")
        for note in e["notes"]:
            print(f"  note: {note}")
    ignored = info["ignored"]
    if ignored:
        total = sum(ignored.values())
        print(f"ignored: {total} tensors")
        for prefix, count in sorted(ignored.items(), key=lambda kv: (-kv[1], kv[0]))[: args.max_ignored]:
            print(f"  {count:6d}  {prefix}")
        if len(ignored) > args.max_ignored:
            print(f"  ... and {len(ignored) - args.max_ignored} more groups (--json lists all)")


def _bool_flag(p: argparse.ArgumentParser, name: str, help: str) -> None:
    p.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction, default=None, help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdclip", description="The CLIP text encoder Stable Diffusion uses: "
                                     "tokenize prompts, encode them to conditioning, inspect checkpoints.")
    parser.add_argument("--version", action="version", version=f"sdclip {sdclip.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("tokenize", help="prompt -> token ids (one JSON list per prompt per line)",
                       description="Print one JSON list of token ids per prompt per line: BOS and EOS included, "
                                   "no padding, no truncation.")
    _add_prompt_args(p)
    p.add_argument("--model", "-m", help="use this checkpoint's tokenizer (default: the bundled CLIP vocabulary)")
    p.add_argument("--mode", choices=sdclip.tokenizer.MODES, default="hf",
                   help="text cleaning: hf = transformers 4.x CLIPTokenizer (default), openai = open_clip / OpenAI, "
                        "nfc = CLIPTokenizerFast / transformers 5")
    p.set_defaults(run=cmd_tokenize)

    p = sub.add_parser("encode", help="prompts -> hidden states and pooled output (.safetensors)",
                       description="Encode prompts and write `hidden` [B, 77, C] (the selected layer), `pooled` "
                                   "[B, C] and, when the model has a projection, `pooled_projected` [B, P].")
    _add_prompt_args(p)
    p.add_argument("--model", "-m", required=True, help="checkpoint file, diffusers / HF folder, or HF repo id")
    p.add_argument("--out", "-o", required=True, help="output .safetensors file")
    p.add_argument("--layer", type=int, help="Python-style index into the hidden states: 0 = embeddings, -1 = last "
                   "layer (default: the family's SD choice: SD1 -1 + final LN, SD2 23rd layer + final LN, "
                   "SDXL -2 without final LN)")
    _bool_flag(p, "final-norm", "apply the final LayerNorm to the selected layer (default: the family's SD choice)")
    p.add_argument("--encoder", type=int, default=1, help="which encoder of a two-encoder file (SDXL: 1 = CLIP-L, "
                   "2 = bigG; default 1)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--mode", choices=sdclip.tokenizer.MODES, default="hf", help="tokenizer text cleaning (see tokenize)")
    p.set_defaults(run=cmd_encode)

    p = sub.add_parser("info", help="what a checkpoint holds: layout, family, architecture, ignored tensors",
                       description="Load a checkpoint's text encoder(s) and report layout, family, layers, width, "
                                   "heads, activation, dtype, parameter count and the tensors it ignored.")
    p.add_argument("model", metavar="MODEL", help="checkpoint file, diffusers / HF folder, or HF repo id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--max-ignored", type=int, default=12, help="groups of ignored tensors to list (default 12)")
    p.set_defaults(run=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except BadInput as e:
        print(f"sdclip: error: {e}", file=sys.stderr)
        return 2
    except SdclipError as e:
        print(f"sdclip: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # an sdclip bug: say so briefly; SDCLIP_DEBUG=1 shows the traceback
        if os.environ.get("SDCLIP_DEBUG"):
            raise
        print(f"sdclip: internal error: {type(e).__name__}: {e} (set SDCLIP_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``sdclip`` command.  Data goes to stdout, messages to stderr; exit 0 ok, 1 failure, 2 bad input."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Sequence, TypeVar

import sdclip

from . import bundled
from .atomic import atomic_path, write_safetensors, write_text
from .errors import BadInput, SdclipError
from .limits import MAX_PROMPT_CHARS, check_prompt, read_regular

T = TypeVar("T")


class Prompt(str):
    """A prompt read from a file, which remembers where (``file:line``) for error messages."""

    where: str | None = None


def _at(text: str, where: str) -> Prompt:
    prompt = Prompt(text)
    prompt.where = where
    return prompt


def _lines(text: str) -> list[str]:
    """Lines as JSON Lines defines them: split at \\n only (\\r\\n tolerated), so that a prompt may hold U+2028,
    U+2029, U+0085 or a form feed; a final newline ends the last line."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_prompts(
    prompts: Sequence[str], file: str | None, max_chars: int | None = MAX_PROMPT_CHARS, what: str = "prompts"
) -> list[str]:
    """Prompts from arguments, then from ``file`` (.txt: one per line; .jsonl: one JSON string per line), each at
    most ``max_chars`` characters (``--max-prompt-chars``); those from the file are ``Prompt``\\ s that know their
    line."""
    for n, prompt in enumerate(prompts, 1):
        check_prompt(prompt, max_chars, f"prompt {n}")
    out = list(prompts)
    if file is not None:
        path = Path(file)
        try:  # Notepad writes a BOM
            text = sys.stdin.read() if file == "-" else read_regular(path, "prompt file").decode("utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(f"{file}: cannot read {what} ({e})") from None
        if not text:
            raise BadInput(f"{file}: the file is empty: no {what} in it")
        for n, line in enumerate(_lines(text), 1):
            if path.suffix != ".jsonl":
                out.append(_at(line, f"{file}:{n}"))
                continue
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as e:
                raise BadInput(f"{file}:{n}: not a JSON string ({e})") from None
            if not isinstance(value, str):
                raise BadInput(f"{file}:{n}: expected a JSON string, got {type(value).__name__}")
            out.append(_at(value, f"{file}:{n}"))
        if len(out) == len(prompts):
            raise BadInput(f"{file}: no {what} in it (only blank lines)")
        for prompt in out[len(prompts) :]:
            check_prompt(prompt, max_chars, prompt.where)
    if not out:
        raise BadInput(f"no {what}: give them as arguments or with --file")
    return out


def _located(error: BadInput, attempts: Sequence[tuple[str, object]]) -> BadInput:
    """``error`` prefixed with the file and line of the prompt that caused it, found by trying each prompt read
    from a file on its own (``attempts``: (prompt, a call that raises its error)); else ``error`` itself."""
    for prompt, attempt in attempts:
        where = getattr(prompt, "where", None)
        if where is None:
            continue
        try:
            attempt()  # type: ignore[operator]
        except BadInput as e:
            return BadInput(f"{where}: {e}")
    return error


def _per_prompt(prompts: Sequence[str], work: Callable[[str], T]) -> Iterator[T]:
    """work(prompt) for each prompt in turn; a ``BadInput`` for a prompt read from a file names its file and line."""
    for prompt in prompts:
        try:
            result = work(prompt)
        except BadInput as e:
            where = getattr(prompt, "where", None)
            if where is None:
                raise
            raise BadInput(f"{where}: {e}") from None
        yield result


def _add_prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts (or use --file)")
    p.add_argument(
        "--file",
        "-f",
        help="prompts from a file: .txt one per line, .jsonl one JSON string per line "
        "(a prompt may then hold newlines); - = stdin, one per line",
    )
    p.add_argument(
        "--max-prompt-chars",
        type=_limit,
        default=MAX_PROMPT_CHARS,
        metavar="N",
        help=f"refuse prompts longer than N characters (default {MAX_PROMPT_CHARS:,}; 0 = no limit)",
    )


def _limit(text: str) -> int | None:
    """``--max-prompt-chars``: a whole number of characters, 0 for no limit."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or more, got {value}")
    return value or None


def cmd_tokenize(args: argparse.Namespace) -> None:
    if args.chunks or args.dialect is not None:
        return _print_chunks(args)
    if args.model:
        tokenizer = sdclip.load(args.model, tokenizer_mode=args.mode).tokenizers[0]
    else:
        tokenizer = sdclip.Tokenizer(mode=args.mode)
    for ids in _per_prompt(read_prompts(args.prompts, args.file, args.max_prompt_chars), tokenizer.encode):
        print(json.dumps(ids))


def _check_device(name: str) -> None:
    """A misspelt device is bad input; a real one this machine lacks is a failure."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise BadInput(f"unknown device {name!r}; use cpu, cuda, cuda:1, mps, ...") from None
    if device.type == "meta":
        raise BadInput(
            f"device {name!r} holds no data (torch's meta device only tracks shapes); use cpu, cuda, cuda:1, mps, ..."
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SdclipError(f"device {name!r} asked for, but torch sees no CUDA GPU here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SdclipError(f"device {name!r} asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")


def _write_tensors(path: str, tensors: dict, metadata: dict[str, str]) -> None:
    """Write ``encode``'s output file (torch tensors or numpy arrays) and say what it holds on stderr."""
    tensors = {k: v.contiguous().cpu() if hasattr(v, "cpu") else v for k, v in tensors.items() if v is not None}
    write_safetensors(path, tensors, {**metadata, "sdclip": sdclip.__version__})
    print(f"wrote {path}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in tensors.items()), file=sys.stderr)


def _load_for_encode(args: argparse.Namespace) -> sdclip.TextEncoder:
    return sdclip.load(
        args.model,
        dtype=args.dtype,
        device=args.device,
        tokenizer_mode=args.mode,
        quantize=args.quantize,
        backend=args.backend,
    )


def cmd_encode(args: argparse.Namespace) -> None:
    prompts = read_prompts(args.prompts, args.file, args.max_prompt_chars)
    if Path(args.out).is_dir():
        raise BadInput(f"{args.out}: --out is a folder; give a file name such as out.safetensors")
    if _encode_from_cache(args, prompts):
        return
    _check_device(args.device)
    if args.dialect is not None or _conditioning_options(args):
        return _encode_conditioning(args, prompts)
    te = _load_for_encode(args)
    out = te.encode(prompts, encoder=args.encoder, layer=args.layer, final_norm=args.final_norm)
    usage = te.usages[args.encoder - 1]
    _write_encoded(
        args,
        prompts,
        {"hidden": out.hidden, "pooled": out.pooled, "pooled_projected": out.pooled_projected},
        te.family,
        usage.layer if args.layer is None else args.layer,
        usage.final_norm if args.final_norm is None else args.final_norm,
    )


def _encode_from_cache(args: argparse.Namespace, prompts: list[str]) -> bool:
    """``--backend onnxruntime`` on a checkpoint file whose graph an earlier run cached: the torch-free path
    (``sdclip.faststart``, bit-identical output).  False: not covered, take the normal path."""
    if (
        args.backend != "onnxruntime"
        or args.model is None
        or args.device != "cpu"
        or args.dtype != "float32"
        or args.quantize is not None
        or args.dialect is not None
        or _conditioning_options(args)
    ):
        return False
    from .faststart import encode

    out = encode(
        args.model,
        prompts,
        encoder=args.encoder,
        layer=args.layer,
        final_norm=args.final_norm,
        tokenizer_mode=args.mode,
    )
    if out is None:
        return False
    _write_encoded(args, prompts, {"hidden": out.hidden, "pooled": out.pooled}, out.family, out.layer, out.final_norm)
    return True


def _write_encoded(
    args: argparse.Namespace, prompts: list[str], tensors: dict, family: str, layer: int, final_norm: bool
) -> None:
    _write_tensors(
        args.out,
        tensors,
        {
            "model": str(args.model or bundled.DEFAULT),
            "family": family,
            "encoder": str(args.encoder),
            "layer": str(layer),
            "final_norm": str(final_norm),
            "quantize": str(args.quantize),
            "prompts": json.dumps(prompts),
        },
    )


# --- encode --dialect: conditioning as a front end computes it ------------------------------------


def _conditioning_options(args: argparse.Namespace) -> list[str]:
    """The conditioning options given (they need --dialect)."""
    from .prompts import REGISTRY

    given = {
        "--negative": args.negative,
        "--negative-file": args.negative_file,
        "--embeddings": args.embeddings,
        "--clip-skip": args.clip_skip,
    }
    # a front end's options without a default are given only when set
    given.update(
        (o.flag, o.given(args))
        for d in REGISTRY.values()
        for o in d.options
        if "default" not in o.argparse and o.stage == "encode"
    )
    return [name for name, value in given.items() if value is not None]


def _encode_conditioning(args: argparse.Namespace, prompts: list[str]) -> None:
    """``encode --dialect``: hidden / pooled and negative_hidden / negative_pooled as the front end builds them."""
    import warnings

    if args.dialect is None:
        raise BadInput(f"{', '.join(_conditioning_options(args))} need --dialect (diffusers for plain prompts)")
    if args.layer is not None or args.final_norm is not None or args.encoder != 1:
        raise BadInput(
            "--layer, --final-norm and --encoder select raw hidden states; with --dialect the front end "
            "decides (use --clip-skip)"
        )
    if args.negative is not None and args.negative_file is not None:
        raise BadInput("give --negative or --negative-file, not both")
    negative = (
        read_prompts([], args.negative_file, args.max_prompt_chars, "negative prompts")
        if args.negative_file is not None
        else args.negative
    )
    if isinstance(negative, list) and len(negative) != len(prompts):
        raise BadInput(
            f"{args.negative_file}: {len(negative)} negative prompts for {len(prompts)} prompts "
            f"(one per line, one per prompt)"
        )
    te = _load_for_encode(args)
    options = dict(
        clip_skip=args.clip_skip,
        embeddings=args.embeddings,
        max_prompt_chars=args.max_prompt_chars,
        **_dialect_options(args, "encode"),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.embeddings is not None:
            options["embeddings"] = sdclip.load_embeddings(args.embeddings, strict=args.strict_embeddings)
        try:
            cond = sdclip.encode_prompts(te, prompts, negative, dialect=args.dialect, **options)
        except BadInput as e:

            def alone(prompt: str, negative: bool) -> Callable[[], object]:
                return lambda: sdclip.encode_prompts(
                    te, "" if negative else prompt, prompt if negative else None, dialect=args.dialect, **options
                )

            raise _located(
                e,
                [(p, alone(p, False)) for p in prompts]
                + [(n, alone(n, True)) for n in (negative if isinstance(negative, list) else [])],
            ) from None
    for message in dict.fromkeys(str(w.message) for w in caught):
        print(f"sdclip: warning: {message}", file=sys.stderr)
    _write_tensors(
        args.out,
        {
            "hidden": cond.hidden,
            "pooled": cond.pooled,
            "negative_hidden": cond.negative_hidden,
            "negative_pooled": cond.negative_pooled,
        },
        {
            "model": str(args.model or bundled.DEFAULT),
            "family": te.family,
            "dialect": args.dialect,
            "clip_skip": str(args.clip_skip),
            "emphasis": options["emphasis"],
            "quantize": str(args.quantize),
            "prompts": json.dumps(prompts),
            "negative": json.dumps(negative),
        },
    )


def _add_conditioning_args(p: argparse.ArgumentParser) -> None:
    _add_dialect_args(p, None)
    p.add_argument(
        "--negative",
        "-n",
        help="--dialect: one negative prompt for every prompt (default: none, which "
        "is the empty prompt, or zeros where the front end uses zeros: A1111 and diffusers SDXL)",
    )
    p.add_argument(
        "--negative-file",
        help="--dialect: negative prompts, one per line (.jsonl: one JSON string per line), one per prompt",
    )
    naming = _by_rule(
        lambda d: "by token" if d.embeddings_by_token else "prompts name them by file name", lambda d: d.title
    )
    p.add_argument(
        "--embeddings",
        help="--dialect: textual-inversion file or folder (.pt .bin .safetensors "
        ".png .webp); " + ", ".join(f"{who} {rule}" for rule, who in sorted(naming.items(), reverse=True)),
    )
    p.add_argument(
        "--strict-embeddings",
        action="store_true",
        help="--dialect: a file in the --embeddings folder "
        "that cannot be read is an error (exit 2); by default it is skipped with a warning, as A1111 "
        "and ComfyUI skip it",
    )
    skips = _by_rule(lambda d: d.clip_skip_help, lambda d: d.name)
    p.add_argument(
        "--clip-skip",
        type=int,
        help="--dialect: the front end's clip skip (" + "; ".join(f"{who} {rule}" for rule, who in skips.items()) + ")",
    )
    _add_dialect_options(p, ("encode", "chunk"), "--dialect ")


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
        print(
            f"  layers {e['layers']}, width {e['width']}, heads {e['heads']}, mlp {e['mlp_width']}, "
            f"activation {e['activation']}, projection {e['projection_dim'] or 'none'}, pad id {e['pad_id']}"
        )
        print(
            f"  dtype {e['dtype']}, {e['parameters']:,} parameters; SD default: layer {e['default_layer']}"
            f"{' + final LN' if e['default_final_norm'] else ', no final LN'}"
        )
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
    else:
        print("ignored: none")


# --- prompt dialects: parse, tokenize --chunks, tokens ---------------------------------------------


def _dialect_tokenizer(args: argparse.Namespace):
    """The tokenizer and pad id to chunk with: --model's first encoder, or the bundled vocabulary."""
    if args.model:
        te = sdclip.load(args.model, tokenizer_mode=args.mode)
        tokenizer, pad_id = te.tokenizers[0], te.towers[0].config.pad_id
    else:
        tokenizer, pad_id = sdclip.Tokenizer(mode=args.mode), None
    if args.pad_id is not None and not 0 <= args.pad_id < tokenizer.vocab_size:
        raise BadInput(
            f"--pad-id {args.pad_id} is not a token id (0 to {tokenizer.vocab_size - 1}; 0 for SD2 and "
            f"SDXL's bigG, EOS for CLIP-L)"
        )
    return tokenizer, pad_id if args.pad_id is None else args.pad_id


def _chunk_all(args: argparse.Namespace):
    """(prompt tree of chunks, tokenizer) for every prompt, with the dialect's options."""
    from .prompts import chunk

    tokenizer, pad_id = _dialect_tokenizer(args)
    dialect = args.dialect or "diffusers"
    options = {"pad_id": pad_id, "max_prompt_chars": args.max_prompt_chars, **_dialect_options(args, "chunk", dialect)}
    for node in _per_prompt(
        read_prompts(args.prompts, args.file, args.max_prompt_chars),
        lambda prompt: chunk(prompt, dialect, tokenizer, **options),
    ):
        yield node, tokenizer


def _print_chunks(args: argparse.Namespace) -> None:
    from .prompts.render import to_json

    for node, _ in _chunk_all(args):
        print(json.dumps(to_json(node)))


def cmd_tokens(args: argparse.Namespace) -> None:
    from .prompts.render import describe

    for n, (node, tokenizer) in enumerate(_chunk_all(args)):
        print(("\n" if n else "") + describe(node, tokenizer))


def cmd_parse(args: argparse.Namespace) -> None:
    from .prompts import parse
    from .prompts.render import describe_segments, to_json

    options = _dialect_options(args, "parse", args.dialect)
    prompts = read_prompts(args.prompts, args.file, args.max_prompt_chars)
    for n, node in enumerate(
        _per_prompt(
            prompts, lambda prompt: parse(prompt, args.dialect, max_prompt_chars=args.max_prompt_chars, **options)
        )
    ):
        print(json.dumps(to_json(node)) if args.json else ("\n" if n else "") + describe_segments(node))


def _by_rule(rule, label) -> dict[str, str]:
    """The front ends grouped by one of their rules: rule -> "a / b" (their labels, in registry order)."""
    from .prompts import REGISTRY

    groups: dict[str, list[str]] = {}
    for d in REGISTRY.values():
        groups.setdefault(rule(d), []).append(label(d))
    return {r: " / ".join(names) for r, names in groups.items()}


_STAGES = {"parse": ("parse",), "chunk": ("parse", "chunk"), "encode": ("parse", "chunk", "encode")}


def _dialect_options(args: argparse.Namespace, command: str, dialect: str | None = None) -> dict:
    """The front-end options a ``command`` ("parse", "chunk" or "encode") passes on: ``dialect``'s, or with
    ``None`` every front end's (``Conditioner`` takes them all)."""
    from .prompts import REGISTRY, get

    dialects = REGISTRY.values() if dialect is None else [get(dialect)]
    return {o.name: o.read(args) for d in dialects for o in d.options if o.stage in _STAGES[command]}


def _add_dialect_options(p: argparse.ArgumentParser, stages: tuple[str, ...], prefix: str = "") -> None:
    """Each front end's command-line options of these stages, its help prefixed with the front end's name."""
    from .prompts import REGISTRY

    for d in REGISTRY.values():
        for o in d.options:
            if o.stage in stages:
                p.add_argument(o.flag, help=f"{prefix}{d.name}: {o.help}", **o.argparse)


def _add_dialect_args(p: argparse.ArgumentParser, default: str | None) -> None:
    from .prompts import REGISTRY

    names = [d.name + "".join(f" (= {a})" for a in d.aliases) for d in REGISTRY.values()]
    p.add_argument(
        "--dialect",
        "-d",
        choices=[*REGISTRY, *(a for d in REGISTRY.values() for a in d.aliases)],
        default=default,
        help=f"whose prompt syntax and chunking: {', '.join(names[:-1])} or {names[-1]}"
        + (f" (default {default})" if default else ""),
    )
    _add_dialect_options(p, ("parse",))


def _add_chunk_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pad-id",
        type=int,
        help="pad id after EOS: 0 for SD2 and SDXL's bigG (default: EOS, as CLIP-L; with --model, that model's)",
    )
    _add_dialect_options(p, ("chunk",))


def _add_prompt_commands(sub) -> None:
    p = sub.add_parser(
        "parse",
        help="prompt -> weighted segments, as a front end reads it",
        description="Print each prompt's weighted segments as DIALECT parses it (a readable list, or "
        "with --json one JSON value per prompt: [[text, weight], ...]; A1111's BREAK is "
        '["BREAK", -1]; compel blends and ANDs are {"blend"|"and": [...], '
        '"weights": [...]}; '
        'A1111 AND / prompt editing is {"steps": n, "schedule": [{"until_step": t, '
        '"prompt": {"and": ...}}]}).',
    )
    _add_prompt_args(p)
    _add_dialect_args(p, "diffusers")
    p.add_argument("--json", action="store_true", help="one JSON value per prompt per line")
    p.set_defaults(run=cmd_parse)

    p = sub.add_parser(
        "tokens",
        help="show a prompt's tokens, weights and chunks as a front end builds them",
        description="For each prompt: every token with its weight (when not 1), the 77-token chunk "
        "boundaries, tokens lost to truncation and the token count; AND parts, blends "
        "and prompt-editing steps in sections.  Plain text.",
    )
    _add_prompt_args(p)
    _add_dialect_args(p, "diffusers")
    _add_chunk_args(p)
    p.add_argument("--model", "-m", help="use this checkpoint's tokenizer and pad id (default: the bundled vocabulary)")
    p.add_argument(
        "--mode", choices=sdclip.tokenizer.MODES, default="hf", help="tokenizer text cleaning (see tokenize)"
    )
    p.set_defaults(run=cmd_tokens)


# --- contrastive CLIP: zero-shot, similarity, training ------------------------------------------


def _clip_model(name: str | None):
    """--model, or the bundled sdclip-mini when it is not given."""
    from .clip import CLIPModel

    return CLIPModel.load(name)


def _table(rows: list[str], columns: list[str], values, digits: int) -> None:
    """Rows x columns of numbers, aligned, on stdout."""
    first = max(len(r) for r in rows)
    widths = [max(len(c), digits + 3) for c in columns]
    print(" " * first + "".join(f"  {c:>{w}}" for c, w in zip(columns, widths)))
    for r, line in zip(rows, values):
        print(f"{r:<{first}}" + "".join(f"  {v:>{w}.{digits}f}" for v, w in zip(line, widths)))


def cmd_zeroshot(args: argparse.Namespace) -> None:
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if len(labels) < 2:
        raise BadInput("--labels needs at least two comma-separated labels, e.g. --labels cat,dog")
    model = _clip_model(args.model)
    probs = model.zero_shot(args.images, labels, args.template or ("a photo of a {}.",)).tolist()
    if args.json:
        for image, row in zip(args.images, probs):
            print(json.dumps({"image": image, "probs": dict(zip(labels, row))}))
    else:
        _table(args.images, labels, probs, 3)


def cmd_similarity(args: argparse.Namespace) -> None:
    model = _clip_model(args.model)
    sims = model.similarity(args.image, args.text).tolist()
    if args.json:
        for image, row in zip(args.image, sims):
            print(json.dumps({"image": image, "similarity": dict(zip(args.text, row))}))
    else:
        _table(args.image, args.text, sims, 4)


def cmd_train_clip(args: argparse.Namespace) -> None:
    from .train import TrainConfig, train

    _run_threads(args)
    config = TrainConfig(**{f: getattr(args, f) for f in TrainConfig.__dataclass_fields__})
    if _resumes(args):
        print(f"resuming {args.out} with the settings it was started with", file=sys.stderr)
    train(config, args.out, resume=args.resume, until=args.until)
    if args.until is None or args.until >= config.steps:
        print(
            f"wrote {args.out}: model.safetensors (+ config and tokenizer), metrics.jsonl, training.png",
            file=sys.stderr,
        )


def cmd_shapes(args: argparse.Namespace) -> None:
    from .shapes import HELD_OUT, TRAIN_SHAPES, Shapes, labels

    if not 1 <= args.n <= 100_000:
        raise BadInput(f"--n must be 1 to 100000, got {args.n}")
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()] if args.shapes else list(TRAIN_SHAPES)
    exclude = frozenset(labels(shapes)) - HELD_OUT if args.held_out else HELD_OUT
    data = Shapes(size=args.size, seed=args.seed, length=args.n, shapes=shapes, exclude=exclude, pair_p=args.pairs)
    out = Path(args.out)
    for i in range(args.n):
        image, caption = data[i]
        with atomic_path(out / f"{i:05d}.png") as tmp:
            image.save(tmp, format="PNG")
        write_text(out / f"{i:05d}.txt", caption + "\n")
        print(f"{out / f'{i:05d}.png'}\t{caption}")


_TRAIN_HELP = {
    "data": "'shapes' (built-in generator), a folder of image + .txt pairs, or a webdataset .tar",
    "eval_every": "zero-shot accuracy on seen / held-out shapes every N steps (0: never; shapes data only)",
    "embed_dim": "width of the shared embedding space",
    "save_dtype": "dtype of the saved model (float16 halves it)",
    "patch_init": "'whiten': start the patch embedding as a PCA whitening of the data's patches (learns shape "
    "far sooner); 'clip': CLIP's random init",
    "partial_captions": "shapes data: share of one-object captions that name only the shape ('a circle') or only "
    "the colour ('a red shape'), so that each word is learned on its own",
    "ema": "keep an exponential moving average of the weights with this decay per step (e.g. 0.998) and "
    "evaluate and save it instead of the last weights (0: off)",
    "bootstrap_steps": "shapes data: for the first N steps freeze the text tower at its random init and caption "
    "pictures by shape alone ('a circle'), so that the image tower learns shape before the text "
    "tower can learn to ignore it (0: no bootstrap)",
}


def _resumes(args: argparse.Namespace) -> bool:
    """--resume of a run that has a checkpoint (one without starts over)."""
    from .runs import CHECKPOINT

    return args.resume and (Path(args.out) / CHECKPOINT).is_file()


def _run_threads(args: argparse.Namespace) -> None:
    """torch's thread count for a training command: --threads, else on --resume the run's own (results depend on
    it: a resumed run is then bit-identical to one never stopped)."""
    import torch

    from .runs import saved_threads

    threads = args.threads or (saved_threads(args.out) if args.resume else None)
    if threads:
        torch.set_num_threads(threads)


def _finite_float(text: str) -> float:
    """A float option: a finite number (nan and inf are refused before a run can begin)."""
    value = float(text)  # a ValueError is argparse's "invalid _finite_float value"
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _add_run_options(
    p: argparse.ArgumentParser, config: type, helps: dict[str, str], skip: tuple[str, ...] = ()
) -> None:
    """A training command's options: one per field of its config dataclass (``--field-name``, typed and
    defaulted as the field), and --resume, --until, --threads."""
    for field in fields(config):
        if field.name not in skip:
            kind = _finite_float if isinstance(field.default, float) else type(field.default)
            p.add_argument(
                "--" + field.name.replace("_", "-"),
                dest=field.name,
                type=kind,
                default=field.default,
                help=f"{helps.get(field.name, '')} (default {field.default})".strip(),
            )
    p.add_argument("--resume", action="store_true", help="continue the run in --out with its saved settings")
    p.add_argument("--until", type=int, help="stop after this step (with a checkpoint); --resume continues")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's choice; --resume: the run's, saved in its checkpoint)",
    )


def _add_clip_commands(sub) -> None:
    p = sub.add_parser(
        "zeroshot",
        help="images -> probability of each label (a contrastive CLIP model)",
        description="Zero-shot classification: each label is written into the templates, the "
        "normalized text embeddings are averaged per label, and each image's "
        "probabilities over the labels are printed (a table, or JSON lines).",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--labels", required=True, help="comma-separated labels, e.g. 'red circle,blue square'")
    p.add_argument("--model", "-m", help="CLIP folder, file or hub id (default: the bundled model)")
    p.add_argument(
        "--template",
        action="append",
        help="prompt template with {} for the label; repeat to average several (default 'a photo of a {}.')",
    )
    p.add_argument("--json", action="store_true", help='one {"image": path, "probs": {label: p}} per line')
    p.set_defaults(run=cmd_zeroshot)

    p = sub.add_parser(
        "similarity",
        help="cosine similarity of images and texts (a contrastive CLIP model)",
        description="Print the cosine similarity of every image with every text.",
    )
    p.add_argument("--model", "-m", help="CLIP folder, file or hub id (default: the bundled model)")
    p.add_argument("--text", "-t", nargs="+", required=True)
    p.add_argument("--image", "-i", nargs="+", required=True)
    p.add_argument("--json", action="store_true", help='one {"image": path, "similarity": {text: s}} per line')
    p.set_defaults(run=cmd_similarity)

    from .runconfig import TrainConfig

    p = sub.add_parser(
        "train-clip",
        help="train a small contrastive CLIP (CPU-sized) on shapes, a folder or a tar",
        description="Train text and image towers from scratch with the contrastive loss (AdamW, "
        "warmup + cosine, gradient clipping).  --out receives a Hugging Face CLIPModel "
        "folder (loadable by sdclip and transformers), checkpoint.pt, metrics.jsonl "
        "and training.png.",
    )
    p.add_argument("--out", "-o", required=True, help="run folder")
    _add_run_options(p, TrainConfig, _TRAIN_HELP)
    p.set_defaults(run=cmd_train_clip)

    p = sub.add_parser(
        "shapes",
        help="write pictures of coloured shapes with captions (the built-in training data)",
        description="Write N seeded pictures from the generator train-clip's 'shapes' data uses, as "
        "NNNNN.png + NNNNN.txt (a folder train-clip also reads), and print 'path<TAB>"
        "caption' per picture.  By default single objects in the training colour x shape "
        "pairs; --held-out draws only the pairs training never shows.",
    )
    p.add_argument("--out", "-o", required=True, help="folder to write into")
    p.add_argument("--n", type=int, default=8, help="how many pictures (default 8)")
    p.add_argument("--seed", type=int, default=0, help="picture i of a seed is always the same (default 0)")
    p.add_argument("--size", type=int, default=64, help="pixels per side (default 64)")
    p.add_argument(
        "--pairs", type=_finite_float, default=0.0, help="share of two-object pictures (default 0; training: 0.3)"
    )
    p.add_argument(
        "--shapes",
        help="comma-separated shapes (default: the six training shapes; heart and crescent are never trained on)",
    )
    p.add_argument("--held-out", action="store_true", help="only the held-out colour x shape pairs")
    p.set_defaults(run=cmd_shapes)


# --- textual inversion: ti train / convert / inspect -------------------------------------------------

_TI_SUFFIX = {"a1111": ".pt", "safetensors": ".safetensors", "diffusers": ".safetensors"}
_TI_HELP = {
    "vectors": "prompt positions the word takes",
    "init_word": "start from this word's token embeddings",
    "contrast": "weight of the cross-entropy against --negatives (0: cosine only)",
    "batch_size": "templates per step",
    "checkpoint_every": "write checkpoint.pt every N steps",
}


def _image_paths(items: Sequence[str]) -> list[Path]:
    """Image files from file and folder arguments (a folder: its images, sorted)."""
    from .data import IMAGE_SUFFIXES

    out: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise BadInput(f"{path}: a folder without images ({', '.join(IMAGE_SUFFIXES)})")
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise BadInput(f"{path}: no such image file or folder")
    return out


def cmd_ti_train(args: argparse.Namespace) -> None:
    from .clip import check_templates
    from .embeddings import save_embedding
    from .inversion import InversionConfig, train_embedding
    from .runs import load_checkpoint

    _run_threads(args)
    settings = {
        f: getattr(args, f) for f in InversionConfig.__dataclass_fields__ if f not in ("templates", "negatives")
    }
    if args.template:
        check_templates(args.template)
        settings["templates"] = tuple(args.template)
    settings["negatives"] = tuple(n.strip() for n in (args.negatives or "").split(",") if n.strip())
    if _resumes(args):
        print(f"resuming {args.out} with the settings it was started with", file=sys.stderr)
    elif args.token is None:
        raise BadInput("--token is required: the new word as prompts will write it, e.g. --token '<my-thing>'")
    model = _clip_model(args.model)
    embedding = train_embedding(
        model, _image_paths(args.images), out=args.out, resume=args.resume, until=args.until, **settings
    )  # a resumed run uses its saved settings
    state = load_checkpoint(args.out)
    step = int(state["step"])
    if step < state["config"]["steps"]:
        print(f"stopped at step {step}; --resume continues", file=sys.stderr)
        return
    path = Path(args.out) / (
        "learned_embeds.safetensors" if args.format == "diffusers" else embedding.name + _TI_SUFFIX[args.format]
    )
    save_embedding(embedding, path, args.format, step=step, checkpoint=str(args.model or bundled.DEFAULT))
    diffusers = f"diffusers / compel {embedding.token}" + (
        f" (load_textual_inversion(..., token={embedding.token!r}))" if args.format == "safetensors" else ""
    )
    print(
        f"wrote {path} ({embedding.count} x {next(iter(embedding.vectors.values())).shape[1]}; A1111 / ComfyUI "
        f"prompts call it {embedding.name}, {diffusers}), checkpoint.pt, metrics.jsonl, loss.png",
        file=sys.stderr,
    )


def cmd_ti_convert(args: argparse.Namespace) -> None:
    from .embeddings import Embedding, format_for, read_embedding, save_embedding

    e = read_embedding(args.input)
    out = Path(args.output)
    fmt = args.format or format_for(out)
    # a kohya / A1111 safetensors file's only key is emb_params: such a file is called by its name
    token = args.token or (e.name if e.token == "emb_params" else e.token)
    save_embedding(Embedding(out.name[: -len(out.suffix)] if out.suffix else out.name, token, e.vectors), out, fmt)
    print(
        f"wrote {out} ({fmt}: {e.count} vector{'s' if e.count > 1 else ''} of width {e.describe_widths()}, "
        f"token {token})",
        file=sys.stderr,
    )


def cmd_ti_inspect(args: argparse.Namespace) -> None:
    from .embeddings import read_embedding
    from .inversion import nearest_tokens

    e = read_embedding(args.file)
    print(f"file:    {args.file}")
    print(f"name:    {e.name} (how A1111 / ComfyUI prompts call it); token: {e.token} (diffusers / compel)")
    print(
        "vectors: "
        + ", ".join(f"{'' if role == '*' else role + ' '}{v.shape[0]} x {v.shape[1]}" for role, v in e.vectors.items())
    )
    try:
        te = sdclip.load(args.model)
    except SdclipError as err:
        if args.model is not None or isinstance(err, BadInput):
            raise
        print(f"model:   none ({err}); --model gives the text encoder to compare with")
        return
    label = args.model or bundled.DEFAULT
    fits = [(n, tower, e.for_encoder(tower.config.width)) for n, tower in enumerate(te.towers, 1)]
    fits = [(n, tower, v) for n, tower, v in fits if v is not None]
    if not fits:
        from .families import architecture

        needed = "; ".join(f"{v.shape[1]}: {architecture(v.shape[1]).description}" for v in e.vectors.values())
        message = (
            f"{label}'s text encoder{'s take' if len(te.towers) > 1 else ' takes'} width "
            f"{' + '.join(str(t.config.width) for t in te.towers)}: the vectors do not fit; they need {needed}"
        )
        if args.model is not None:
            raise BadInput(f"{args.file}: {message}")
        print(f"model:   {message} (give it with --model for the nearest tokens)")
        return
    for n, tower, vectors in fits:
        typical = tower.token_embedding.weight.detach().float().norm(dim=-1).median().item()
        print(
            f"model:   {label}, encoder {n} ({tower.config.architecture}, width {tower.config.width}): fits; its "
            f"token embeddings have norm {typical:.3f} (median)"
        )
        for start in range(0, len(vectors), 256):  # block by block: [n, vocab] similarities at once are GBs
            block = vectors[start : start + 256]
            for i, (v, near) in enumerate(
                zip(block, nearest_tokens(block, tower, te.tokenizers[n - 1], args.top)), start
            ):
                words = "  ".join(f"{text} {score:.2f}" for text, score in near)
                print(f"  {i}: norm {v.norm().item():.3f}  nearest: {words}")


def _add_ti_commands(sub) -> None:
    from .runconfig import FORMATS, InversionConfig

    ti = sub.add_parser(
        "ti",
        help="textual inversion: learn a new word for a frozen encoder; inspect and convert embedding files",
        description="Textual inversion.  train: learn vectors for a new word from example images "
        "(CLIP objective: a full CLIP model); convert: between A1111 .pt, safetensors "
        "(emb_params; SDXL clip_l + clip_g) and diffusers learned_embeds; inspect: "
        "vector count, width, norms and nearest vocabulary tokens.",
    )
    group = ti.add_subparsers(dest="ti_command", required=True, metavar="ACTION")

    p = group.add_parser(
        "train",
        help="learn a new word from example images (every encoder weight frozen)",
        description="Learn --vectors vectors for --token so that caption templates holding it "
        "match the example images in a CLIP model's embedding space (loss: 1 - mean "
        "cosine, plus --contrast x the cross-entropy of classifying the images among "
        "the word and --negatives).  AdamW on the new vectors only.  --out receives "
        "the embedding (NAME.safetensors, NAME.pt or learned_embeds.safetensors), "
        "checkpoint.pt, metrics.jsonl and loss.png.  A U-Net objective: the Python "
        "API, sdclip.train_embedding(..., loss_fn=...).",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="example images, or folders of them (a few suffice)")
    p.add_argument("--model", "-m", help="full CLIP model: folder, file or hub id (default: the bundled model)")
    p.add_argument("--out", "-o", required=True, help="run folder")
    p.add_argument("--token", help="the new word as prompts write it, e.g. '<my-thing>' (file name: without <>)")
    _add_run_options(p, InversionConfig, _TI_HELP, skip=("token", "templates", "negatives"))
    p.add_argument(
        "--template",
        action="append",
        help="caption template with {} for the word; repeat for several "
        "(default: ten photo / rendering / drawing templates)",
    )
    p.add_argument(
        "--negatives",
        help="comma-separated names the word must stay apart from (e.g. the classes it will be told apart from)",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="safetensors",
        help="embedding file written (default safetensors: emb_params)",
    )
    p.set_defaults(run=cmd_ti_train)

    p = group.add_parser(
        "convert",
        help="rewrite an embedding file in another format",
        description="Read any embedding file sdclip reads (.pt .bin .safetensors, A1111 PNG/WebP) "
        "and write it as A1111 .pt, safetensors (emb_params; SDXL clip_l + clip_g) or "
        "diffusers learned_embeds ({token: [n, C]}).",
    )
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT", help="file to write; its name gives the A1111 / ComfyUI name")
    p.add_argument(
        "--format",
        choices=FORMATS,
        help="default: from OUT's name (learned_embeds.* diffusers, .safetensors safetensors, .pt / .bin a1111)",
    )
    p.add_argument("--token", help="the token diffusers / compel prompts use (default: the file's)")
    p.set_defaults(run=cmd_ti_convert)

    p = group.add_parser(
        "inspect",
        help="vector count, width, norms and nearest vocabulary tokens of an embedding",
        description="Print an embedding file's names, vector count and width, and, against a "
        "text encoder of that width, whether it fits, each vector's norm beside the "
        "encoder's typical token norm, and the vocabulary tokens nearest each vector "
        "(cosine with the token embeddings).",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument(
        "--model",
        "-m",
        help="checkpoint, folder or hub id whose text encoder to compare with (default: "
        "the bundled model, when the width fits)",
    )
    p.add_argument("--top", type=int, default=5, help="nearest tokens per vector (default 5)")
    p.set_defaults(run=cmd_ti_inspect)


class _Parser(argparse.ArgumentParser):
    """argparse with sdclip's error style: one line on stderr, exit 2 (its usage block is in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --- serve: the HTTP server (sdclip[serve]; imported only when run) ---------------------------------------


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        from .serve import Limits, ServeConfig, serve
    except ImportError as e:
        raise SdclipError(f"sdclip serve needs FastAPI and uvicorn: pip install 'sdclip[serve]' ({e})") from None
    models: dict[str, str] = {}
    for item in args.model or [bundled.DEFAULT]:
        name, sep, source = item.partition("=")
        name, source = (name, source) if sep else (Path(item).stem if Path(item).suffix else item, item)
        if not name or not source or name in models:
            raise BadInput(f"--model {item!r}: give NAME=CHECKPOINT with a NAME used once")
        models[name] = source
    token = None
    if args.token_file is not None:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(f"--token-file {args.token_file}: cannot read it ({e})") from None
        if not token:
            raise BadInput(f"--token-file {args.token_file}: the file is empty")
    limits = Limits(
        max_prompts=args.max_prompts,
        max_chars=args.max_chars,
        max_tokens=args.max_tokens,
        max_body_bytes=args.max_body_bytes,
    )
    serve(
        ServeConfig(
            models=models,
            embeddings=args.embeddings,
            dtype=args.dtype,
            device=args.device,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            queue_size=args.queue_size,
            limits=limits,
            token=token,
            cors=args.cors or [],
            threads=args.threads,
            pin_cores=args.pin_cores,
        ),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
    )


def _add_serve_command(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="an HTTP server: conditioning, embeddings, tokenization, a prompt inspector",
        description="Serve /v1/encode (encode_prompts as safetensors or JSON), /v1/embeddings "
        "(OpenAI-compatible), /v1/tokenize, /v1/compare, /healthz, /readyz, /metrics, "
        "/docs and the prompt inspector at /.  Needs sdclip[serve].  SIGTERM lets the "
        "requests in flight finish, then exits 0.",
    )
    p.add_argument(
        "--model",
        "-m",
        action="append",
        metavar="[NAME=]MODEL",
        help="a checkpoint to serve, "
        "optionally named (repeat for several; the first is the default; default: sdclip-mini)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--embeddings", help="textual-inversion file or folder; requests use them by name")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model weights")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--max-batch", type=int, default=256, help="prompts per micro-batch (default 256)")
    p.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests (default 5 ms)"
    )
    p.add_argument("--queue-size", type=int, default=256, help="requests waiting per model before 503 (default 256)")
    p.add_argument("--max-prompts", type=int, default=64, help="prompts per request (default 64)")
    p.add_argument("--max-chars", type=int, default=4000, help="characters per prompt (default 4000)")
    p.add_argument(
        "--max-tokens", type=int, default=600, help="tokens per prompt as its dialect counts them (default 600)"
    )
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body size (default 1 MiB)")
    p.add_argument(
        "--token-file",
        help="require 'Authorization: Bearer TOKEN' with the token in this file "
        "(/healthz, the inspector page and /docs stay open)",
    )
    p.add_argument(
        "--cors",
        action="append",
        metavar="ORIGIN",
        help="allow browser requests from ORIGIN (repeatable; default: no CORS headers)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads per model (default: the cores less one, left to the HTTP side, shared among the models)",
    )
    p.add_argument(
        "--pin-cores",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the HTTP process on the last allowed core and the model processes on the others, so that neither "
        "waits for the other's core (default; Linux with two cores or more)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(run=cmd_serve)


def _bool_flag(p: argparse.ArgumentParser, name: str, help: str) -> None:
    p.add_argument(
        f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction, default=None, help=help
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sdclip",
        description="The CLIP text encoder Stable Diffusion uses: "
        "tokenize prompts, encode them to conditioning, inspect checkpoints.",
        epilog="Data goes to stdout, messages to stderr.  Exit status: 0 ok, 1 failure, 2 bad input "
        "(a missing or broken file, a bad option or prompt file).  `sdclip COMMAND --help` "
        "describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"sdclip {sdclip.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "tokenize",
        help="prompt -> token ids (one JSON list per prompt per line)",
        description="Print one JSON list of token ids per prompt per line: BOS and EOS included, "
        "no padding, no truncation.  With --chunks (or --dialect): one JSON object per "
        "prompt with the 77-token chunks and per-token weights that front end builds.",
    )
    _add_prompt_args(p)
    p.add_argument("--model", "-m", help="use this checkpoint's tokenizer (default: the bundled CLIP vocabulary)")
    p.add_argument(
        "--mode",
        choices=sdclip.tokenizer.MODES,
        default="hf",
        help="text cleaning: hf = transformers 4.x CLIPTokenizer (default), openai = open_clip / OpenAI, "
        "nfc = CLIPTokenizerFast / transformers 5",
    )
    _add_dialect_args(p, None)
    p.add_argument(
        "--chunks",
        action="store_true",
        help='print {"tokens": [[77 ids], ...], "weights": [[77 floats], '
        '...], "token_count": n} per prompt as --dialect builds them (default dialect diffusers; '
        "--dialect implies --chunks)",
    )
    p.add_argument("--json", action="store_true", help="(the output is JSON in any case)")
    _add_chunk_args(p)
    p.set_defaults(run=cmd_tokenize)

    p = sub.add_parser(
        "encode",
        help="prompts -> hidden states and pooled output (.safetensors)",
        description="Encode prompts and write `hidden` [B, 77, C] (the selected layer), `pooled` "
        "[B, C] and, when the model has a projection, `pooled_projected` [B, P] to a "
        ".safetensors file whose metadata records model, family, encoder, layer, "
        "final_norm and the prompts (as JSON).  With --dialect: the conditioning that "
        "front end feeds the U-Net (weights, long prompts, clip skip, embeddings; SDXL: "
        "both encoders, 2048 channels) as `hidden` [B, 77k, C], `pooled` [B, P] (SDXL), "
        "`negative_hidden` and `negative_pooled`.",
    )
    _add_prompt_args(p)
    p.add_argument(
        "--model", "-m", help="checkpoint file, diffusers / HF folder, or HF repo id (default: the bundled sdclip-mini)"
    )
    p.add_argument("--out", "-o", required=True, help="output .safetensors file")
    p.add_argument(
        "--layer",
        type=int,
        help="Python-style index into the hidden states: 0 = embeddings, -1 = last "
        "layer (default: the family's SD choice: SD1 -1 + final LN, SD2 23rd layer + final LN, "
        "SDXL -2 without final LN)",
    )
    _bool_flag(p, "final-norm", "apply the final LayerNorm to the selected layer (default: the family's SD choice)")
    p.add_argument(
        "--encoder",
        type=int,
        default=1,
        help="which encoder of a two-encoder file (SDXL: 1 = CLIP-L, 2 = bigG; default 1)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="weights and outputs (default float32)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--quantize",
        choices=["int8"],
        help="run the Linear layers in int8 on the CPU: 1.6-2.2x "
        "faster, not exact (first block in float; cosine to float32 ~0.9993: the README speed table)",
    )
    p.add_argument(
        "--mode", choices=sdclip.tokenizer.MODES, default="hf", help="tokenizer text cleaning (see tokenize)"
    )
    from .backends import BACKENDS

    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="torch",
        help="engine for the text tower: torch (default), "
        "onnxruntime or openvino (exported once per model into ~/.cache/sdclip or $SDCLIP_CACHE; "
        "pip install 'sdclip[onnx]' / 'sdclip[openvino]'; within 1e-5 of torch)",
    )
    _add_conditioning_args(p)
    p.set_defaults(run=cmd_encode)

    p = sub.add_parser(
        "info",
        help="what a checkpoint holds: layout, family, architecture, ignored tensors",
        description="Load a checkpoint's text encoder(s) and report layout, family, layers, width, "
        "heads, activation, dtype, parameter count and the tensors it ignored.",
    )
    p.add_argument("model", metavar="MODEL", help="checkpoint file, diffusers / HF folder, or HF repo id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--max-ignored", type=int, default=12, help="groups of ignored tensors to list (default 12)")
    p.set_defaults(run=cmd_info)
    _add_prompt_commands(sub)
    _add_clip_commands(sub)
    _add_ti_commands(sub)
    _add_serve_command(sub)
    _add_cache_command(sub)
    return parser


# --- cache: a caption dataset -> cached conditioning (sdclip.cachejob) ----------------------------------


def cmd_cache(args: argparse.Namespace) -> None:
    from . import cachejob

    if args.inputs[0] == "verify" and len(args.inputs) == 2 and args.out is None:
        print(json.dumps(cachejob.verify(args.inputs[1])))
        return
    if args.out is None:
        raise BadInput("--out DIR is required (or: sdclip cache verify DIR)")
    if args.negative is not None or args.negative_file is not None:
        raise BadInput("a cache holds captions' conditioning; --negative / --negative-file do not apply")
    if args.dialect is not None and (args.layer is not None or args.final_norm is not None or args.encoder is not None):
        raise BadInput(
            "--layer, --final-norm and --encoder select raw hidden states; with --dialect the front end "
            "decides (use --clip-skip)"
        )
    _check_device(args.device)
    threads = args.threads or cachejob.saved_threads(args.out)  # a resume encodes with the job's own count
    if threads:
        import torch

        torch.set_num_threads(threads)
    options = cachejob.CacheOptions(
        model=args.model,
        dialect=args.dialect or "diffusers",
        clip_skip=args.clip_skip,
        embeddings=args.embeddings,
        dialect_options=_dialect_options(args, "encode", args.dialect or "diffusers"),
        layer=args.layer,
        final_norm=args.final_norm,
        encoder=args.encoder,
        dtype=args.dtype,
        device=args.device,
        mode=args.mode,
        batch_size=args.batch_size,
        shard_rows=args.shard_rows,
        format=args.format,
        caption_column=args.caption_column,
        id_column=args.id_column,
        max_chars=args.max_chars,
    )
    report = cachejob.run(
        args.inputs,
        args.out,
        options,
        engine=args.engine,
        address=args.address,
        workers=args.workers,
        strict=args.strict,
    )
    print(json.dumps(report))


def _add_cache_command(sub) -> None:
    p = sub.add_parser(
        "cache",
        help="caption dataset -> cached conditioning on disk (resumable; local or Ray)",
        description="Encode every caption of INPUT... (.txt, .jsonl, .csv, .parquet, webdataset .tar, "
        "kohya folders; globs) once and store the conditioning in --out: safetensors "
        "shards, index.parquet, manifest.json, errors.jsonl (format sdclip; read with "
        "sdclip.open_cache), or kohya's SDXL _te_outputs.npz beside each image.  Killed, "
        "the same command resumes.  `sdclip cache verify DIR` checks a finished cache.  "
        "A JSON report goes to stdout, progress to stderr.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="caption files, globs or kohya folders")
    p.add_argument("--model", "-m", help="checkpoint file, folder or hub id (default: the bundled sdclip-mini)")
    p.add_argument("--out", "-o", help="output folder (new, or a cache this same command started)")
    p.add_argument("--layer", type=int, help="raw hidden states of this layer (as encode without --dialect)")
    _bool_flag(p, "final-norm", "raw hidden states: apply the final LayerNorm")
    p.add_argument("--encoder", type=int, help="raw hidden states of this encoder (SDXL: 1 = CLIP-L, 2 = bigG)")
    p.add_argument(
        "--dtype",
        default="float16",
        choices=["float32", "float16", "bfloat16"],
        help="stored dtype (encoding runs in float32; default float16)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--mode", choices=sdclip.tokenizer.MODES, default="hf", help="tokenizer text cleaning (see tokenize)"
    )
    _add_conditioning_args(p)
    p.add_argument("--batch-size", type=int, default=64, help="unique captions per encoder call (default 64)")
    p.add_argument("--shard-rows", type=int, default=4096, help="unique captions per shard (default 4096)")
    p.add_argument(
        "--format",
        choices=["sdclip", "kohya"],
        default="sdclip",
        help="sdclip (default) or kohya (SDXL: <image stem>_te_outputs.npz beside each image)",
    )
    p.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local (default) or ray (Ray Data; pip install 'sdclip[ray]')",
    )
    p.add_argument("--address", help="ray: join this cluster (e.g. auto or HEAD:6379; default: a local Ray)")
    p.add_argument("--workers", type=int, default=1, help="ray: encoder actors, one model each (default 1)")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads per encoder (default: torch's choice; resuming: the job's own, from its manifest)",
    )
    p.add_argument(
        "--caption-column",
        "--caption-key",
        dest="caption_column",
        help=".csv / .parquet column, .jsonl key of the caption (default caption, then text)",
    )
    p.add_argument("--id-column", help=".csv / .parquet column, .jsonl key of the row id (default FILE:N)")
    p.add_argument("--max-chars", type=int, default=20_000, help="a longer caption is a bad row (default 20000)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad row (default: errors.jsonl)")
    p.set_defaults(run=cmd_cache)


def _fail(message: str, code: int) -> int:
    # one line: a message quoting a file or an exception may hold newlines
    print("sdclip: error: " + message.replace("\n", " "), file=sys.stderr)
    return code


# the commands whose results go to stdout (the others write files and only talk on stderr)
_PRINTS_DATA = (cmd_tokenize, cmd_parse, cmd_tokens, cmd_info, cmd_zeroshot, cmd_similarity, cmd_shapes, cmd_ti_inspect)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failure, 2 bad input)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    if args.run in _PRINTS_DATA and (sys.stdout is None or sys.stdout.closed):
        return _fail("standard output is closed: nowhere to write the results", 1)
    try:
        args.run(args)
        if sys.stdout is not None:
            sys.stdout.flush()  # a full disk or a closed pipe shows here, not after the exit status is set
    except BadInput as e:
        return _fail(str(e), 2)
    except SdclipError as e:
        return _fail(str(e), 1)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `sdclip tokenize ... | head`: the reader has all it wanted
        return 0
    except OSError as e:  # readers turn their own OSErrors into BadInput: this is stdout (a full disk, say)
        return _fail(f"{e.filename or 'standard output'}: cannot write ({e.strerror or e})", 1)
    except Exception as e:  # an sdclip bug: say so briefly; SDCLIP_DEBUG=1 shows the traceback
        if os.environ.get("SDCLIP_DEBUG"):
            raise
        return _fail(f"internal error: {type(e).__name__}: {e} (set SDCLIP_DEBUG=1 for the traceback)", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

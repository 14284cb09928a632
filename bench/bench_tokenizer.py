"""Tokenizer throughput: sdclip (modes hf and nfc) against transformers' CLIPTokenizerFast (Rust)
and the slow CLIPTokenizer, on the test corpus (tests/corpus.py: edge cases, long prompts and
generated SD prompts; the headline) and on its generated SD prompts alone (the everyday case).

Each contender turns the whole corpus into id lists with BOS/EOS and no truncation; the fast
tokenizer is called the fast way (one batch call on the list).  "cold" empties the BPE caches
before every repetition (sdclip: ``clear_cache``; Rust: the BPE model's cache; slow: its dict),
"warm" keeps them.  Outputs are checked equal before anything is timed.

    python bench/bench_tokenizer.py [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]

from common import machine, median, paired, write_results  # noqa: E402
from corpus import corpus, generated_prompts  # noqa: E402

from sdclip import tokenizer as tokmod  # noqa: E402
from sdclip.tokenizer import Tokenizer  # noqa: E402


def contenders(texts: list[str], folder: Path) -> dict[str, tuple]:
    """name -> (encode the corpus, empty its caches)."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    out = {}
    for mode in ("hf", "nfc"):
        tok = Tokenizer(mode=mode)
        out[f"sdclip {mode}"] = (lambda tok=tok: [tok.encode(t) for t in texts], tok.clear_cache)
    fast = CLIPTokenizerFast.from_pretrained(folder)
    out["CLIPTokenizerFast"] = (lambda: fast(texts)["input_ids"], fast.backend_tokenizer.model._clear_cache)
    slow = CLIPTokenizer.from_pretrained(folder)
    specials = dict(slow.cache)
    out["CLIPTokenizer (slow)"] = (
        lambda: [slow(t)["input_ids"] for t in texts],
        lambda: setattr(slow, "cache", dict(specials)),
    )
    return out


def load_times(folder: Path, repeats: int = 3) -> dict[str, float]:
    from transformers import CLIPTokenizerFast

    def bundled() -> Tokenizer:
        tokmod._bundled_merges.cache_clear()  # read and unzip the merges again
        return Tokenizer()

    fns = {
        "sdclip bundled": bundled,
        "sdclip from_folder": lambda: Tokenizer.from_folder(folder),
        "CLIPTokenizerFast": lambda: CLIPTokenizerFast.from_pretrained(folder),
    }
    return {name: median(ts) for name, ts in paired(fns, repeats, warmup=0).items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the corpus per contender and state")
    parser.add_argument("--slow-repeats", type=int, default=2, help="passes for the slow CLIPTokenizer")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    parser.add_argument("--out", help="also write tokenizer.md / tokenizer.json into this folder")
    parser.add_argument("--quick", action="store_true", help="2 repetitions, 1 for the slow tokenizer")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.slow_repeats = 2, 1

    corpora = {"all": corpus(), "SD prompts": generated_prompts()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        Tokenizer().save_hf(folder)
        loads = load_times(folder)
        rows = [row for name, texts in corpora.items() for row in measure(name, texts, folder, args)]

    header = ["corpus", "tokenizer", "state", "prompts/s", "ms/corpus", "vs Fast"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    print(f"Machine: {machine()}; tokenizers threads: {os.environ.get('RAYON_NUM_THREADS', 'default')}")
    for name, texts in corpora.items():
        print(f"Corpus {name!r}: {len(texts)} prompts, {sum(map(len, texts))} characters")
    print("\n" + "\n".join(lines))
    print("\nLoad (s): " + ", ".join(f"{n} {t:.3f}" for n, t in loads.items()))
    if args.out:
        write_results("tokenizer", rows, header, args.out, {"load_s": loads})
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"machine": machine(), "rows": rows, "load_s": loads, "time": time.strftime("%Y-%m-%d %H:%M")}, indent=2
            )
        )


def measure(corpus_name: str, texts: list[str], folder: Path, args: argparse.Namespace) -> list[dict]:
    """Rows of prompts/s per contender, cold and warm, after checking their ids agree."""
    runs = contenders(texts, folder)
    ids = {name: encode() for name, (encode, _) in runs.items()}
    assert ids["sdclip hf"] == ids["CLIPTokenizer (slow)"], "sdclip hf differs from CLIPTokenizer"
    assert ids["sdclip nfc"] == ids["CLIPTokenizerFast"], "sdclip nfc differs from CLIPTokenizerFast"

    def cold(encode, clear):
        def run():
            clear()
            encode()

        return run

    seconds: dict[tuple[str, str], float] = {}
    for state in ("cold", "warm"):
        for group, repeats in (
            ([n for n in runs if "slow" not in n], args.repeats),
            (["CLIPTokenizer (slow)"], args.slow_repeats),
        ):
            fns = {n: (cold(*runs[n]) if state == "cold" else runs[n][0]) for n in group}
            for name, ts in paired(fns, repeats).items():
                seconds[name, state] = median(ts)
    rows = [
        {
            "corpus": f"{corpus_name} ({len(texts)})",
            "tokenizer": name,
            "state": state,
            "prompts/s": round(len(texts) / s),
            "ms/corpus": round(1000 * s, 1),
            "vs Fast": round(seconds["CLIPTokenizerFast", state] / s, 2),
        }
        for (name, state), s in seconds.items()
    ]
    return sorted(rows, key=lambda r: (r["state"], -r["prompts/s"]))


if __name__ == "__main__":
    main()

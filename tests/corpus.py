"""A deterministic prompt corpus for tokenizer tests and the tokenizer benchmark.

Hand-written edge cases (prompt weight syntax, Unicode, mojibake, HTML entities, control
characters, special-token strings, long prompts) plus generated Stable Diffusion style prompts.
Nothing is downloaded; the same call always gives the same list.
"""

from __future__ import annotations

import random

SD_SYNTAX = [
    "a photo of an astronaut riding a horse on mars",
    "(masterpiece:1.2), best quality, (ultra detailed:1.1), 1girl, solo",
    "((masterpiece)), (((best quality))), [blurry], [[lowres]]",
    "a castle on a hill BREAK sunset sky, volumetric light",
    "a red cube AND a blue sphere:0.5 AND a green cone",
    r"a \(literal\) parenthesis and \[bracket\] and a back\\slash",
    "(red:1.5) (blue:0.7) (green:1e-1) (yellow:-0.5) (x:1.2.3)",
    "[cat:dog:0.5], [cat|dog], {red|green|blue}, <lora:detail:0.8>, <hypernet:x:1>",
    "embedding:easynegative, (worst quality, low quality:1.4), EasyNegative",
    "portrait of a woman, by greg rutkowski and alphonse mucha, artstation, 8k, trending",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "1girl, 2boys, 3d, 4k, 16:9, 1920x1080, f/1.8, 35mm, 50% off, $100, #hashtag, @user",
    "cat++ dog-- ++++ ---- ,,,, ..... !!!??? ;;:: ~~~ ___ ***",
    "\"quoted\" 'single' `back` «guillemets» „low‟ ‘curly’ “double”",
    "it's they're we've I'm you'll he'd don't IT'S THEY'RE WE'VE I'M YOU'LL HE'D DON'T",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'VE 'M 'LL 'D ''s '''ll s' ll'",
    "0123456789 3.14159 1,000,000 -42 +7 1e10 0x1F 12th 2nd ½ ² ³ ① Ⅻ ٣ ۴ ५",
    "CamelCaseWord snake_case_word kebab-case-word dotted.word.here path/to/file.png",
    "https://example.com/a?b=c&d=e#frag user@example.com C:\\Users\\x",
    "MiXeD CaSe WoRdS ALL CAPS lower",
    "black & white photo, salt & pepper, rock&roll, fish &chips, & leading, trailing &",
]

UNICODE = [
    "café naïve résumé über straße señor façade jalapeño coöperate",
    "cafe\u0301 nai\u0308ve re\u0301sume\u0301",  # decomposed accents (NFC composes them)
    "Å Å Å K K Ω Ω",  # precomposed, decomposed, Angstrom sign, Kelvin sign, Ohm sign
    "ÀÉÎÕÜ ÇÑ ÆØÅ æøå Œœ Ŀŀ Ĳĳ ǅǈǋ",
    "😀 😃 🐱 🐶 🌸 🔥 💯 🎨 🖼️ ❤️ ❤ ✨",
    "👨‍👩‍👧‍👦 👩‍💻 🏳️‍🌈 🧑🏽‍🚀 👨‍❤️‍💋‍👨",
    "🇺🇸 🇯🇵 🇫🇷 🇩🇪 🏴󠁧󠁢󠁳󠁣󠁴󠁿",
    "👍 👍🏻 👍🏼 👍🏽 👍🏾 👍🏿 ✋🏿",
    "一只猫坐在窗台上，阳光明媚。 山水画 水墨",
    "猫が窓辺に座っている。アニメ風イラスト、ｶﾀｶﾅ",
    "고양이가 창가에 앉아 있다 한국어",
    "\u1100\u1161\u11a8 \u110b\u1173\u11af",  # conjoining Hangul jamo (NFC composes)
    "豈 更 車 賈 滑",  # CJK compatibility ideographs (NFC maps to unified ones)
    "ΟΔΟΣ ΣΟΦΟΣ ΑΣ Σ ΣΣ Σ. ΜΆΣ ὈΔΥΣΣΕΎΣ",  # final sigma
    "ἀλφα βῆτα γάμμα Ελληνικά αβγ",
    "İstanbul İİ ıi IIı DİYARBAKIR i̇",
    "Ａｎｉｍｅ　ｇｉｒｌ，ｆｕｌｌｗｉｄｔｈ！ １２３ ＡＢＣ",
    "ﬁne ﬂower ﬀ ﬃ ﬄ ﬅ ﬆ ſtreet 'ſ ẞ ß",
    "‘single’ “double” ‚low‚ „low” ′prime″ ‹angle›",
    "Привет мир ПРИВЕТ Ёлка",
    "שלום עולם مرحبا بالعالم",
    "नमस्ते दुनिया ภาษาไทย ქართული Հայերեն",
    "𝐁𝐨𝐥𝐝 𝕯𝖔𝖚𝖇𝖑𝖊 𝒮𝒸𝓇𝒾𝓅𝓉 ⓒⓘⓡⓒⓛⓔ",
    "™ © ® ° ± × ÷ µ ¶ § € £ ¥ ¢ ‰ † ‡ • … – — −",
    "a\u0300\u0301\u0302\u0303 combining stack o\u0338 e\u20dd",
    "\U0001f9d1\u200d\U0001f3a8 \u2764\ufe0f\u200d\U0001f525",
    "\ud7ff \ue000 \uf8ff \U000f0000 \ufffd \ufffe",  # edges, private use, replacement
]

MOJIBAKE = [
    "cafÃ© naÃ¯ve rÃ©sumÃ©",
    "Ã¼ber straÃŸe seÃ±or",
    "â€œquotedâ€\x9d and â€™apostrophe",
    "The Mona Lisa doesnâ€™t have eyebrows.",
    "Ð¿Ñ€Ð¸Ð²ÐµÑ‚",
    "æ—¥æœ¬èªž",
    "Ã©tÃ© Ã  la plage",
    "ÃƒÂ© double mojibake",
    "\x80\x81\x8d\x9f C1 controls",
    "l\u2019\u00e9t\u00e9",
]

HTML = [
    "tom &amp; jerry",
    "&lt;b&gt;bold&lt;/b&gt; &quot;q&quot; &#39;s &#x27;t &apos;",
    "&amp;amp; &amp;lt; &amp;#39; double escaped",
    "&nbsp;a&nbsp;b &copy; &eacute;t&eacute; &hellip; &mdash; &euro;",
    "&amp &lt &gt &copy no semicolons &#65 &#x41",
    "<b>bold</b> & tag <i>italic</i> &amp; entity after a tag",
    "&notanentity; &; &#; &#xZZ; &#99999999; &#0; &#128512;",
    "AT&T R&D Q&A b&w",
    "&AMP; &LT; &Amp;",
]

WHITESPACE_AND_CONTROL = [
    "",
    " ",
    "   ",
    "\t\n\r\x0b\x0c",
    "\u3000\u00a0\u2003 \u2028\u2029",
    "a\tb\nc\rd\r\ne",
    "  leading and trailing  ",
    "many     spaces\t\t\ttabs\n\n\nnewlines",
    "".join(map(chr, range(0x00, 0x20))) + "x" + "\x7f\x85",
    "a\x00b\x01c\x1bd\x1ce\x1df\x1eg\x1fh\x7fi\x85j",
    "\x1c\x1d\x1e\x1f",
    "a\x1cb \x1f",
    "zero\u200bwidth\u200cnon\u200djoiner\u2060word\ufeffbom",
    "\ufeffleading bom",
    "soft\u00adhyphen",
    "nbsp\u00a0here thin\u2009space ideographic\u3000space",
    "\x1b[31mred terminal escape\x1b[0m",
    "line\u2028separator\u2029paragraph",
    "\u0085next line",
]

SPECIALS = [
    "<|endoftext|>",
    "<|startoftext|>",
    "a cat<|endoftext|>a dog",
    "<|startoftext|>a cat<|endoftext|>",
    "<|ENDOFTEXT|> <|EndOfText|> <|STARTOFTEXT|>",
    "<|endoftext|><|endoftext|><|startoftext|>",
    "<end_of_text> <start_of_text> <END_OF_TEXT> <Start_Of_Text>",
    "x<end_of_text>y<start_of_text>z",
    "<|endoftext|>&amp; tom &amp; jerry",
    "&lt;|endoftext|&gt; &lt;end_of_text&gt;",
    "＜｜ｅｎｄｏｆｔｅｘｔ｜＞ fullwidth special",
    "<|endoftext| <|endof text|> |endoftext|> <|ſtartoftext|>",
    "<|endoftext|>Ã© mojibake after a special",
    "  <|endoftext|>  spaced  <|endoftext|>  ",
    "<|endoftext|>\u0301 combining after special",
    "\u212a<|endoftext|> <|endoftext|>\u212a",
]

_SUBJECTS = [
    "a cat",
    "an astronaut",
    "a dragon",
    "a portrait of a woman",
    "a cyberpunk city",
    "a bowl of fruit",
    "a lighthouse",
    "an old man",
    "a robot",
    "a fox",
    "a mountain lake",
    "a steampunk airship",
    "a samurai",
    "a cottage",
    "a spaceship",
    "the eiffel tower",
    "a knight",
    "a mermaid",
    "a forest spirit",
]
_STYLES = [
    "oil painting",
    "watercolor",
    "digital art",
    "concept art",
    "photorealistic",
    "anime style",
    "studio ghibli",
    "pixar",
    "unreal engine",
    "octane render",
    "35mm film",
    "pencil sketch",
    "ukiyo-e",
    "art nouveau",
    "low poly",
    "isometric",
    "vaporwave",
    "baroque",
    "impressionism",
]
_ARTISTS = [
    "greg rutkowski",
    "alphonse mucha",
    "artgerm",
    "wlop",
    "makoto shinkai",
    "hayao miyazaki",
    "beksiński",
    "moebius",
    "james gurney",
    "simon stålenhag",
    "caspar david friedrich",
]
_MODIFIERS = [
    "masterpiece",
    "best quality",
    "highly detailed",
    "8k",
    "4k uhd",
    "sharp focus",
    "intricate",
    "volumetric lighting",
    "golden hour",
    "bokeh",
    "cinematic",
    "trending on artstation",
    "hdr",
    "dramatic lighting",
    "soft light",
    "rim light",
    "depth of field",
    "award-winning",
    "ultra-realistic",
    "f/1.4",
    "85mm",
    "symmetrical",
    "centered",
    "wide angle",
]
_EXOTIC = [
    "café",
    "naïve",
    "東京",
    "猫",
    "🌸",
    "❤️",
    "👍🏽",
    "ΣΟΦΟΣ",
    "İzmir",
    "ﬁne",
    "“quoted”",
    "Ã©",
    "&amp;",
    "&lt;3",
    "\u200b",
    "\t",
    "\n",
    "<|endoftext|>",
    "１２３",
    "it's",
    "WE'LL",
    "ſ",
]


def generated_prompts(n: int = 400, seed: int = 0) -> list[str]:
    """SD-style prompts: subject, styles, artists, weighted modifiers, some exotic characters."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        parts = [rng.choice(_SUBJECTS)]
        parts += rng.sample(_STYLES, rng.randint(0, 3))
        parts += [f"by {a}" for a in rng.sample(_ARTISTS, rng.randint(0, 2))]
        for mod in rng.sample(_MODIFIERS, rng.randint(1, 12)):
            r = rng.random()
            if r < 0.15:
                mod = f"({mod}:{rng.choice(['1.1', '1.2', '1.3', '0.8', '1.5'])})"
            elif r < 0.25:
                mod = "(" * rng.randint(1, 3) + mod + ")" * rng.randint(1, 3)
            elif r < 0.3:
                mod = f"[{mod}]"
            elif r < 0.35:
                mod = mod.upper()
            parts.append(mod)
        if rng.random() < 0.2:
            parts.insert(rng.randrange(len(parts) + 1), rng.choice(_EXOTIC))
        if rng.random() < 0.05:
            parts.append("BREAK")
        prompts.append(rng.choice([", ", ",", " ", ", "]).join(parts))
    return prompts


def long_prompts() -> list[str]:
    """Prompts around and far past the 75-token window."""
    words = [m for m in _MODIFIERS if " " not in m and "-" not in m and "/" not in m]
    out = []
    for n in (1, 2, 10, 37, 74, 75, 76, 77, 78, 100, 150, 200, 300, 500):
        out.append(" ".join(words[i % len(words)] for i in range(n)))
    out.append(", ".join(_SUBJECTS + _STYLES + _ARTISTS + _MODIFIERS))
    out.append("supercalifragilisticexpialidocious" * 20)  # one very long piece
    out.append("!" * 300)
    out.append("🔥" * 100)
    out.append("a" * 1000)
    return out


def edge_cases() -> list[str]:
    """The hand-written cases, without the generated or long prompts."""
    cases = SD_SYNTAX + UNICODE + MOJIBAKE + HTML + WHITESPACE_AND_CONTROL + SPECIALS
    # each case also embedded in an ordinary prompt and upper-cased
    cases += [f"a photo of {c}, highly detailed" for c in UNICODE + MOJIBAKE + HTML]
    cases += [c.upper() for c in SD_SYNTAX + UNICODE + HTML]
    return cases


def corpus() -> list[str]:
    """Every prompt: edge cases, long prompts and 400 generated prompts."""
    return edge_cases() + long_prompts() + generated_prompts()

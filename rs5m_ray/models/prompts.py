"""RS5M's 33 handcrafted remote-sensing prompts (notes §1.5, paper App. B3).

11 modifiers x 3 nouns; the article agrees with the word that follows it
("an aerial image.", "a blurry aerial image.").
"""
from __future__ import annotations

MODIFIERS = ("", "low resolution", "bad", "cropped", "bright", "dark", "close-up", "black and white",
             "jpeg corrupted", "blurry", "good")
NOUNS = ("remote sensing image", "aerial image", "satellite image")


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


RS_PROMPTS: tuple[str, ...] = tuple(
    _with_article(f"{m} {n}".strip()) + "." for n in NOUNS for m in MODIFIERS
)


# ---------------------------------------------------------------- zero-shot classification templates

# RS5M's zero-shot templates (notes §5.1; RS5M inference/classname_and_prompt/RS{AID,RESISC45,EuroSAT}.py):
# 35 CLIP-style variants x the same 3 nouns = 105, one "{}" each for the class name.
_SUBJECTS = ("many {}", "a {}", "the {}", "the hard to see {}", "a hard to see {}")
_IMAGE_QUALITIES = ("low resolution", "bad", "cropped", "bright", "dark", "close-up", "black and white",
                    "jpeg corrupted", "blurry", "good")
_OBJECT_SIZES = ("large", "nice", "small", "weird", "cool")


def _rs5m_variants(noun: str) -> list[str]:
    plain = _with_article(noun)
    return ([f"{plain} of {s}." for s in _SUBJECTS]
            + [f"{_with_article(f'{q} {noun}')} of {d} {{}}." for q in _IMAGE_QUALITIES for d in ("the", "a")]
            + [f"{plain} of {d} {a} {{}}." for a in _OBJECT_SIZES for d in ("the", "a")])


RS5M_ZERO_SHOT_TEMPLATES: tuple[str, ...] = tuple(t for noun in NOUNS for t in _rs5m_variants(noun))

# CLIP's own prompts for the remote-sensing sets it reports (openai/CLIP data/prompts.md).
CLIP_RESISC45_TEMPLATES: tuple[str, ...] = tuple(
    f"{kind} of {article}{{}}." for article in ("", "a ", "the ")
    for kind in ("satellite imagery", "aerial imagery", "satellite photo", "aerial photo", "satellite view",
                 "aerial view"))
CLIP_EUROSAT_TEMPLATES: tuple[str, ...] = tuple(
    f"a centered satellite photo of {article}{{}}." for article in ("", "a ", "the "))

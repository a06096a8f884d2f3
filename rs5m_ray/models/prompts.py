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

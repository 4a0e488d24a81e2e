"""Bundled prompt sets (in the spirit of ddpo-pytorch's ``prompts.py``).

Each set is a plain list of prompts. The trainer node offers them by name; "custom" means the
node's own multiline text (one prompt per line).
"""
from __future__ import annotations

ANIMALS = [
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow",
    "goat", "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant",
    "butterfly", "fish", "shark", "whale", "dolphin", "squirrel", "mouse", "rat", "snake",
    "turtle", "frog", "chicken", "duck", "goose", "bee", "pig", "turkey", "fly", "llama", "camel",
    "bat", "gorilla", "hedgehog", "kangaroo",
]

SCENES = [
    "a lighthouse on a rocky coast at sunset",
    "a cozy cabin in a snowy forest",
    "a bowl of fresh fruit on a wooden table",
    "a portrait of an old fisherman",
    "a futuristic city skyline at night",
    "a field of sunflowers under a blue sky",
    "a red sports car on a mountain road",
    "a cup of coffee next to an open book",
    "a castle on a hill surrounded by mist",
    "a hot air balloon over a green valley",
    "a sailing boat on a calm lake",
    "a street market in an old town",
]

# The held-out check's default prompts (training/heldout.py): no prompt of a training set above or
# of the trainer's default custom prompts; a face (mode collapse shows first in faces), a scene, a
# still life, a landscape. Four prompts x four seeds = 16 samples per evaluation.
HELDOUT_PROMPTS = (
    "a portrait of a young woman with freckles, soft window light",
    "a cottage garden full of roses in the morning",
    "a steaming bowl of ramen on a wooden counter",
    "a mountain lake reflecting snowy peaks at dawn",
)

PROMPT_SETS = {
    "simple animals": [f"a photo of a {a}" for a in ANIMALS],
    "scenes": SCENES,
}


def parse_prompt_lines(text: str) -> list:
    """One prompt per non-empty line; lines starting with '#' are comments."""
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def resolve_prompts(prompt_set: str, text: str) -> list:
    """The prompts a run trains on: the named set, or the custom lines when the set is "custom".

    Raises ValueError when the result is empty or the set name is unknown.
    """
    if prompt_set == "custom":
        prompts = parse_prompt_lines(text)
        if not prompts:
            raise ValueError("the prompt list is empty: write one prompt per line, or pick a bundled prompt set")
        return prompts
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {prompt_set!r}; choose one of {['custom', *PROMPT_SETS]}")
    return list(PROMPT_SETS[prompt_set])

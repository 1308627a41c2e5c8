"""How expressions are worded: the everyday name of a dataset category, plurals and number words,
and which categories are never counted (they come in heaps, or their noun has no singular)."""

from __future__ import annotations

import re

# dataset names (COCO's and LVIS's, normalised) -> what a person calls the thing; a user's table
# (``Referring(names=...)``) is read first
EVERYDAY = {
    "tv": "screen", "television set": "screen", "dining table": "table", "potted plant": "plant",
    "cell phone": "phone", "cellular telephone": "phone", "sports ball": "ball", "ball": "ball",
    "hair drier": "hair dryer", "airplane": "plane", "refrigerator": "fridge", "motorcycle": "motorbike",
    "laptop computer": "laptop", "computer keyboard": "keyboard", "microwave oven": "microwave",
    "remote": "remote control", "fireplug": "fire hydrant", "wineglass": "wine glass", "doughnut": "donut",
    "necktie": "tie", "sofa": "sofa", "flowerpot": "flower pot", "mouse": "computer mouse",
}

# what else a person may take an everyday noun to mean: a laptop and a phone have screens too, so
# nothing is said of "the screen" (COCO's tv) where one is in the picture
CONFUSABLE = {"screen": frozenset({"laptop", "cell phone", "laptop computer", "cellular telephone"})}

# nouns that are plural in form: never counted or put in the plural ("every skis", "the two scissors")
PLURAL_ONLY = frozenset({"scissors", "skis", "glasses", "sunglasses", "goggles", "pants", "jeans", "shorts",
                         "trousers", "tongs", "pliers", "binoculars", "headphones", "earphones", "clothes"})

# categories whose instances come in heaps (fruit in a bowl, books on a shelf, bottles in a fridge):
# annotations of them are rarely complete, so they are never counted (no ordinals, "all", "the N");
# override with ``Referring(heaps=...)``
HEAPS = frozenset({
    "banana", "apple", "orange", "broccoli", "carrot", "donut", "book", "bottle", "grape", "strawberry",
    "cherry", "tomato", "potato", "onion", "lemon", "lime", "olive", "mushroom", "pea", "bean", "blueberry",
    "raspberry", "cookie", "cupcake", "egg", "peach", "pear", "plum", "bell pepper", "pepper", "lettuce",
    "cucumber", "zucchini", "brussels sprouts", "french fries", "pastry", "bun", "bagel", "muffin",
    "sheep", "kite", "bird", "boat", "umbrella", "flower", "leaf", "cow"})

IRREGULAR = {"person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice",
             "knife": "knives", "sheep": "sheep", "shelf": "shelves", "leaf": "leaves", "foot": "feet",
             "tooth": "teeth", "goose": "geese", "fish": "fish", "deer": "deer"}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
ORDINALS = ["first", "second", "third", "fourth", "fifth"]


def everyday_name(name: str, table: dict[str, str] | None = None) -> str:
    """What a person calls a category: the user's ``table`` first, then :data:`EVERYDAY`, after LVIS's
    spelling is undone ("car_(automobile)" -> "car")."""
    plain = " ".join(re.sub(r"\(.*?\)", " ", name.replace("_", " ")).lower().split())
    for key in (name, plain):
        if table and key in table:
            return table[key]
    return EVERYDAY.get(plain, plain)


def plural(noun: str) -> str:
    """English plural of a (possibly multi-word) noun: the last word is inflected."""
    head, _, last = noun.rpartition(" ")
    if last in IRREGULAR:
        out = IRREGULAR[last]
    elif last in PLURAL_ONLY:
        out = last
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        out = last + "es"
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        out = last[:-1] + "ies"
    else:
        out = last + "s"
    return f"{head} {out}" if head else out


def countable(noun: str, category: str, heaps: frozenset[str] | set[str]) -> bool:
    """Whether instances of a category may be counted in words: not a heap, not a plural-only noun."""
    last = noun.rpartition(" ")[2]
    return last not in PLURAL_ONLY and everyday_name(category) not in heaps and category not in heaps

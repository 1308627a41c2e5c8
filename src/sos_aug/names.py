"""How category names are compared across datasets: one normal form, and the COCO names whose LVIS
v1 category is spelled otherwise (so a COCO bank pastes into an LVIS dataset and the other way)."""

from __future__ import annotations

# COCO 2017 name -> LVIS v1 name, where they differ (checked against mmdet's LVISV1Dataset classes;
# COCO's "hot dog" has no LVIS v1 category)
COCO_TO_LVIS = {
    "car": "car_(automobile)", "bus": "bus_(vehicle)", "train": "train_(railroad_vehicle)",
    "fire hydrant": "fireplug", "tie": "necktie", "skis": "ski", "sports ball": "ball", "wine glass": "wineglass",
    "orange": "orange_(fruit)", "donut": "doughnut", "couch": "sofa", "potted plant": "flowerpot",
    "tv": "television_set", "laptop": "laptop_computer", "mouse": "mouse_(computer_equipment)",
    "remote": "remote_control", "keyboard": "computer_keyboard", "cell phone": "cellular_telephone",
    "microwave": "microwave_oven", "hair drier": "hair_dryer",
}


# categories that name people: no colour term ever describes them (a person's colour over the whole
# mask is skin as much as clothing, and reads as a descriptor of race); COCO's and LVIS's names
PEOPLE = frozenset({"person", "persons", "people", "man", "men", "woman", "women", "boy", "boys", "girl", "girls",
                    "child", "children", "baby", "babies", "kid", "kids", "pedestrian", "rider", "player", "skier",
                    "surfer", "skateboarder", "bride", "groom", "policeman", "soldier", "cyclist", "human", "lady",
                    "gentleman", "toddler", "teenager", "adult", "guy"})


def is_person(name: str) -> bool:
    """Whether a category or a short phrase names people: any of its words is in :data:`PEOPLE`
    ("young woman", "a man holding a kite", "baseball player")."""
    return any(word in PEOPLE for word in normalize_name(name).split())


def normalize_name(name: str) -> str:
    """Compare category names the way people write them: case, '_' and '-' do not matter."""
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


_ALIASES: dict[str, set[str]] = {}
for _coco, _lvis in COCO_TO_LVIS.items():
    _ALIASES.setdefault(normalize_name(_coco), set()).add(normalize_name(_lvis))
    _ALIASES.setdefault(normalize_name(_lvis), set()).add(normalize_name(_coco))


def name_forms(names: list[str]) -> list[str]:
    """The normal forms under which a category with these names (its name, then synonyms) is
    looked up: the names themselves first, then their COCO/LVIS counterparts, without repeats."""
    direct = [normalize_name(n) for n in names]
    aliases = [a for key in direct for a in sorted(_ALIASES.get(key, ()))]
    return list(dict.fromkeys(direct + aliases))

"""Class specs: class names, prompt-ensemble features and similar-class hints, loaded from YAML.

A spec lists the classes of a dataset in label order (docs/method.md, "Prompt ensemble").
Each class has a display `name` (what the prompts say), optionally a stable `id` (the
dataset's own label name or WordNet id), `features` (short facts about what the class
looks like, one prompt each) and `similar_to` (the class it is most often confused with).
Two distinct classes may share a display name (ImageNet has two "missile"s and two
"sunglasses") when each has its own `id`.

Specs for the paper's datasets ship in cleaner/specs/ and are picked by name
(`data.classes=imagenet1k`); see `shipped_spec_names()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {c}.",)
FEATURE_TEMPLATE = "a photo of a {c}, which {f}."
SPECS_DIR = Path(__file__).parent / "specs"
DEMO_CLASS_SPEC = Path(__file__).parent / "demo" / "shapes.yaml"
SPEC_KEYS = frozenset({"name", "source", "templates", "feature_template", "classes"})
CLASS_KEYS = frozenset({"name", "id", "features", "similar_to"})


class ClassSpecError(ValueError):
    """A class spec that cannot be used; the message names the problem (one line)."""


@dataclass(frozen=True)
class ClassInfo:
    """One class: its display name, stable id, prompt features and most similar class."""

    name: str
    features: tuple[str, ...] = ()
    similar_to: str | None = None  # another class's id or (unambiguous) name
    id: str | None = None

    @property
    def key(self) -> str:
        """What tells this class apart from every other: its id, else its name."""
        return self.id if self.id is not None else self.name


@dataclass(frozen=True)
class ClassSpec:
    """The classes of a dataset, in label order, plus plain templates for featureless classes."""

    classes: tuple[ClassInfo, ...]
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    name: str = "dataset"
    feature_template: str = FEATURE_TEMPLATE
    source: str | None = None  # where the class list comes from (documentation)
    _index: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.classes:
            raise ClassSpecError("class spec has no classes")
        object.__setattr__(self, "_index", _lookup_index(self.classes))
        for info in self.classes:
            if info.similar_to is not None:
                target = self._resolve(info.similar_to, f"{info.name!r} is similar_to")
                if target == self._resolve(info.key, ""):
                    raise ClassSpecError(f"class spec: {info.name!r} is similar_to itself")
        if not self.templates:
            raise ClassSpecError("class spec: 'templates' is empty")
        for template in self.templates:
            _check_template(template, ("c",), "template")
        _check_template(self.feature_template, ("c", "f"), "feature_template")

    def _resolve(self, name: str, context: str) -> int:
        index = self._index.get(name)
        if index is None:
            raise ClassSpecError(f"class spec: {context} unknown class {name!r}")
        if index < 0:
            raise ClassSpecError(
                f"class spec: {context} {name!r}, a name {-index} classes share; use its id"
            )
        return index

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        """Display names in label order (two classes may share one; see `keys`)."""
        return [c.name for c in self.classes]

    @property
    def keys(self) -> list[str]:
        """Unique class keys in label order: each class's id, else its name."""
        return [c.key for c in self.classes]

    def index_of(self, name: str) -> int:
        """Label index of a class id or name; KeyError naming it if unknown or ambiguous."""
        index = self._index.get(name)
        if index is None:
            raise KeyError(f"unknown class name {name!r}")
        if index < 0:
            raise KeyError(f"class name {name!r} is shared by {-index} classes: use its id")
        return index

    def most_similar(self) -> list[int]:
        """For each class, the label of its most similar class (itself when none is given)."""
        return [
            self._index[c.similar_to] if c.similar_to is not None else i
            for i, c in enumerate(self.classes)
        ]

    def prompts(self) -> list[list[str]]:
        """The prompt ensemble: for each class, its J_k prompts (features, else templates)."""
        out: list[list[str]] = []
        for info in self.classes:
            if info.features:
                out.append([self.feature_template.format(c=info.name, f=f) for f in info.features])
            else:
                out.append([t.format(c=info.name) for t in self.templates])
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ClassSpec:
        """Build from a parsed YAML mapping (`classes:` list of names or mappings).

        Raises ClassSpecError (a ValueError) naming the first problem found.
        """
        if not isinstance(data, dict) or "classes" not in data:
            raise ClassSpecError("class spec must be a mapping with a 'classes' list")
        unknown = sorted(str(k) for k in set(data) - SPEC_KEYS)
        if unknown:
            raise ClassSpecError(
                f"class spec: unknown key(s) {', '.join(unknown)} (known: "
                f"{', '.join(sorted(SPEC_KEYS))})"
            )
        raw = data["classes"]
        if not isinstance(raw, list):
            raise ClassSpecError("class spec: 'classes' must be a list")
        classes = tuple(_class_info(i, item) for i, item in enumerate(raw))
        templates = data.get("templates")
        templates = list(DEFAULT_TEMPLATES) if templates is None else templates
        if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
            raise ClassSpecError("class spec: 'templates' must be a list of strings")
        feature_template = data.get("feature_template", FEATURE_TEMPLATE)
        if not isinstance(feature_template, str):
            raise ClassSpecError("class spec: 'feature_template' must be a string")
        source = data.get("source")
        return cls(
            classes=classes,
            templates=tuple(templates),
            name=str(data.get("name", "dataset")),
            feature_template=feature_template,
            source=None if source is None else str(source),
        )

    @classmethod
    def from_yaml_text(cls, text: str) -> ClassSpec:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            raise ClassSpecError(f"class spec is not valid YAML{at}: {_first_line(err)}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> ClassSpec:
        """Load a class spec from a local YAML path (see cleaner.reading.uri for remote files)."""
        return cls.from_yaml_text(Path(path).read_text())

    def to_dict(self) -> dict:
        """The YAML mapping this spec is loaded from (from_dict(to_dict()) == self)."""
        classes: list = []
        for info in self.classes:
            entry: dict = {"name": info.name}
            if info.id is not None:
                entry["id"] = info.id
            if info.similar_to is not None:
                entry["similar_to"] = info.similar_to
            if info.features:
                entry["features"] = list(info.features)
            classes.append(entry if len(entry) > 1 else info.name)
        out: dict = {"name": self.name}
        if self.source is not None:
            out["source"] = self.source
        out["templates"] = list(self.templates)
        if self.feature_template != FEATURE_TEMPLATE:
            out["feature_template"] = self.feature_template
        out["classes"] = classes
        return out


def _class_info(i: int, item) -> ClassInfo:
    """One `classes:` entry: a name, or a mapping with name / id / features / similar_to."""
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict) or "name" not in item:
        raise ClassSpecError(f"class spec: entry {i} must be a name or a mapping with 'name'")
    unknown = sorted(str(k) for k in set(item) - CLASS_KEYS)
    if unknown:
        raise ClassSpecError(
            f"class spec: class {i} has unknown key(s) {', '.join(unknown)} (known: "
            f"{', '.join(sorted(CLASS_KEYS))})"
        )
    for key in ("name", "id", "similar_to"):
        value = item.get(key)
        if key in item and (not isinstance(value, str) or not value.strip()):
            raise ClassSpecError(f"class spec: {key} of class {i} must be a non-empty string")
    features = item.get("features") or []
    if not isinstance(features, list) or not all(
        isinstance(f, str) and f.strip() for f in features
    ):
        raise ClassSpecError(f"class spec: features of class {i} must be a list of strings")
    return ClassInfo(
        name=item["name"],
        features=tuple(features),
        similar_to=item.get("similar_to"),
        id=item.get("id"),
    )


def _lookup_index(classes: tuple[ClassInfo, ...]) -> dict[str, int]:
    """id and name -> label; a name several classes share maps to -(how many share it)."""
    index: dict[str, int] = {}
    for i, info in enumerate(classes):
        if info.id is not None:
            if info.id in index:
                raise ClassSpecError(f"class spec: duplicate class id {info.id!r}")
            index[info.id] = i
    by_name: dict[str, list[int]] = {}
    for i, info in enumerate(classes):
        by_name.setdefault(info.name, []).append(i)
    for name, labels in by_name.items():
        if len(labels) > 1:
            if any(classes[i].id is None for i in labels):
                raise ClassSpecError(
                    f"class spec: duplicate class name {name!r} (classes "
                    f"{', '.join(map(str, labels))}): give each of them an `id` "
                    "(e.g. its WordNet id) to keep both"
                )
            index.setdefault(name, -len(labels))
        else:
            index.setdefault(name, labels[0])
    return index


def _check_template(template: str, fields: tuple[str, ...], what: str) -> None:
    """A template must name every field in braces and nothing else."""
    for name in fields:
        if "{" + name + "}" not in template:
            raise ClassSpecError(
                f"class spec: {what} {template!r} lacks the {{{name}}} placeholder"
            )
    try:
        template.format(**dict.fromkeys(fields, "x"))
    except (KeyError, IndexError, ValueError) as err:
        raise ClassSpecError(
            f"class spec: {what} {template!r} has a stray brace or placeholder ({err!r}); "
            "only " + ", ".join("{" + f + "}" for f in fields) + " may appear"
        ) from None


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def shipped_spec_names() -> list[str]:
    """Names of the class specs that ship with the package (cleaner/specs/<name>.yaml)."""
    return sorted(p.stem for p in SPECS_DIR.glob("*.yaml"))


def shipped_spec_path(name: str) -> Path | None:
    """The path of a shipped spec ('demo' is the bundled demo's), or None."""
    if name == "demo":
        return DEMO_CLASS_SPEC
    path = SPECS_DIR / f"{name}.yaml"
    return path if name and "/" not in name and path.is_file() else None

"""Class specs: class names, prompt-ensemble features and similar-class hints, loaded from YAML."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {c}.",)
FEATURE_TEMPLATE = "a photo of a {c}, which {f}."


@dataclass(frozen=True)
class ClassInfo:
    """One class: its name, its prompt features and (optionally) the most similar class."""

    name: str
    features: tuple[str, ...] = ()
    similar_to: str | None = None


@dataclass(frozen=True)
class ClassSpec:
    """The classes of a dataset, in label order, plus plain templates for featureless classes."""

    classes: tuple[ClassInfo, ...]
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    name: str = "dataset"
    feature_template: str = FEATURE_TEMPLATE
    _index: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.classes:
            raise ValueError("class spec has no classes")
        index: dict[str, int] = {}
        for i, info in enumerate(self.classes):
            if not info.name or not info.name.strip():
                raise ValueError(f"class spec: class {i} has an empty name")
            if info.name in index:
                raise ValueError(f"class spec: duplicate class name {info.name!r}")
            index[info.name] = i
        for info in self.classes:
            if info.similar_to is not None and info.similar_to not in index:
                raise ValueError(
                    f"class spec: {info.name!r} is similar_to unknown class {info.similar_to!r}"
                )
        for template in self.templates:
            if "{c}" not in template:
                raise ValueError(f"class spec: template {template!r} lacks the {{c}} placeholder")
        object.__setattr__(self, "_index", index)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    def index_of(self, name: str) -> int:
        """Label index of a class name; KeyError naming the class if unknown."""
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"unknown class name {name!r}") from None

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
        """Build from a parsed YAML mapping (`classes:` list of names or mappings)."""
        if not isinstance(data, dict) or "classes" not in data:
            raise ValueError("class spec must be a mapping with a 'classes' list")
        raw = data["classes"]
        if not isinstance(raw, list):
            raise ValueError("class spec: 'classes' must be a list")
        classes = []
        for i, item in enumerate(raw):
            if isinstance(item, str):
                classes.append(ClassInfo(name=item))
            elif isinstance(item, dict) and "name" in item:
                features = item.get("features") or []
                if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
                    raise ValueError(f"class spec: features of class {i} must be a list of strings")
                classes.append(
                    ClassInfo(
                        name=str(item["name"]),
                        features=tuple(features),
                        similar_to=item.get("similar_to"),
                    )
                )
            else:
                raise ValueError(f"class spec: entry {i} must be a name or a mapping with 'name'")
        templates = tuple(data.get("templates") or DEFAULT_TEMPLATES)
        return cls(
            classes=tuple(classes),
            templates=templates,
            name=str(data.get("name", "dataset")),
            feature_template=str(data.get("feature_template", FEATURE_TEMPLATE)),
        )

    def to_dict(self) -> dict:
        """The mapping `from_dict` reads back into an equal spec (for YAML)."""
        classes: list = []
        for info in self.classes:
            if not info.features and info.similar_to is None:
                classes.append(info.name)
                continue
            entry: dict = {"name": info.name}
            if info.features:
                entry["features"] = list(info.features)
            if info.similar_to is not None:
                entry["similar_to"] = info.similar_to
            classes.append(entry)
        return {
            "name": self.name,
            "templates": list(self.templates),
            "feature_template": self.feature_template,
            "classes": classes,
        }

    @classmethod
    def from_yaml_text(cls, text: str) -> ClassSpec:
        return cls.from_dict(yaml.safe_load(text))

    @classmethod
    def load(cls, path: str | Path) -> ClassSpec:
        """Load a class spec from a local YAML path (see cleaner.reading.uri for remote files)."""
        return cls.from_yaml_text(Path(path).read_text())


DEMO_CLASS_SPEC = Path(__file__).parent / "demo" / "shapes.yaml"

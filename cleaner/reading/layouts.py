"""Native dataset layouts -> a list of (relative image path, label) plus class names.

Each reader lists a dataset as it is distributed, without touching the images:

- imagefolder: `root/<class name>/<image>` (torchvision's ImageFolder; classes sorted)
- labellist:   `<relative path> <label>` lines (label an integer or a class name)
- webvision:   WebVision 1.0 `info/train_filelist_{google,flickr}.txt`, `info/val_filelist.txt`
               (`val_images_256/`), class names from `info/synsets.txt`; `mini`: the
               first 50 classes, Google images (mini-WebVision)
- clothing1m:  `noisy_label_kv.txt` (+ `noisy_train_key_list.txt`) for train, the clean
               lists (`clean_label_kv.txt`, `clean_{test,val}_key_list.txt`) for test/val;
               where a train image also has a clean label it becomes the true label
- animal10n:   `training/` and `testing/` with the label in the file name (`<label>_<id>.jpg`)

For webvision, clothing1m and animal10n the classes are those of the matching class spec
shipped in cleaner/specs/ (imagenet1k or mini-webvision, clothing1m, animal10n), unless
`class_names` gives others; jobs.make_shards then writes that spec beside the shards.

Lines that cannot be used are not dropped: they become problems with a reason.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field

from cleaner.classes import ClassSpec, shipped_spec_path
from cleaner.reading import uri as uri_lib

LAYOUTS = ("imagefolder", "labellist", "webvision", "clothing1m", "animal10n")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MINI_WEBVISION_CLASSES = 50
# The class specs shipped for the native layouts (cleaner/specs/): their classes are the
# listing's, and jobs.make_shards writes the spec beside the shards.
LAYOUT_SPECS = {"clothing1m": "clothing1m", "animal10n": "animal10n"}
WEBVISION_SPEC, MINI_WEBVISION_SPEC = "imagenet1k", "mini-webvision"
_ANIMAL10N_NAME = re.compile(r"^(\d+)_[^/]*$")


@dataclass(frozen=True)
class Entry:
    """One image of the dataset: its path relative to the root, label, true label (-1 unknown)."""

    path: str
    label: int
    true_label: int = -1


@dataclass
class Listing:
    """A dataset as listed: entries in a deterministic order, class names, problems."""

    entries: list[Entry]
    class_names: list[str]
    problems: list[dict] = field(default_factory=list)  # {"path"|"line": ..., "reason": ...}
    excluded: int = 0  # entries outside a chosen subset (mini-WebVision), by design
    spec: str | None = None  # the shipped class spec these classes are (cleaner/specs/)
    note: str | None = None  # how the class names were found, when that needs saying

    def problem(self, where: str, reason: str, kind: str = "line") -> None:
        self.problems.append({kind: where, "reason": reason})


@dataclass(frozen=True)
class LayoutOptions:
    """What a reader needs besides the root (see MakeShardsConfig for their meaning)."""

    split: str = "train"
    label_list: str | None = None
    class_names: str | None = None
    mini: bool = False
    sources: tuple[str, ...] | None = None


def _read_lines(uri: str) -> list[str]:
    return uri_lib.read_text(uri).splitlines()


def _first_existing(root: str, *candidates: str) -> str:
    for rel in candidates:
        target = uri_lib.join(root, rel)
        if uri_lib.exists(target):
            return target
    raise FileNotFoundError(f"none of {', '.join(candidates)} found under {root}")


def read_class_names(uri: str) -> list[str]:
    """Class names, one per line in label order (blank lines and # comments ignored)."""
    names = [line.strip() for line in _read_lines(uri)]
    return [n for n in names if n and not n.startswith("#")]


def parse_label_lines(
    lines: list[str], source: str, listing: Listing, names: list[str] | None
) -> list[tuple[str, str | int]]:
    """(path, label) pairs from `<path> <label>` lines; bad lines become problems."""
    pairs: list[tuple[str, str | int]] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        where = f"{source}:{number}"
        if len(parts) != 2:
            listing.problem(where, "bad label line: expected '<relative path> <label>'")
            continue
        path, label = parts
        if label.lstrip("-").isdigit():
            pairs.append((path, int(label)))
        elif names is not None and label not in names:
            listing.problem(where, "bad label line: label is neither an integer nor a class name")
        else:
            pairs.append((path, label))
    return pairs


def _labelled(
    listing: Listing, pairs: list[tuple[str, str | int]], source: str, prefix: str = ""
) -> None:
    """Turn (path, label) pairs into entries of `listing` (whose class names are set)."""
    index = {name: i for i, name in enumerate(listing.class_names)}
    num = len(listing.class_names)
    for path, label in pairs:
        value = index[label] if isinstance(label, str) else label
        if not 0 <= value < num:
            listing.problem(
                f"{source}: {path}", f"label out of range [0, {num}) (see the class names)"
            )
            continue
        listing.entries.append(Entry(prefix + _clean_path(path), value))


def _clean_path(path: str) -> str:
    path = path.strip().lstrip("/")
    while path.startswith("./"):
        path = path[2:]
    return path


def list_imagefolder(root: str, options: LayoutOptions) -> Listing:
    """`root/<class>/.../<image>`: classes are the sorted top-level folders."""
    listing = Listing([], [])
    files = uri_lib.list_files(root)
    base = uri_lib.resolve(root)[1].rstrip("/") + "/"
    by_class: dict[str, list[str]] = {}
    for uri in files:
        rel = uri_lib.resolve(uri)[1][len(base) :]
        if "/" not in rel:
            listing.problem(rel, "file at the top level, not in a class folder", "path")
            continue
        if posixpath.basename(rel).startswith("."):
            listing.problem(rel, "hidden file, not an image", "path")
            continue
        if not rel.lower().endswith(IMAGE_SUFFIXES):
            listing.problem(rel, "not an image file extension", "path")
            continue
        by_class.setdefault(rel.split("/", 1)[0], []).append(rel)
    listing.class_names = sorted(by_class)
    if options.class_names:
        names = read_class_names(options.class_names)
        unknown = sorted(set(by_class) - set(names))
        if unknown:
            raise ValueError(
                f"class folders not in {options.class_names}: {', '.join(unknown[:5])}"
            )
        listing.class_names = names
    for label, name in enumerate(listing.class_names):
        listing.entries.extend(Entry(rel, label) for rel in sorted(by_class.get(name, [])))
    return listing


def list_labellist(root: str, options: LayoutOptions) -> Listing:
    """`<relative path> <label>` lines; paths relative to `root`."""
    if not options.label_list:
        raise ValueError("layout labellist needs label_list (the `<path> <label>` file)")
    source = options.label_list
    listing = Listing([], [])
    names = read_class_names(options.class_names) if options.class_names else None
    pairs = parse_label_lines(_read_lines(source), uri_lib.basename(source), listing, names)
    if names is None:
        named = sorted({lab for _, lab in pairs if isinstance(lab, str)})
        numbers = [lab for _, lab in pairs if isinstance(lab, int)]
        if named and numbers:
            raise ValueError(
                f"{source} mixes integer labels and class names; give class_names "
                "(one name per line, in label order)"
            )
        names = named or [f"class_{i}" for i in range(max(numbers, default=-1) + 1)]
    listing.class_names = names
    _labelled(listing, pairs, uri_lib.basename(source))
    return listing


def shipped_spec(name: str) -> ClassSpec:
    """A class spec that ships with the package (cleaner/specs/<name>.yaml)."""
    path = shipped_spec_path(name)
    if path is None:
        raise ValueError(f"no shipped class spec {name!r}")
    return ClassSpec.load(path)


def _synsets(root: str) -> list[tuple[str, str]] | None:
    """(WordNet id, first name) rows of WebVision's info/synsets.txt, or None without it."""
    target = uri_lib.join(root, "info", "synsets.txt")
    if not uri_lib.exists(target):
        return None
    rows = [line.strip().split(None, 1) for line in _read_lines(target) if line.strip()]
    return [(r[0], (r[1] if len(r) > 1 else r[0]).split(",")[0].strip()) for r in rows]


def _webvision_classes(root: str, options: LayoutOptions, listing: Listing) -> None:
    """The class names of a WebVision listing: the user's file, else the shipped ImageNet
    spec (mini: mini-WebVision's) when info/synsets.txt is absent or lists the same WordNet
    ids in the same order, else the names in info/synsets.txt."""
    num = MINI_WEBVISION_CLASSES if options.mini else 1000
    if options.class_names:
        listing.class_names = read_class_names(options.class_names)[:num]
        return
    spec = shipped_spec(MINI_WEBVISION_SPEC if options.mini else WEBVISION_SPEC)
    rows = _synsets(root)
    if rows is None or [wnid for wnid, _ in rows[:num]] == spec.keys[:num]:
        listing.class_names, listing.spec = spec.names, spec.name
        return
    counts: dict[str, int] = {}
    for _, name in rows:
        counts[name] = counts.get(name, 0) + 1
    # ImageNet repeats a few names (crane, maillot): the synset id tells them apart.
    names = [f"{name} ({wnid})" if counts[name] > 1 else name for wnid, name in rows]
    listing.class_names = names[:num]
    listing.note = (
        "info/synsets.txt does not list the ImageNet classes in their standard order: its "
        "names, without prompt features, make the class spec"
    )


def list_webvision(root: str, options: LayoutOptions) -> Listing:
    """WebVision 1.0 (or mini-WebVision with `mini`): train from the Google/Flickr lists, val."""
    listing = Listing([], [])
    if options.split == "train":
        sources = options.sources or (("google",) if options.mini else ("google", "flickr"))
        files = [f"info/train_filelist_{s}.txt" for s in sources]
        prefix = ""
    elif options.split == "val":
        files, prefix = ["info/val_filelist.txt"], "val_images_256/"
    else:
        raise ValueError("webvision: split must be train or val (the test set has no labels)")
    pairs: list[tuple[str, str | int]] = []
    for rel in files:
        found = parse_label_lines(_read_lines(uri_lib.join(root, rel)), rel, listing, None)
        for path, label in found:
            if not isinstance(label, int):
                listing.problem(f"{rel}: {path}", "bad label line: WebVision labels are integers")
            elif options.mini and label >= MINI_WEBVISION_CLASSES:
                listing.excluded += 1
            else:
                pairs.append((path, label))
    _webvision_classes(root, options, listing)
    _labelled(listing, pairs, "filelist", prefix)
    return listing


def _with_spec_classes(options: LayoutOptions, layout: str) -> Listing:
    """An empty listing with the user's class names, else the layout's shipped spec's."""
    if options.class_names:
        return Listing([], read_class_names(options.class_names))
    spec = shipped_spec(LAYOUT_SPECS[layout])
    return Listing([], spec.names, spec=spec.name)


def list_clothing1m(root: str, options: LayoutOptions) -> Listing:
    """Clothing1M: noisy train labels (+ clean ones as true labels), or the clean test/val."""

    def annotation(name: str) -> str:
        return _first_existing(root, name, f"annotations/{name}")

    listing = _with_spec_classes(options, "clothing1m")
    num = len(listing.class_names)

    def kv(name: str) -> dict[str, int]:
        table: dict[str, int] = {}
        for path, label in parse_label_lines(_read_lines(annotation(name)), name, listing, []):
            table[_clean_path(path)] = label  # parse_label_lines with names=[]: ints only
        return table

    if options.split == "train":
        labels, key_file = kv("noisy_label_kv.txt"), "noisy_train_key_list.txt"
        try:
            clean = kv("clean_label_kv.txt")
        except FileNotFoundError:
            clean = {}
    else:
        labels, key_file = kv("clean_label_kv.txt"), f"clean_{options.split}_key_list.txt"
        clean = {}
    try:
        keys = [_clean_path(k) for k in _read_lines(annotation(key_file)) if k.strip()]
    except FileNotFoundError:
        if options.split != "train":
            raise
        keys = sorted(labels)  # no key list: every image of noisy_label_kv.txt
    for key in keys:
        label = labels.get(key)
        if label is None:
            listing.problem(key, f"in {key_file} but has no label in the label file", "path")
        elif not 0 <= label < num:
            listing.problem(key, f"label out of range [0, {num})", "path")
        else:
            truth = clean.get(key, -1)
            listing.entries.append(Entry(key, label, truth if 0 <= truth < num else -1))
    return listing


def list_animal10n(root: str, options: LayoutOptions) -> Listing:
    """ANIMAL-10N: `training/` or `testing/`, label = the number before `_` in the file name."""
    folder = {"train": "training", "test": "testing"}.get(options.split)
    if folder is None:
        raise ValueError("animal10n: split must be train or test")
    listing = _with_spec_classes(options, "animal10n")
    num = len(listing.class_names)
    base = uri_lib.join(root, folder)
    prefix = uri_lib.resolve(base)[1].rstrip("/") + "/"
    for uri in uri_lib.list_files(base):
        rel = f"{folder}/{uri_lib.resolve(uri)[1][len(prefix) :]}"
        match = _ANIMAL10N_NAME.match(posixpath.basename(rel))
        if not rel.lower().endswith(IMAGE_SUFFIXES):
            listing.problem(rel, "not an image file extension", "path")
        elif match is None:
            listing.problem(rel, "file name does not start with '<label>_'", "path")
        elif not 0 <= int(match.group(1)) < num:
            listing.problem(rel, f"label out of range [0, {num})", "path")
        else:
            listing.entries.append(Entry(rel, int(match.group(1))))
    listing.entries.sort(key=lambda e: e.path)
    return listing


READERS = {
    "imagefolder": list_imagefolder,
    "labellist": list_labellist,
    "webvision": list_webvision,
    "clothing1m": list_clothing1m,
    "animal10n": list_animal10n,
}


def list_dataset(layout: str, root: str, options: LayoutOptions) -> Listing:
    """List a dataset in its native layout; ValueError for an unknown layout or bad options."""
    if layout not in READERS:
        raise ValueError(f"unknown layout {layout!r} (one of {', '.join(LAYOUTS)})")
    listing = READERS[layout](root, options)
    if not listing.class_names:
        raise ValueError(f"{root}: no classes found for layout {layout!r}")
    return listing

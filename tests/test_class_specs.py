"""The class specs shipped in cleaner/specs/: each matches its source, every bad spec is a
one-line error, and the native layouts write theirs beside the shards. No Ray."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

from cleaner.classes import SPECS_DIR, ClassSpec, ClassSpecError, shipped_spec_names
from cleaner.config import ConfigError, MakeShardsConfig, load_config
from cleaner.reading.ingest import list_for, listing_spec_yaml
from jobs.common import load_class_spec
from tests.conftest import REPO_ROOT
from tests.layout_trees import LAYOUT_TREES, put

# The ILSVRC-2012 WordNet ids in label order, as timm ships them (the order WebVision 1.0
# uses too); and the 100 Mini-ImageNet classes.
IMAGENET_WNIDS = pkgutil.get_data("timm.data", "_info/imagenet_synsets.txt").decode().split()
MINI_IMAGENET_WNIDS = (
    pkgutil.get_data("timm.data", "_info/mini_imagenet_synsets.txt").decode().split()
)
# OpenAI CLIP's 18 CIFAR prompts (github.com/openai/CLIP, data/prompts.md).
CIFAR_TEMPLATES = [
    *(f"a {q}photo of a {{c}}." for q in ("", "blurry ", "black and white ", "low contrast ")),
    *(f"a {q}photo of a {{c}}." for q in ("high contrast ", "bad ", "good ")),
    "a photo of a small {c}.",
    "a photo of a big {c}.",
    *(f"a {q}photo of the {{c}}." for q in ("", "blurry ", "black and white ", "low contrast ")),
    *(f"a {q}photo of the {{c}}." for q in ("high contrast ", "bad ", "good ")),
    "a photo of the small {c}.",
    "a photo of the big {c}.",
]
# CIFAR-10 batches.meta label_names and CIFAR-100 meta fine_label_names, in label order
# (https://www.cs.toronto.edu/~kriz/cifar.html; what torchvision's CIFAR*.classes read).
CIFAR10 = "airplane automobile bird cat deer dog frog horse ship truck".split()  # noqa: SIM905
CIFAR100 = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge
bus butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch
crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo
keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse
mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy
porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail
snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger
tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()  # noqa: SIM905
# Clothing1M's category_names_eng.txt, in label order (github.com/Cysu/noisy_label).
CLOTHING1M = [
    "T-Shirt",
    "Shirt",
    "Knitwear",
    "Chiffon",
    "Sweater",
    "Hoodie",
    "Windbreaker",
    "Jacket",
    "Downcoat",
    "Suit",
    "Shawl",
    "Dress",
    "Vest",
    "Underwear",
]
# ANIMAL-10N's table (dm.kaist.ac.kr/datasets/animal-10n) lists 4 = cheetah, 5 = jaguar; the
# images labelled 4 are jaguars (the CLIPCleaner authors' loader swaps them, and their
# CLIP figures rely on it): the spec follows the images.
ANIMAL10N_PAGE = [
    "cat", "lynx", "wolf", "coyote", "cheetah",
    "jaguar", "chimpanzee", "orangutan", "hamster", "guinea pig",
]  # fmt: skip
ANIMAL10N_IMAGES = [*ANIMAL10N_PAGE[:4], "jaguar", "cheetah", *ANIMAL10N_PAGE[6:]]
# Red Mini-ImageNet's label order: the class list of the CLIPCleaner authors' loader of its
# split files (github.com/MrChenFeng/CLIPCleaner_ACMMM2024, datasets/dataloader_redimagenet.py),
# as WordNet ids.
RED_MINI_IMAGENET = """n01704323 n04515003 n02101006 n03062245 n04509417 n03854065 n02110063
n03998194 n02111277 n04443257 n02165456 n03075370 n02747177 n01558993 n04149813 n03220513
n03584254 n04243546 n03770439 n02108915 n02971356 n02108551 n03908618 n01981276 n03535780
n04275548 n03272010 n02138441 n03337140 n07584110 n01910747 n03146219 n02443484 n04146614
n02113712 n02981792 n04251144 n03838899 n04604644 n02116738 n02099601 n02966193 n02687172
n03924679 n02120079 n03476684 n04435653 n02091244 n01843383 n01532829 n03980874 n07613480
n03544143 n03347037 n02114548 n06794110 n04258138 n02606052 n02105505 n02871525 n03127925
n04418357 n04389033 n02074367 n02110341 n13133613 n03773504 n13054560 n07747607 n04522168
n02089867 n02129165 n02457408 n03676483 n09256479 n04067472 n02823428 n01749939 n03400231
n04596742 n01855672 n02174001 n04612504 n03047690 n02091831 n03017168 n04296562 n02108089
n09246464 n02219486 n02950826 n01770081 n03775546 n01930112 n03888605 n03417042 n03527444
n02795169 n07697537 n03207743""".split()  # noqa: SIM905
SMALL_SPECS = ("cifar10", "clothing1m", "animal10n", "mini-webvision")


def shipped(name: str) -> ClassSpec:
    return load_class_spec(name)


def test_the_paper_datasets_ship_a_spec_each():
    assert set(shipped_spec_names()) == {
        "cifar10", "cifar100", "imagenet1k", "mini-webvision",
        "red-mini-imagenet", "clothing1m", "animal10n",
    }  # fmt: skip
    for name in shipped_spec_names():
        spec = shipped(name)
        assert spec.name == name and spec.templates and spec.source
        assert all("{c}" in t for t in spec.templates)


def test_imagenet1k_is_open_clips_names_and_templates_in_the_wordnet_order():
    spec = shipped("imagenet1k")
    assert spec.names == list(IMAGENET_CLASSNAMES)
    assert spec.keys == IMAGENET_WNIDS
    assert list(spec.templates) == [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert len(spec.templates) == 80 and all(len(p) == 80 for p in spec.prompts())


def test_imagenet1k_keeps_distinct_classes_that_share_a_name():
    """missile (n03773504) and projectile, missile (n04008634); sunglass and sunglasses."""
    spec = shipped("imagenet1k")
    for name, ids in {
        "missile": ("n03773504", "n04008634"),
        "sunglasses": ("n04355933", "n04356056"),
    }.items():
        assert [spec.keys[i] for i, n in enumerate(spec.names) if n == name] == list(ids)
        labels = [spec.index_of(i) for i in ids]
        assert labels[0] != labels[1] and all(spec.names[k] == name for k in labels)
        with pytest.raises(KeyError, match=f"{name!r} is shared by 2 classes"):
            spec.index_of(name)
    assert len(set(spec.keys)) == 1000


def test_mini_webvision_is_imagenet1ks_first_50_with_features():
    mini, full = shipped("mini-webvision"), shipped("imagenet1k")
    assert (mini.names, mini.keys) == (full.names[:50], full.keys[:50])
    assert mini.templates == full.templates


def test_red_mini_imagenet_is_mini_imagenet_in_its_loaders_order():
    spec = shipped("red-mini-imagenet")
    assert spec.keys == RED_MINI_IMAGENET
    assert sorted(spec.keys) == sorted(MINI_IMAGENET_WNIDS)
    name_of = dict(zip(IMAGENET_WNIDS, IMAGENET_CLASSNAMES, strict=True))
    assert spec.names == [name_of[w] for w in RED_MINI_IMAGENET]


def test_cifar_specs_match_the_datasets_label_names():
    cifar10, cifar100 = shipped("cifar10"), shipped("cifar100")
    assert cifar10.keys == CIFAR10 and cifar100.keys == CIFAR100
    assert cifar100.names == [c.replace("_", " ") for c in CIFAR100]  # what the prompts say
    assert list(cifar10.templates) == list(cifar100.templates) == CIFAR_TEMPLATES


def test_clothing1m_and_animal10n_match_their_label_order():
    assert shipped("clothing1m").keys == CLOTHING1M
    assert shipped("clothing1m").names[8] == "down coat"
    assert shipped("animal10n").names == ANIMAL10N_IMAGES


@pytest.mark.parametrize("name", SMALL_SPECS)
def test_small_specs_describe_every_class(name):
    """About seven visual features per class, each its own prompt, as the paper writes them."""
    spec = shipped(name)
    assert all(len(c.features) >= 7 for c in spec.classes)
    assert all(len(set(c.features)) == len(c.features) for c in spec.classes)
    for info, prompts in zip(spec.classes, spec.prompts(), strict=True):
        assert len(prompts) == len(info.features) and all(info.name in p for p in prompts)


@pytest.mark.parametrize(
    ("name", "pairs"),
    [
        ("animal10n", [("cat", "lynx"), ("wolf", "coyote"), ("cheetah", "jaguar")]),
        ("animal10n", [("chimpanzee", "orangutan"), ("hamster", "guinea pig")]),
        ("clothing1m", [("Knitwear", "Sweater"), ("Windbreaker", "Jacket")]),
        ("cifar10", [("cat", "dog"), ("automobile", "truck"), ("deer", "horse")]),
    ],
)
def test_known_confused_pairs_are_similar_to_each_other(name, pairs):
    spec = shipped(name)
    similar = spec.most_similar()
    for a, b in pairs:
        assert similar[spec.index_of(a)] == spec.index_of(b)
        assert similar[spec.index_of(b)] == spec.index_of(a)


def test_a_spec_round_trips_through_its_mapping():
    for name in shipped_spec_names():
        spec = shipped(name)
        assert ClassSpec.from_dict(spec.to_dict()) == spec


BAD_SPECS = {
    "duplicate name": ("classes: [cat, dog, cat]", "duplicate class name 'cat'"),
    "shared name, one id missing": (
        "classes: [{name: missile, id: n1}, {name: missile}]",
        "give each of them an `id`",
    ),
    "duplicate id": ("classes: [{name: a, id: x}, {name: b, id: x}]", "duplicate class id 'x'"),
    "not YAML": ("classes: [cat, dog\n", "not valid YAML at line"),
    "empty file": ("", "must be a mapping"),
    "a list": ("- cat\n- dog\n", "must be a mapping"),
    "no classes": ("classes: []", "has no classes"),
    "classes not a list": ("classes: cat", "'classes' must be a list"),
    "entry not a name": ("classes: [cat, 3]", "entry 1 must be a name"),
    "empty name": ("classes: [{name: ''}]", "name of class 0 must be a non-empty string"),
    "features not strings": ("classes: [{name: a, features: [1]}]", "features of class 0"),
    "similar_to unknown": ("classes: [{name: a, similar_to: b}]", "unknown class 'b'"),
    "similar_to itself": ("classes: [{name: a, similar_to: a}, b]", "similar_to itself"),
    "similar_to a shared name": (
        "classes: [{name: m, id: x}, {name: m, id: y}, {name: z, similar_to: m}]",
        "a name 2 classes share; use its id",
    ),
    "template without {c}": ("templates: ['a photo']\nclasses: [a]", "lacks the {c}"),
    "template with another field": ("templates: ['{c} {x}']\nclasses: [a]", "stray brace"),
    "stray brace": ("templates: ['a {c} }']\nclasses: [a]", "stray brace"),
    "feature template without {f}": ("feature_template: 'a {c}'\nclasses: [a]", "lacks the {f}"),
    "templates empty": ("templates: []\nclasses: [a]", "'templates' is empty"),
    "unknown key": ("classes: [a]\nprompts: [x]", "unknown key(s) prompts"),
    "unknown class key": ("classes: [{name: a, feature: [x]}]", "unknown key(s) feature"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_every_bad_spec_is_a_one_line_config_error(tmp_path, case):
    text, message = BAD_SPECS[case]
    path = tmp_path / "classes.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_class_spec(str(path))
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert str(path) in str(caught.value)
    with pytest.raises(ClassSpecError, match="class spec"):  # the library's own error
        ClassSpec.from_yaml_text(text)


def test_unreadable_specs_are_config_errors(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00")
    cases = {
        "no-such-spec": "class spec not found: no-such-spec (shipped specs: demo, animal10n",
        str(tmp_path / "missing.yaml"): "class spec not found",
        str(tmp_path): "cannot be read",
        str(tmp_path / "binary.yaml"): "not UTF-8 text",
    }
    for location, message in cases.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            load_class_spec(location)


def test_the_clean_job_stops_on_a_bad_spec_with_one_line_and_status_2(tmp_path):
    """Before any compute: the ImageNet duplicate without ids, from the command line."""
    shards = tmp_path / "shards"
    put(shards, "x.tar", b"")  # exists; never read
    spec = tmp_path / "classes.yaml"
    spec.write_text("classes: [missile, sunglasses, missile]\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.clean",
            f"data.input={shards}",
            f"data.classes={spec}",
            "model.name=tiny-clip-shapes",
            f"output={tmp_path / 'run'}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: class spec: duplicate class name 'missile' (classes 0, 2): give each of them "
        f"an `id` (e.g. its WordNet id) to keep both ({spec})"
    ]


def imagenet_synsets(root: Path, count: int = 1000) -> None:
    lemma = dict(
        line.split("\t")
        for line in pkgutil.get_data("timm.data", "_info/imagenet_synset_to_lemma.txt")
        .decode()
        .splitlines()
    )
    rows = [f"{w} {lemma[w]}" for w in IMAGENET_WNIDS[:count]]
    put(root, "info/synsets.txt", "\n".join(rows).encode())


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ("webvision", "imagenet1k"),
        ("mini-webvision", "mini-webvision"),
        ("clothing1m", "clothing1m"),
        ("animal10n", "animal10n"),
    ],
)
def test_native_layouts_write_the_shipped_spec(tmp_path, layout, expected):
    tree = LAYOUT_TREES[layout](tmp_path / "data")
    if "webvision" in layout:
        imagenet_synsets(tree.root)  # WebVision 1.0's own info/synsets.txt
    cfg = load_config(
        None, [*tree.overrides, f"input={tree.root}", f"output={tmp_path}/o"], MakeShardsConfig
    )
    listing = list_for(cfg)
    written = ClassSpec.from_yaml_text(listing_spec_yaml(listing, "anything"))
    assert written == shipped(expected)
    assert listing.class_names == written.names
    assert all(c.features for c in written.classes) or expected == "imagenet1k"


def test_webvision_without_synsets_uses_the_spec_and_other_orders_their_own(tmp_path):
    tree = LAYOUT_TREES["webvision"](tmp_path / "data")  # a synsets.txt of 60 other classes
    cfg = load_config(
        None, [*tree.overrides, f"input={tree.root}", f"output={tmp_path}/o"], MakeShardsConfig
    )
    listing = list_for(cfg)
    assert listing.spec is None and "standard order" in listing.note
    assert ClassSpec.from_yaml_text(listing_spec_yaml(listing, "wv")).names[0] == "name0"
    (tree.root / "info" / "synsets.txt").unlink()
    assert list_for(cfg).spec == "imagenet1k"
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"c{i}" for i in range(60)))
    own = list_for(cfg.model_copy(update={"class_names": str(names)}))
    assert own.spec is None and own.class_names[:2] == ["c0", "c1"]


def test_the_wheel_ships_every_spec(tmp_path):
    """pyproject's package-data puts cleaner/specs/*.yaml (and the demo's) in the package."""
    source = tmp_path / "src"
    for item in ("pyproject.toml", "README.md", "cleaner", "training", "jobs"):
        target = source / item
        if (REPO_ROOT / item).is_dir():
            subprocess.run(["cp", "-r", str(REPO_ROOT / item), str(target)], check=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((REPO_ROOT / item).read_bytes())
    build = (
        "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", build, str(tmp_path / "dist")],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = tmp_path / "dist" / done.stdout.strip().splitlines()[-1]
    names = set(zipfile.ZipFile(wheel).namelist())
    for spec in SPECS_DIR.glob("*.yaml"):
        assert f"cleaner/specs/{spec.name}" in names
    assert "cleaner/demo/shapes.yaml" in names
    data = yaml.safe_load(zipfile.ZipFile(wheel).read("cleaner/specs/imagenet1k.yaml"))
    assert len(data["classes"]) == 1000

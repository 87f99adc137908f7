"""A real run names its model and gets production defaults; the demo's are in its configs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cleaner.config import CleanJobConfig, ConfigError, load_config
from jobs.clean import main as clean_main
from jobs.common import run_main
from training.config import NETWORK_INPUT_SIZES, RECOMMENDED_MODE, TrainJobConfig
from training.networks import NETWORKS

REPO = Path(__file__).resolve().parent.parent
TRAIN = ["data.input=/x", "data.manifest=/m", "data.classes=cifar10", "run.storage=/s"]


def test_a_clean_job_without_a_model_stops_first_naming_model_name(tmp_path, capsys):
    """One line on stderr, exit status 2, before the shards are even looked at."""
    argv = [f"data.input={tmp_path / 'nowhere'}", "data.classes=demo", f"output={tmp_path}/o"]
    with pytest.raises(SystemExit) as stopped:
        run_main(lambda: clean_main(argv))
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: invalid config: model.name: Field required"]
    assert not (tmp_path / "o").exists()


def test_the_demo_configs_name_the_demo_model():
    for name in ("demo.yaml", "local-cluster.yaml"):
        cfg = load_config(REPO / "configs" / name, model=CleanJobConfig)
        assert cfg.model.name == "tiny-clip-shapes"


def test_the_config_for_real_data_is_production_shaped():
    with pytest.raises(ConfigError, match=r"data: Field required; output: Field required"):
        load_config(REPO / "configs" / "clean.yaml")
    cfg = load_config(
        REPO / "configs" / "clean.yaml",
        ["data.input=s3://b/train/", "data.classes=imagenet1k", "output=s3://b/runs/clean/"],
    )
    assert (cfg.model.name, cfg.model.pretrained) == ("ViT-B-32", "openai")
    assert cfg.scoring.gpus_per_actor == 1 and cfg.scoring.max_actors > 1
    assert cfg.selection.fit_mode == "auto" and cfg.selection.probe == "insample"
    assert cfg.selection.gmm_reg_covar == 1e-6


def test_train_defaults_are_production_ones():
    cfg = load_config(None, TRAIN, TrainJobConfig)
    assert cfg.mixfix.mode == RECOMMENDED_MODE == "mixfix_clip"
    assert cfg.data.image_size == NETWORK_INPUT_SIZES[cfg.network.name]
    sizes = {
        net: load_config(None, [*TRAIN, f"network.name={net}"], TrainJobConfig).data.image_size
        for net in NETWORKS
        if net != "clip_peft"  # its size is its CLIP's, and it needs network.clip
    }
    assert sizes["resnet50"] == 224 and sizes["inception_resnet_v2"] == 299
    assert sizes["preact_resnet18"] == 32
    given = load_config(
        None, [*TRAIN, "network.name=resnet50", "data.image_size=64"], TrainJobConfig
    )
    assert given.data.image_size == 64
    with pytest.raises(ConfigError, match=r"data\.classes: Field required"):
        load_config(None, [t for t in TRAIN if "classes" not in t], TrainJobConfig)
    with pytest.raises(ConfigError, match=r"network\.name: .*unknown network 'resnet18'"):
        load_config(None, [*TRAIN, "network.name=resnet18"], TrainJobConfig)


def test_every_network_has_an_input_size():
    assert set(NETWORK_INPUT_SIZES) == set(NETWORKS)


RESIZE_POSITION = {"score_shards": 7, "score_shard_sets": 6}


def test_benchmarks_pass_the_models_resize_to_score_shards():
    """score_shards without `resize` silently preprocesses with shortest/bicubic, whatever
    the model's preprocess_cfg says (benchmarks.throughput did)."""
    calls = []
    for path in [*(REPO / "benchmarks").glob("*.py"), *(REPO / "jobs").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            name = getattr(node.func, "id", None) if isinstance(node, ast.Call) else None
            if name in RESIZE_POSITION:  # resize's position among the positional arguments
                given = len(node.args) > RESIZE_POSITION[name] or any(
                    k.arg == "resize" for k in node.keywords
                )
                calls.append((path.name, given))
    assert {"throughput.py", "clean.py"} <= {name for name, _ in calls}
    assert all(given for _, given in calls), calls

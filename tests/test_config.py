"""Job configuration: YAML + key=value overrides, validated with messages that name the key."""

from __future__ import annotations

import pytest

from cleaner.config import CleanJobConfig, ConfigError, load_config

BASE = [
    "data.input=/tmp/shards",
    "data.classes=demo",
    "model.name=tiny-clip-shapes",
    "output=/tmp/out",
]


def test_overrides_are_parsed_as_yaml_into_nested_keys(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "data: {input: a, classes: demo}\nmodel: {name: tiny-clip-shapes}\noutput: o\n"
        "selection: {theta_cons: 0.9}\n"
    )
    cfg = load_config(path, ["selection.theta_cons=1.0", "scoring.max_actors=4", "resume=false"])
    assert isinstance(cfg, CleanJobConfig)
    assert cfg.selection.theta_cons == 1.0 and cfg.scoring.max_actors == 4 and cfg.resume is False
    assert cfg.data.input == "a"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("selection.theta_gmm=1.5", "selection.theta_gmm"),
        ("selection.theta_cons=-0.1", "selection.theta_cons"),
        ("selection.probe=sometimes", "selection.probe"),
        ("selection.gmm=perclass", "selection.gmm"),
        ("scoring.batchsize=3", "scoring.batchsize"),
        ("scoring.max_actors=0", "scoring.max_actors"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*BASE, override])


def test_missing_required_and_malformed_inputs():
    with pytest.raises(ConfigError, match="output"):
        load_config(None, ["data.input=x", "data.classes=demo"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, [*BASE, "selection.theta_gmm"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/job.yaml")


def test_fingerprint_changes_with_model_and_prompts():
    cfg = load_config(None, BASE)
    other = load_config(None, [*BASE, "model.name=ViT-B-32"])
    assert cfg.fingerprint("a") != other.fingerprint("a")
    assert cfg.fingerprint("a") != cfg.fingerprint("b")
    assert cfg.fingerprint("a") == load_config(None, [*BASE, "model.cache_dir=/x"]).fingerprint("a")

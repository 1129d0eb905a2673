"""Tests of unigrpo.config: nested dataclass configs from YAML + overrides, type coercion, errors that name
the bad key or value, dict round trips and atomic saving. The config classes here use
`from __future__ import annotations` on purpose (string annotations must resolve)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from unigrpo.config import (ConfigFileNotFoundError, check, config_from_dict, config_to_dict, load_config,
                            require_in, require_min, require_positive, require_range)
from unigrpo.io import write_text_atomic


@dataclass(frozen=True)
class ModelCfg:
    hidden: int = 128
    """width"""
    dropout: float = 0.0
    """dropout probability"""

    def __post_init__(self):
        require_positive("model.hidden", self.hidden)
        require_range("model.dropout", self.dropout, 0.0, 1.0)


@dataclass
class TrainCfg:
    lr: float = 1e-4
    """learning rate"""
    group_size: int = 8
    """samples per prompt"""
    sizes: tuple[int, ...] = (1, 2)
    """a tuple of ints"""
    pair: tuple[int, float] = (1, 2.0)
    """a fixed-length tuple"""
    backend: Literal["torch", "triton", "auto"] = "auto"
    """kernel backend"""
    seed: Optional[int] = None
    """random seed or None"""

    def __post_init__(self):
        require_min("train.group_size", self.group_size, 2)


@dataclass
class RootCfg:
    name: str = "tiny"
    """run name"""
    compile: bool = False
    """torch.compile the model"""
    model: ModelCfg = field(default_factory=ModelCfg)
    """model settings"""
    train: TrainCfg = field(default_factory=lambda: TrainCfg(group_size=4))
    """training settings"""
    tags: list[str] = field(default_factory=list)
    """free-form tags"""


def _yaml(tmp_path, data) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(p)


def test_defaults_and_nested_yaml_then_overrides(tmp_path):
    cfg = load_config(RootCfg)
    assert cfg == RootCfg() and cfg.train.group_size == 4  # field default_factory respected
    path = _yaml(tmp_path, {"name": "run1", "model": {"hidden": 64}, "train": {"lr": "3e-5"}})
    cfg = load_config(RootCfg, path, ["model.dropout=0.5", "train.lr=2e-4", "compile=true", "tags=[a, b]",
                                      "train.sizes=[3,4,5]", "train.backend=triton", "train.seed=7"])
    assert cfg.name == "run1" and cfg.model == ModelCfg(hidden=64, dropout=0.5)
    assert cfg.train.lr == 2e-4 and cfg.train.group_size == 4  # untouched nested field keeps its default
    assert cfg.compile is True and cfg.tags == ["a", "b"]
    assert cfg.train.sizes == (3, 4, 5) and cfg.train.backend == "triton" and cfg.train.seed == 7


def test_precedence_base_then_file_then_overrides(tmp_path):
    path = _yaml(tmp_path, {"model": {"hidden": 32}})
    cfg = load_config(RootCfg, path, ["name=x"], base={"name": "preset", "model": {"hidden": 16, "dropout": 0.1}})
    assert cfg.name == "x" and cfg.model.hidden == 32 and cfg.model.dropout == 0.1
    cfg = load_config(RootCfg, base=RootCfg(name="from-instance"))
    assert cfg.name == "from-instance"
    cfg = load_config(RootCfg, overrides=["model.dropout=0.2"], base={"model": ModelCfg(hidden=8)})
    assert cfg.model == ModelCfg(hidden=8, dropout=0.2)


def test_coercion():
    cfg = load_config(RootCfg, overrides=["model.dropout=0", "train.lr=1", "name=123", "train.seed=null",
                                          "train.pair=[2, 3]"])
    assert isinstance(cfg.model.dropout, float) and cfg.model.dropout == 0.0
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0
    assert cfg.name == "123"  # str field: the raw override text wins over YAML's int
    assert cfg.train.seed is None
    assert cfg.train.pair == (2, 3.0) and isinstance(cfg.train.pair[1], float)
    assert load_config(RootCfg, overrides=["name=2024-01-01"]).name == "2024-01-01"


@pytest.mark.parametrize("overrides, needles", [
    (["train.lr=abc"], ["train.lr: expected float, got 'abc'"]),
    (["model.hidden=12.5"], ["model.hidden: expected int, got 12.5"]),
    (["compile=1"], ["compile: expected bool", "1"]),
    (["train.backend=cuda"], ["train.backend", "'torch'", "'cuda'"]),
    (["train.seed=abc"], ["train.seed", "'abc'"]),
    (["train.pair=[1, 2, 3]"], ["train.pair", "2 items"]),
    (["train.sizes=[1, x]"], ["train.sizes[1]: expected int, got 'x'"]),
    (["model.hiden=3"], ["'model.hiden'", "hidden, dropout", "did you mean 'model.hidden'"]),
    (["nam=x"], ["'nam'", "did you mean 'name'"]),
    (["model=5"], ["model: expected a mapping for ModelCfg, got 5"]),
    (["train.lr"], ["malformed override 'train.lr'", "key=value"]),
    (["=3"], ["malformed override '=3'"]),
    (["model.hidden=0"], ["model.hidden must be > 0, got 0"]),
    (["train.group_size=1"], ["train.group_size must be >= 2, got 1"]),
])
def test_errors_name_the_key_and_value(overrides, needles):
    with pytest.raises(ValueError) as err:
        load_config(RootCfg, overrides=overrides)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_file_errors(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="nope.yaml"):
        load_config(RootCfg, missing)
    with pytest.raises(FileNotFoundError):
        load_config(RootCfg, missing)
    assert issubclass(ConfigFileNotFoundError, ValueError)
    with pytest.raises(ValueError, match="mapping at the top level, got list"):
        load_config(RootCfg, _yaml(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(RootCfg, _yaml(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ValueError, match="unknown key 'train.lrr'"):
        load_config(RootCfg, _yaml(tmp_path, {"train": {"lrr": 1.0}}))
    assert load_config(RootCfg, _yaml(tmp_path, "")) == RootCfg()  # an empty file is an empty mapping


def test_dict_round_trip_and_strictness():
    cfg = load_config(RootCfg, overrides=["model.hidden=48", "tags=[x]", "train.sizes=[5]", "train.seed=3"])
    d = config_to_dict(cfg)
    assert d["train"]["sizes"] == [5] and d["model"] == {"hidden": 48, "dropout": 0.0}
    assert yaml.safe_load(yaml.safe_dump(d)) == d
    assert config_from_dict(RootCfg, d) == cfg
    with pytest.raises(ValueError, match="unknown key 'extra'"):
        config_from_dict(RootCfg, {**d, "extra": 1})
    with pytest.raises(ValueError, match="train.lr: expected float"):
        config_from_dict(RootCfg, {"train": {"lr": "fast"}})


def save_config(cfg, path):
    """A config as YAML through the project's one atomic writer."""
    write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def test_save_config_is_atomic_and_loads_back(tmp_path, monkeypatch):
    cfg = load_config(RootCfg, overrides=["name=saved", "train.lr=5e-5"])
    path = tmp_path / "out.yaml"
    save_config(cfg, path)
    assert load_config(RootCfg, str(path)) == cfg
    # a failure at the final rename leaves the old file intact and no temp file behind
    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_config(RootCfg(name="other"), path)
    monkeypatch.undo()
    assert load_config(RootCfg, str(path)) == cfg
    assert sorted(os.listdir(tmp_path)) == ["out.yaml"]


def test_validation_helpers():
    check(True, "never")
    with pytest.raises(ValueError, match="^boom$"):
        check(False, "boom")
    with pytest.raises(ValueError, match=r"x.mode must be one of 'a', 'b'; got 'c'"):
        require_in("x.mode", "c", ("a", "b"))
    with pytest.raises(ValueError, match=r"x.p must be in \[0, 1\], got 2"):
        require_range("x.p", 2, 0, 1)


def test_loss_config_issue20_flow_fields():
    """loss.flow_clip_lo / flow_clip_hi (None = flow_clip) and loss.latent_kl_norm load from overrides and
    are validated with errors that name the field, the bad value and what was expected."""
    from unigrpo.losses.config import LossConfig
    from unigrpo.train_config import TrainConfig
    d = LossConfig()
    assert (d.flow_clip_lo, d.flow_clip_hi, d.latent_kl_norm) == (None, None, "project")
    cfg = load_config(TrainConfig, overrides=["loss.flow_clip_lo=1e-4", "loss.flow_clip_hi=3e-4",
                                              "loss.latent_kl_norm=flow_grpo"])
    assert (cfg.loss.flow_clip_lo, cfg.loss.flow_clip_hi, cfg.loss.latent_kl_norm) == (1e-4, 3e-4, "flow_grpo")
    assert load_config(TrainConfig, overrides=["loss.flow_clip_lo=null"]).loss.flow_clip_lo is None
    with pytest.raises(ValueError, match=r"loss.flow_clip_hi must be None \(= loss.flow_clip\) or >= 0, got -0.1"):
        LossConfig(flow_clip_hi=-0.1)
    with pytest.raises(ValueError, match=r"loss.latent_kl_norm must be one of .*'flow_grpo'.*got 'sum'"):
        LossConfig(latent_kl_norm="sum")


def test_train_config_issue20_advantage_fields():
    """adv_scope / adv_std / adv_clip / adv_group_by load from overrides; bad values name field and choices."""
    from unigrpo.train_config import TrainConfig
    d = TrainConfig()
    assert (d.adv_scope, d.adv_std, d.adv_clip, d.adv_group_by) == ("group", "population", 5.0, "group")
    cfg = load_config(TrainConfig, overrides=["adv_scope=none", "adv_std=sample", "adv_clip=null",
                                              "adv_group_by=prompt"])
    assert (cfg.adv_scope, cfg.adv_std, cfg.adv_clip, cfg.adv_group_by) == ("none", "sample", None, "prompt")
    for override, needle in (("adv_scope=global", r"adv_scope must be one of .*'none'.*got 'global'"),
                             ("adv_std=unbiased", r"adv_std must be one of .*'sample'.*got 'unbiased'"),
                             ("adv_clip=0", r"adv_clip must be > 0 or null .*got 0"),
                             ("adv_group_by=text", r"adv_group_by must be 'group' or 'prompt', got 'text'")):
        with pytest.raises(ValueError, match=needle):
            load_config(TrainConfig, overrides=[override])


def test_loss_config_issue20_loss_type():
    """loss.loss_type sets aggregation and the ratio level (docs/DESIGN.md table); gspo ranges default 3e-4/4e-4."""
    from unigrpo.losses.config import LossConfig
    from unigrpo.train_config import TrainConfig
    assert LossConfig().loss_type is None and LossConfig().ratio_level == "token"
    for name, agg, level in (("grpo", "sequence", "token"), ("bnpo", "token", "token"),
                             ("dr_grpo", "constant", "token"), ("dapo", "global", "token"),
                             ("gspo", "sequence", "sequence")):
        c = load_config(TrainConfig, overrides=[f"loss.loss_type={name}"]).loss
        assert (c.aggregation, c.ratio_level) == (agg, level)
    assert (LossConfig().gspo_eps_lo, LossConfig().gspo_eps_hi) == (3e-4, 4e-4)
    with pytest.raises(ValueError, match=r"loss.loss_type must be one of .*'gspo'.* or None, got 'ppo'"):
        LossConfig(loss_type="ppo")
    with pytest.raises(ValueError, match=r"loss.gspo_eps_hi must be >= 0, got -1"):
        LossConfig(gspo_eps_hi=-1.0)


def test_loss_config_kl_bias_correction():
    """loss.kl_bias_correction (TRL's use_bias_correction_kl) defaults to false and loads from an override."""
    from unigrpo.losses.config import LossConfig
    from unigrpo.train_config import TrainConfig
    assert LossConfig().kl_bias_correction is False
    cfg = load_config(TrainConfig, overrides=["loss.kl_bias_correction=true", "loss.kl_coef=0.04"])
    assert cfg.loss.kl_bias_correction is True and cfg.loss.kl_coef == 0.04

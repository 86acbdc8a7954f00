"""Typed config: YAML + dotted overrides, validation before anything heavy, helpful errors."""
import pytest
import yaml

from llm2clip.config import ConfigError, load_config, save_config
from llm2clip.schema import Stage1Config

BASE = ["text.model_path=/m", "data.sources=[{path: /d/*.tar}]"]


def test_yaml_and_overrides_merge(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"optim": {"lr": 1e-3}, "text": {"model_path": "/x"},
                                 "data": {"sources": [{"path": "/d/*.tar", "weight": 2}]}}))
    cfg = load_config(Stage1Config, p, ["optim.lr=2e-4", "lora.r=8", "train.zero_stage=2"])
    assert cfg.optim.lr == pytest.approx(2e-4)  # override wins over the file
    assert cfg.lora.r == 8 and cfg.train.zero_stage == 2
    assert cfg.data.sources[0].weight == 2.0 and cfg.data.sources[0].kind == "shards"
    assert cfg.lora.alpha == 32 and cfg.loss.temperature == 0.02  # paper defaults


def test_unknown_key_names_key_and_suggests(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(Stage1Config, p, BASE)
    msg = str(e.value)
    assert "optim.lrr" in msg and "optim.lr" in msg and str(p) in msg


def test_unknown_override_and_section():
    with pytest.raises(ConfigError, match=r"lora\.rank.*Did you mean 'lora\.r"):
        load_config(Stage1Config, None, BASE + ["lora.rank=4"])
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer'.*optim"):
        load_config(Stage1Config, None, BASE + ["optimizer.lr=1"])


def test_type_and_choice_errors():
    with pytest.raises(ConfigError, match=r"train\.max_steps.*integer"):
        load_config(Stage1Config, None, BASE + ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match=r"text\.pooling.*not one of"):
        load_config(Stage1Config, None, BASE + ["text.pooling=median"])
    with pytest.raises(ConfigError, match=r"loss.*temperature must be > 0"):
        load_config(Stage1Config, None, BASE + ["loss.temperature=0"])
    with pytest.raises(ConfigError, match="model_path"):
        load_config(Stage1Config, None, ["data.sources=[{path: /d}]"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Stage1Config, None, BASE + ["lora.r"])


@pytest.mark.parametrize("key", ["train.max_steps", "optim.lr", "optim.betas", "train.zero_stage"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ".nan", ".inf"])
def test_nan_and_inf_are_config_errors_naming_the_key(key, value):
    v = f"[0.9, {value}]" if key == "optim.betas" else value
    with pytest.raises(ConfigError, match=rf"{key}.*finite"):
        load_config(Stage1Config, None, BASE + [f"{key}={v}"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found.*nope.yaml"):
        load_config(Stage1Config, tmp_path / "nope.yaml")


def test_resolved_config_roundtrips(tmp_path):
    cfg = load_config(Stage1Config, None, BASE + ["optim.lr=3e-4"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(Stage1Config, tmp_path / "resolved.yaml")
    assert again == cfg


def test_cli_rejects_bad_key_before_model_load(tmp_path):
    from tests.helpers import ROOT, run_cmd
    p = run_cmd(["python", str(ROOT / "tools/train_stage1.py"), "--set", "text.model_path=/m",
                 "--set", "data.sources=[{path: /d}]", "--set", "optim.lrr=1"], check=False, timeout=60)
    assert p.returncode != 0 and "optim.lrr" in p.stderr + p.stdout and "optim.lr" in p.stderr + p.stdout


def test_every_shipped_config_validates():
    """configs/**.yaml are documentation users copy: they must stay valid as the schema evolves."""
    from tests.helpers import ROOT
    from llm2clip.schema_embed import EmbedConfig
    from llm2clip.schema_eval import EvalConfig
    from llm2clip.schema_baseline import ClipBaselineConfig
    from llm2clip.schema_stage2 import Stage2Config
    kinds = {"stage1": Stage1Config, "embed": EmbedConfig, "stage2": Stage2Config, "eval": EvalConfig,
             "clip_baseline": ClipBaselineConfig}
    files = sorted((ROOT / "configs").rglob("*.yaml"))
    assert len(files) >= 7
    for f in files:
        cls = next(c for k, c in kinds.items() if f.name.startswith(k))
        load_config(cls, f)


def test_sidecar_location_required_only_where_sidecars_are_read():
    from llm2clip.schema_baseline import ClipBaselineConfig
    from llm2clip.schema_embed import EmbedConfig
    from llm2clip.schema_stage2 import Stage2Config

    with pytest.raises(ConfigError, match=r"data\.sidecar\.out_dir .* data\.sidecar\.suffix"):
        load_config(Stage2Config, None, ["data.shards=x.tar", "vision.path=v"])
    with pytest.raises(ConfigError, match=r"output\.out_dir .* output\.suffix"):
        load_config(EmbedConfig, None, ["data.shards=x.tar", "text.model_path=m"])
    # online mode embeds captions in the loop and the baseline reads captions: no sidecar key to set
    load_config(Stage2Config, None, ["data.shards=x.tar", "vision.path=v", "text.mode=online",
                                     "text.encoder.model_path=m"])
    load_config(ClipBaselineConfig, None, ["data.shards=x.tar", "model.path=m"])


def test_bare_on_off_choices_survive_yaml(tmp_path):
    """YAML 1.1 reads a bare `off` / `on` as a boolean: `text.packing: off` (as the docs write it) must mean
    "off", from a file and from --set alike; other boolean values of a choice key stay errors."""
    p = tmp_path / "c.yaml"
    p.write_text("text:\n  packing: off\n")
    assert load_config(Stage1Config, str(p), BASE).text.packing == "off"
    assert load_config(Stage1Config, None, BASE + ["text.packing=on"]).text.packing == "on"
    assert load_config(Stage1Config, None, BASE + ["text.packing=off"]).text.packing == "off"
    with pytest.raises(ConfigError, match=r"text\.pooling.*not one of"):
        load_config(Stage1Config, None, BASE + ["text.pooling=off"])

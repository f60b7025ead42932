import pytest

from svdtrain.recipes.config import CONFIG_DIR, ConfigError, RunConfig, load_config, parse_overrides


def test_defaults_are_the_quick_recipe_file():
    assert load_config("quick") == RunConfig()
    assert load_config() == RunConfig()


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_every_config_file_is_valid(path):
    cfg = load_config(str(path))
    assert cfg.name == path.stem


def test_overrides_are_typed():
    cfg = load_config("quick", ["lr=3e-4", "augment=false", "exclude_modules=[\"fc\", \"conv1\"]", "model=lenet5",
                                "milestones=[0.5]", "train_epochs=7", "energy=0"])
    assert (cfg.lr, cfg.augment, cfg.exclude_modules, cfg.model) == (3e-4, False, ("fc", "conv1"), "lenet5")
    assert cfg.milestones == (0.5,) and cfg.train_epochs == 7 and cfg.energy == 0.0
    assert load_config(None, ["exclude_modules=fc"]).exclude_modules == ("fc",)
    assert load_config(None, ["latency_backends=compiled", "latency_batches=[1, 8]"]).latency_backends == ("compiled",)
    assert load_config(None, ["latency_batches=[1, 8]"]).latency_batches == (1, 8)


@pytest.mark.parametrize("override, message", [
    ("lamda_s=0.1", "unknown config key 'lamda_s'; did you mean 'lambda_s'"),
    ("lambda_s=-1", "'lambda_s': got -1; allowed: ≥ 0"),
    ("energy=1", "'energy': got 1; allowed: ≥ 0 and < 1"),
    ("energy=nan", "'energy'"),
    ("lr=fast", "'lr': got 'fast'; allowed: a number > 0"),
    ("model=vgg", "'model': got 'vgg'; allowed: resnet20"),
    ("data=mnist", "allowed: fashion_mnist"),
    ("train_epochs=1.5", "'train_epochs': got 1.5; allowed: an integer ≥ 0"),
    ("augment=yes", "'augment': got 'yes'; allowed: true or false"),
    ("sparsity=l2", "allowed: l1, hoyer, hoyer_square"),
    ("milestones=[1.5]", "milestones"),
    ("latency_backends=[\"eager\", \"tvm\"]", "'latency_backends': got ['eager', 'tvm']; allowed: eager, compiled, onnxruntime"),
    ("latency_batches=[1, 0]", "'latency_batches': got [1, 0]; allowed: ≥ 1"),
    ("distill=1.5", "'distill': got 1.5; allowed: ≥ 0 and ≤ 1"),
    ("noequals", "expected key=value"),
])
def test_bad_overrides_name_the_key_and_what_is_allowed(override, message, observed):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert message in str(error.value)
    observed("Config values", f"`{override}`", f"ConfigError: `{str(error.value)[:200]}`")


def test_conflicting_budgets(observed):
    with pytest.raises(ConfigError, match="at most one") as e:
        RunConfig(prune_flops=0.3, prune_params=0.3)
    observed("Config values", "`prune_flops=0.3 prune_params=0.3`", f"ConfigError: `{e.value}`")
    with pytest.raises(ConfigError, match="target_speedup and prune_flops are all set"):
        RunConfig(prune_flops=0.3)  # beside the default speed target: RunConfig.replace clears it, the bare class not
    with pytest.raises(ConfigError, match=r"allowed: > 1"):
        RunConfig(target_speedup=0.9)
    with pytest.raises(ConfigError, match="needs export_strategy=latency"):
        RunConfig(export_strategy="flops")
    assert RunConfig().replace(export_strategy="flops", prune_flops=0.4).target_speedup == 0.0


def test_gradual_cuts_need_a_budget(observed):
    with pytest.raises(ConfigError, match="prune_cuts=4 needs a budget") as e:
        RunConfig(prune_cuts=4, target_speedup=0.0)
    observed("Config values", "`prune_cuts=4` without a budget", f"ConfigError: `{e.value}`")
    assert RunConfig(prune_cuts=4, target_speedup=0.0, prune_params=0.3).prune_cuts == 4
    assert RunConfig(method="trp").prune_cuts == 8  # an svd knob the baselines ignore: the defaults stay valid


def test_the_knob_a_user_names_wins_over_a_default_budget(tmp_path):
    base = RunConfig()
    assert (base.target_speedup, base.prune_flops, base.prune_cuts) == (1.9, 0.0, 8)  # the quick recipe
    by_energy = base.replace(energy=0.2)  # e.g. `svdtrain prune RUN energy=0.2`
    assert (by_energy.energy, by_energy.target_speedup, by_energy.prune_cuts) == (0.2, 0.0, 0)
    by_params = base.replace(prune_params=0.3)
    assert (by_params.prune_params, by_params.target_speedup, by_params.prune_cuts) == (0.3, 0.0, 8)
    assert by_params.replace(target_speedup=1.5).prune_params == 0.0
    config = tmp_path / "paper.toml"
    config.write_text("energy = 0.01\n")
    paper = load_config(str(config))
    assert (paper.target_speedup, paper.prune_flops, paper.prune_cuts, paper.energy) == (0.0, 0.0, 0, 0.01)
    assert load_config(str(config), ["prune_flops=0.5"]).prune_flops == 0.5  # the last named knob wins


def test_config_files_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = [unclosed")
    with pytest.raises(ConfigError, match="not a readable TOML"):
        load_config(str(bad))
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("epochs = 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'epochs'"):
        load_config(str(unknown))
    with pytest.raises(ConfigError, match="quick"):
        load_config("no_such_recipe")


def test_round_trip_through_json():
    import json

    cfg = load_config("cifar10_resnet56_spatial")
    assert RunConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert parse_overrides(["name=x y"]) == {"name": "x y"}


def test_config_reference_is_the_config():
    """docs/CONFIG.md's table of config keys is generated from RunConfig's fields: every key once, with its
    default, what is allowed and a meaning, and the file holds exactly that text."""
    import dataclasses
    from pathlib import Path

    from svdtrain.recipes.config import reference

    text = reference()
    rows = text.splitlines()[2:]
    assert [row.split("`")[1] for row in rows] == [f.name for f in dataclasses.fields(RunConfig)]
    assert all(len(row.split(" | ")) == 4 and not row.endswith("|  |") for row in rows)  # no empty meaning
    assert '| `export_backend` | `"onnxruntime"` | eager, eager_prepared, compiled, onnxruntime, cuda |' in text
    assert "| `latency_batches` | `[1, 32]` | a list of integers ≥ 1 |" in text
    doc = (Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md").read_text()
    start, end = "<!-- config-reference:start -->\n", "\n<!-- config-reference:end -->"
    assert doc[doc.index(start) + len(start):doc.index(end)] == text, (
        "docs/CONFIG.md's config reference is stale: python -c 'from svdtrain.recipes.config import write_reference; "
        "write_reference()'")

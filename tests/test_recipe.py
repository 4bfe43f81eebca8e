"""Recipe validation, overrides and schedule resolution."""

import pytest

from clcli.errors import RecipeError
from clcli.recipe import load_recipe, recipe_names, validate_recipe
from clcli.schedules import steps_for_epochs


def test_builtin_recipes_validate_and_fill_defaults():
    assert "simclr" in recipe_names() and "simclr-imagenet" in recipe_names()
    for name in recipe_names():
        r = load_recipe(name)
        d = r.to_dict()
        assert set(d) >= {"data", "views", "model", "method", "optim", "trainer", "eval"}
    r = load_recipe("simclr")
    assert r.method.temperature == 0.5  # from the recipe
    assert r.method.projector == [512, 128]
    assert r.views.groups[0].blur_p == 0.0  # no blur at 32 px
    assert r.model.backbone.cifar_stem is True
    imagenet = load_recipe("simclr-imagenet")
    assert imagenet.method.temperature == 0.1 and imagenet.optim.name == "lars"


def test_unknown_key_names_dotted_path_and_allowed_keys():
    with pytest.raises(RecipeError) as e:
        validate_recipe({"optim": {"lrr": 0.1}, "method": {"name": "simclr"}})
    msg = str(e.value)
    assert "optim.lrr" in msg and "unknown key" in msg and "weight_decay" in msg


def test_wrong_type_and_literal_list_allowed_values():
    with pytest.raises(RecipeError) as e:
        validate_recipe({"optim": {"name": "adam", "lr": "fast"}, "method": {"name": "simclr"}})
    msg = str(e.value)
    assert "optim.name" in msg and "'sgd'" in msg and "'lars'" in msg
    assert "optim.lr" in msg and "'fast'" in msg


def test_method_section_validated_by_its_own_class():
    with pytest.raises(RecipeError) as e:
        validate_recipe({"method": {"name": "simclr", "temperature": -1, "bogus": 3}})
    msg = str(e.value)
    assert "method.temperature" in msg and "method.bogus" in msg
    with pytest.raises(RecipeError) as e:
        validate_recipe({"method": {"name": "nosuchmethod"}})
    assert "simclr" in str(e.value)


def test_set_overrides_are_applied_and_validated():
    r = load_recipe(
        "simclr", ["trainer.epochs=1", "optim.lr=0.5", "views.groups.0.size=16", "method.projector=[64, 8]"]
    )
    assert (
        r.trainer.epochs == 1 and r.optim.lr == 0.5 and r.views.groups[0].size == 16 and r.method.projector == [64, 8]
    )
    with pytest.raises(RecipeError, match="trainer.epochs"):
        load_recipe("simclr", ["trainer.epochs=-3"])
    with pytest.raises(RecipeError, match="trainer.nope"):
        load_recipe("simclr", ["trainer.nope=1"])
    with pytest.raises(RecipeError, match="section.key=value"):
        load_recipe("simclr", ["trainer.epochs"])
    with pytest.raises(RecipeError, match="index"):
        load_recipe("simclr", ["views.groups.5.size=3"])


def test_unknown_recipe_lists_builtins(tmp_path):
    with pytest.raises(RecipeError, match="simclr"):
        load_recipe("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_digest_changes_with_content():
    a, b = load_recipe("simclr"), load_recipe("simclr", ["optim.lr=0.1"])
    assert a.digest() == load_recipe("simclr").digest() and a.digest() != b.digest()


def test_epoch_points_keep_their_fraction_in_short_runs():
    # 10 warm-up epochs of a 200-epoch schedule in a 1-epoch run of 390 steps: 5% of the run
    assert steps_for_epochs(10, 390, 1, 200) == round(10 / 200 * 390)
    # a run as long as the reference takes the points as they are
    assert steps_for_epochs(10, 390, 200, 200) == 3900
    assert steps_for_epochs(10, 390, 300, 200) == 3900
    assert steps_for_epochs(10, 390, 1, None) == 3900

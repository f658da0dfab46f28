import pytest

from hedging_utils.profiles import (
    PROFILES, ParameterError, check_choice, check_positive, check_probability, check_seed, figures_dir, resolve_profile,
)


def test_default_profile_is_small():
    assert resolve_profile().name == "small"


def test_profile_from_environment(monkeypatch):
    monkeypatch.setenv("HEDGING_PROFILE", "ci")
    assert resolve_profile().name == "ci"
    assert resolve_profile("paper").name == "paper"  # an explicit parameter wins


def test_unknown_profile_names_the_parameter_and_the_choices():
    with pytest.raises(ParameterError, match=r"profile='fast'.*\['ci', 'paper', 'small'\]"):
        resolve_profile("fast")


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "high", None])
def test_probability_outside_unit_interval(value):
    with pytest.raises(ParameterError, match=r"p_f2=.*\[0, 1\]"):
        check_probability("p_f2", value)


def test_probability_bounds_are_inclusive():
    assert check_probability("p", 0) == 0.0 and check_probability("p", 1) == 1.0


def test_other_checks_name_the_parameter():
    with pytest.raises(ParameterError, match="seed=-1"):
        check_seed("seed", -1)
    with pytest.raises(ParameterError, match="init='zeros'"):
        check_choice("init", "zeros", ["true_features", "random"])
    for value in (0, -1.0, "big"):
        with pytest.raises(ParameterError, match=f"btk_init_norm={value!r}"):
            check_positive("btk_init_norm", value)
    assert check_positive("btk_init_norm", 0.5) == 0.5


def test_profiles_only_change_numbers():
    fields = {tuple(sorted(p.to_dict())) for p in PROFILES.values()}
    assert len(fields) == 1
    assert {tuple(sorted(p.llm.__dataclass_fields__)) for p in PROFILES.values()} == {tuple(sorted(PROFILES["ci"].llm.__dataclass_fields__))}
    assert PROFILES["paper"].toy_steps == 24_415 and PROFILES["paper"].toy_batch_size == 500  # the authors' toy runs
    assert PROFILES["paper"].balance_steps == 24_415 and PROFILES["paper"].balance_batch_size == 128
    assert PROFILES["paper"].hedging_toy_steps == 24_415 and PROFILES["paper"].seeds == 4
    assert PROFILES["small"].toy_steps == PROFILES["paper"].toy_steps


def test_figures_dir_keeps_small_figures_separate(monkeypatch):
    monkeypatch.delenv("HEDGING_FIGURES_DIR")
    assert figures_dir(PROFILES["small"]).name == "figures"
    assert figures_dir(PROFILES["ci"]).parts[-2:] == ("figures", "ci")


def test_matryoshka_llm_scale_checks_levels_k_and_multipliers():
    import dataclasses
    from hedging_utils.profiles import PROFILES
    paper = PROFILES["paper"].matryoshka_llm
    assert paper.levels == [128, 512, 2048, 8192, 32768]  # the authors' experiments/train_btk_balanced_4x_matryoshka_saes.py
    for profile in PROFILES.values():
        levels = profile.matryoshka_llm.levels
        assert levels[-1] == profile.matryoshka_llm.width and levels == sorted(set(levels))
    with pytest.raises(ParameterError, match="width=100 .*at least 256"):
        dataclasses.replace(paper, width=100)
    with pytest.raises(ParameterError, match="multipliers=.*include 0"):
        dataclasses.replace(paper, multipliers=(0.25, 0.5, 1.0))
    with pytest.raises(ParameterError, match="k=0"):
        dataclasses.replace(paper, k=0)


@pytest.mark.parametrize("name", ["ci", "small", "paper"])
def test_a_profiles_record_holds_every_scales_derived_values(name):
    """A figure records ``Profile.to_dict``; the code of ``profiles`` is left out of its code version
    (``cache.NOT_IN_CODE_VERSION``), so every value a scale derives must be in the record."""
    profile = resolve_profile(name)
    record = profile.to_dict()
    for key, value in vars(profile).items():
        for attr, member in vars(type(value)).items() if hasattr(value, "to_dict") else ():
            if isinstance(member, property):
                assert record[key][attr] == getattr(value, attr), f"{key}.{attr}"


def test_width_seeds_gives_the_widest_one_seed_where_the_profile_says_so():
    from hedging_utils.profiles import CI_LLM, SMALL_LLM
    assert SMALL_LLM.width_seeds(512, 3) == [3, 4]
    assert SMALL_LLM.width_seeds(SMALL_LLM.one_seed_from, 3) == [3]
    assert SMALL_LLM.width_seeds(max(SMALL_LLM.widths)) == [0]
    assert CI_LLM.one_seed_from is None and CI_LLM.width_seeds(max(CI_LLM.widths)) == list(range(CI_LLM.seeds))


def test_an_ablation_starts_the_decoder_bias_the_other_way():
    from hedging_utils.profiles import B_DEC_INITS, other_b_dec_init
    assert {other_b_dec_init(init) for init in B_DEC_INITS} == set(B_DEC_INITS)
    assert other_b_dec_init("mean") == "zeros" and other_b_dec_init("zeros") == "mean"
    with pytest.raises(ParameterError, match="b_dec_init"):
        other_b_dec_init("median")

"""The one build configuration: every shipped profile loads, overrides apply in order, mistakes are clear."""

from __future__ import annotations

from importlib import resources

import pytest

from assistant.cli import make_parser
from core.config import PROFILES, ConfigError, describe_fields, load_config


@pytest.mark.parametrize("profile", PROFILES)
def test_every_shipped_profile_loads_and_validates(profile):
    cfg = load_config(profile)
    assert cfg.profile == profile
    assert cfg.chunk.max_tokens <= 256, "chunks must fit all-MiniLM-L6-v2's 256-token input"
    assert cfg.chunk.overlap_tokens < cfg.chunk.max_tokens


def test_profile_files_match_the_profile_list():
    shipped = sorted(p.name[:-5] for p in resources.files("core").joinpath("profiles").iterdir()
                     if p.name.endswith(".yaml"))
    assert shipped == sorted(PROFILES)


def test_file_then_set_overrides_apply_in_order(tmp_path):
    f = tmp_path / "cfg.yaml"
    f.write_text("llm:\n  max_steps: 7\n  lora_r: 4\nretrieval:\n  top_k: 6\n")
    cfg = load_config("tiny", f, ["llm.max_steps=3", "embedder.finetune=false",
                                  "llm.target_modules=q_proj,v_proj"])
    assert (cfg.llm.max_steps, cfg.llm.lora_r, cfg.retrieval.top_k) == (3, 4, 6)
    assert cfg.embedder.finetune is False
    assert cfg.llm.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("item, message", [
    ("llm.max_stepz=3", "unknown config key 'llm.max_stepz'"),
    ("llm.max_steps=three", "llm.max_steps: expected int"),
    ("llm.max_steps=2.5", "llm.max_steps: expected int"),
    ("embedder.finetune=maybe", "expected true/false"),
    ("llm=3", "expected a mapping"),
    ("no-equals-sign", "--set expects key=value"),
])
def test_bad_overrides_fail_with_a_clear_message(item, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config("tiny", None, [item])


def test_every_field_is_documented_and_help_is_generated_from_it(capsys):
    rows = describe_fields()
    assert rows and all(help_text for _, _, help_text in rows)
    with pytest.raises(SystemExit):
        make_parser().parse_args(["build", "--help"])
    out = capsys.readouterr().out
    for key, _, _ in rows:
        assert key in out


def test_every_ranged_key_exists_and_every_profile_lies_within_the_ranges():
    from core.config import RANGES

    keys = {k for k, _, _ in describe_fields()}
    assert set(RANGES) <= keys
    for profile in PROFILES:
        load_config(profile)  # raises on a value out of range


@pytest.mark.parametrize("setting, message", [
    ("chunk.max_tokens=-5", "chunk.max_tokens: -5 is out of range; allowed: at least 8"),
    ("retrieval.bm25_b=1.5", "retrieval.bm25_b: 1.5 is out of range; allowed: from 0 to 1"),
    ("llm.lora_r=0", "llm.lora_r: 0 is out of range; allowed: from 1 to 512"),
])
def test_a_value_out_of_range_is_refused_naming_the_key_and_the_range(setting, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", None, [setting])
    assert str(err.value) == message


def test_help_shows_each_settings_range():
    text = make_parser().format_help() + make_parser()._subparsers._group_actions[0].choices["build"].format_help()
    assert "chunk.max_tokens = 250  (at least 8)" in text

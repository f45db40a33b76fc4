"""The one config home: the variable registry, the README table, env binding and parsing."""

from __future__ import annotations

import re
from pathlib import Path

import dagster as dg
import pytest

from pipelines import config
from pipelines.config import VARIABLES, ConfigError, resources_from_env
from pipelines.resources import (
    CivitaiResource,
    EncoderResource,
    MediaResource,
    PipelineResources,
    PreferencesResource,
    WarehouseResource,
)

ROOT = Path(__file__).resolve().parents[2]
INT_ENV_VAR = type(dg.EnvVar.int("_"))


@pytest.fixture
def clean_env(monkeypatch):
    """No registered variable set (the developer's shell may have some)."""
    for variable in VARIABLES:
        monkeypatch.delenv(variable.name, raising=False)
    return monkeypatch


def readme_table() -> dict[str, str]:
    """variable → default cell of the README's configuration table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.fullmatch(r"\| `([A-Z0-9_]+)` \| .* \| (.*) \|", line.strip())
        if match:
            assert match.group(1) not in rows, f"{match.group(1)} twice in the README"
            rows[match.group(1)] = match.group(2).strip()
    return rows


def test_readme_table_is_the_registry_both_ways():
    documented = readme_table()
    registered = {v.name: v.default_text for v in VARIABLES}
    assert len(documented) >= 20  # the table was found and parsed
    missing = sorted(set(registered) - set(documented))
    unknown = sorted(set(documented) - set(registered))
    assert not missing, f"registered but not in the README: {missing}"
    assert not unknown, f"in the README but not registered: {unknown}"
    wrong = {n: (documented[n], d) for n, d in registered.items() if documented[n] != d}
    assert not wrong, f"README default differs from the registry (README, registry): {wrong}"


def test_readme_source_lists_every_source():
    source = next(v for v in VARIABLES if v.name == "IMAGEGEM_SOURCE")
    for name in ("sample", "release", "civitai"):
        assert f"`{name}`" in source.meaning


def test_registry_binds_real_fields_with_the_fields_defaults():
    classes = {
        "warehouse": WarehouseResource,
        "civitai": CivitaiResource,
        "media": MediaResource,
        "encoder": EncoderResource,
        "preferences": PreferencesResource,
    }
    assert {v.resource for v in VARIABLES} - {None} == set(classes)
    for variable in VARIABLES:
        if variable.resource is None:
            assert variable.field is None
            continue
        fields = classes[variable.resource].model_fields
        assert variable.field in fields, variable.name
        assert variable.default == fields[variable.field].default
    assert len({(v.resource, v.field) for v in VARIABLES if v.resource}) == len(
        [v for v in VARIABLES if v.resource]
    )  # no field bound twice
    assert len({v.name for v in VARIABLES}) == len(VARIABLES)


def test_plain_values_parsed_and_unset_ones_default(clean_env, tmp_path):
    clean_env.setenv("IMAGEGEM_HOME", str(tmp_path))
    clean_env.setenv("IMAGEGEM_MAX_BROWSING_LEVEL", "3")
    clean_env.setenv("CIVITAI_RATE_LIMIT", "0")
    clean_env.setenv("IMAGEGEM_MEDIA_MAX_SIDE", "256")
    clean_env.setenv("IMAGEGEM_DEVICE", "cuda:1")
    clean_env.setenv("IMAGEGEM_RELEASE_PATH", "")  # empty counts as unset
    plain = resources_from_env(bind_env_vars=False)
    assert plain.warehouse.home == str(tmp_path)
    assert plain.warehouse.max_browsing_level == 3
    assert plain.civitai.rate_limit == 0
    assert plain.media.max_side == 256
    assert plain.encoder.device == "cuda:1"
    assert plain.warehouse.release_path is None
    assert plain.warehouse.source == "sample" and plain.media.max_images == 2000


def test_bound_values_are_env_vars_and_unset_ones_defaults(clean_env):
    clean_env.setenv("IMAGEGEM_USER_SALT", "pepper")
    clean_env.setenv("IMAGEGEM_SAMPLE_USERS", "40")
    clean_env.setenv("CIVITAI_API_TOKEN", "secret-token")
    bound = resources_from_env()
    assert isinstance(bound.warehouse.user_salt, dg.EnvVar)
    assert bound.warehouse.user_salt.env_var_name == "IMAGEGEM_USER_SALT"
    assert isinstance(bound.civitai.api_token, dg.EnvVar)
    assert isinstance(bound.warehouse.sample_users, INT_ENV_VAR)
    assert not isinstance(bound.warehouse.home, dg.EnvVar)  # unset: the plain default
    assert bound.warehouse.home == "./data"
    # the UI renders resource config from these values: the secret itself is nowhere in them
    assert "secret-token" not in repr(bound.civitai._get_non_default_public_field_values())


def test_a_bad_integer_names_its_variable(clean_env):
    clean_env.setenv("IMAGEGEM_MEDIA_MAX_IMAGES", "lots")
    for bind in (False, True):
        with pytest.raises(ConfigError, match="IMAGEGEM_MEDIA_MAX_IMAGES='lots'"):
            resources_from_env(bind_env_vars=bind)


def test_crawl_start_and_log_level(clean_env):
    assert config.crawl_start() == config.DEFAULT_CRAWL_START
    clean_env.setenv("IMAGEGEM_CRAWL_START", "2026-06-01")
    assert config.crawl_start() == "2026-06-01"
    assert config.log_level() == "WARNING"
    clean_env.setenv("IMAGEGEM_LOG_LEVEL", "info")
    assert config.log_level() == "INFO"


def test_unregistered_variables_are_refused():
    with pytest.raises(KeyError, match="not a registered variable"):
        config.env("IMAGEGEM_TYPO")
    with pytest.raises(KeyError, match="IMAGEGEM_TYPO"):
        config.environment_for({"IMAGEGEM_TYPO": "1"})


def test_resources_build_with_plain_values():
    resources = PipelineResources(
        WarehouseResource(home="/h", source="release", release_path="/r"),
        CivitaiResource(base_url="http://127.0.0.1:1", rate_limit=0),
        MediaResource(image_base_url="http://img"),
    )
    assert set(resources.as_dict()) == {"warehouse", "civitai", "media", "encoder", "preferences"}
    assert resources.warehouse.release_root() == "/r"
    assert resources.media.image_url_map(resources.civitai.base_url) == {
        "https://image.civitai.com": "http://img"
    }
    assert MediaResource().image_url_map("http://site") == {
        "https://image.civitai.com": "http://site"
    }
    assert MediaResource().image_url_map(None) == {}
    with pytest.raises(ValueError, match="IMAGEGEM_SOURCE='nope'"):
        WarehouseResource(source="nope").release_root()


ENV_READ = re.compile(r"os\.environ|os\.getenv|EnvVar(\.int)?\(")
ALLOWED = {
    "pipelines/config.py",  # the one reader
    "pipelines/bench.py",  # passes the whole environment to its child (`**os.environ`)
}


def test_no_other_module_reads_the_environment():
    offenders = []
    for home in ("pipelines", "assets", "warehouse", "ml"):
        for path in sorted((ROOT / home).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in ALLOWED:
                continue
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                if ENV_READ.search(line) and not line.lstrip().startswith("#"):
                    offenders.append(f"{rel}:{lineno}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_bench_only_passes_the_environment_through():
    """The benchmark hands the environment to its child processes whole (``**os.environ`` or
    ``dict(os.environ)``); it never reads a variable itself."""
    lines = [
        ln.strip()
        for ln in (ROOT / "pipelines" / "bench.py").read_text().splitlines()
        if "os.environ" in ln
    ]
    assert lines
    reads = [
        ln
        for ln in lines
        if "os.environ" in re.sub(r"\*\*os\.environ\b|dict\(os\.environ\)", "", ln)
    ]
    assert reads == []

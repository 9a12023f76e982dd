"""APP_INFO_TTL and MAX_UPLOAD_BYTES: defaults, accepted values, and errors that name them."""

from __future__ import annotations

import pytest

from dify_proxy.settings import ConfigError, load_settings

MINIMAL = {"DIFY_API_KEY": "app-key", "SUPABASE_JWT_SECRET": "s" * 40}


def config_error(**overrides: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings({**MINIMAL, **overrides})
    return str(caught.value)


def test_app_info_ttl_defaults_to_60_seconds() -> None:
    assert load_settings(MINIMAL).app_info_ttl == 60.0


def test_max_upload_bytes_defaults_to_15_megabytes() -> None:
    assert load_settings(MINIMAL).max_upload_bytes == 15 * 1024 * 1024


@pytest.mark.parametrize(("raw", "seconds"), [("0", 0.0), ("2.5", 2.5), (" 300 ", 300.0)])
def test_app_info_ttl_is_read_as_seconds_and_zero_turns_caching_off(
    raw: str, seconds: float
) -> None:
    assert load_settings({**MINIMAL, "APP_INFO_TTL": raw}).app_info_ttl == seconds


@pytest.mark.parametrize("raw", ["-1", "soon", "nan", "inf", "1m"])
def test_app_info_ttl_that_is_not_zero_or_a_positive_number_is_named(raw: str) -> None:
    assert "APP_INFO_TTL" in config_error(APP_INFO_TTL=raw)


def test_max_upload_bytes_is_read_as_a_byte_count() -> None:
    assert load_settings({**MINIMAL, "MAX_UPLOAD_BYTES": "31457280"}).max_upload_bytes == 31457280


@pytest.mark.parametrize("raw", ["0", "-5", "15MB", "1.5", "lots"])
def test_max_upload_bytes_that_is_not_a_positive_whole_number_is_named(raw: str) -> None:
    assert "MAX_UPLOAD_BYTES" in config_error(MAX_UPLOAD_BYTES=raw)


@pytest.mark.parametrize("name", ["APP_INFO_TTL", "MAX_UPLOAD_BYTES"])
def test_blank_value_takes_the_default(name: str) -> None:
    default = load_settings(MINIMAL)
    settings = load_settings({**MINIMAL, name: "  "})
    assert (settings.app_info_ttl, settings.max_upload_bytes) == (
        default.app_info_ttl,
        default.max_upload_bytes,
    )

"""Config loading: file + environment, errors that name the key, secrets never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from kasuhara_ari.config import ConfigError, load


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "kasuhara.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults_without_file() -> None:
    cfg = load(env={})
    assert cfg.ari.app == "kasuhara"
    assert cfg.retention.days == 90
    assert cfg.escalation.keys["*9"] == "supervisor"


def test_file_and_env_override(tmp_path: Path) -> None:
    path = write(
        tmp_path, '[ari]\nurl = "http://10.0.0.1:8088"\npassword = "from-file"\n[retention]\ndays = 30\n'
    )
    cfg = load(path, env={"KASUHARA_ARI__PASSWORD": "from-env", "KASUHARA_MQTT__PORT": "1884"})
    assert cfg.ari.url == "http://10.0.0.1:8088"
    assert cfg.ari.password == "from-env"
    assert cfg.mqtt.port == 1884
    assert cfg.retention.days == 30


def test_env_sets_key_absent_from_file_and_list_and_table(tmp_path: Path) -> None:
    cfg = load(
        write(tmp_path, "[ami]\n"),
        env={
            "KASUHARA_AMI__SECRET": "s3cret",
            "KASUHARA_ESCALATION__SUPERVISORS": "PJSIP/a, PJSIP/b",
            "KASUHARA_ESCALATION__KEYS": '{"#7": "flag"}',
            "KASUHARA_STORAGE__SECURE": "true",
        },
    )
    assert cfg.ami.secret == "s3cret"
    assert cfg.escalation.supervisors == ("PJSIP/a", "PJSIP/b")
    assert dict(cfg.escalation.keys) == {"#7": "flag"}
    assert cfg.storage.secure is True


@pytest.mark.parametrize(
    ("text", "env", "names"),
    [
        ("[ari]\npasword = 'x'\n", {}, "ari.pasword"),
        ("[nosuch]\n", {}, "nosuch"),
        ("[ami]\nport = 'five'\n", {}, "ami.port"),
        ("[storage]\nsecure = 'yes'\n", {}, "storage.secure"),
        ("", {"KASUHARA_ARI__PASWORD": "x"}, "KASUHARA_ARI__PASWORD"),
        ("", {"KASUHARA_AMI__PORT": "abc"}, "KASUHARA_AMI__PORT"),
        ("[escalation.keys]\n'*9' = 'dance'\n", {}, "escalation.keys"),
        ("[escalation.keys]\n'*x' = 'flag'\n", {}, "escalation.keys"),
        ("[escalation.keys]\n'*' = 'flag'\n'*9' = 'supervisor'\n", {}, "prefix"),
        ("[recording]\nasterisk_dir = '/tmp/a b'\n", {}, "recording.asterisk_dir"),
        ("[retention]\ndays = 0\n", {}, "retention.days"),
        ("[ari]\nurl = 'localhost:8088'\n", {}, "ari.url"),
        ("[announcement]\nlanguage = '../x'\n", {}, "announcement.language"),
        ("[ari]\nrest_lanes = 17\n", {}, "ari.rest_lanes"),
        ("", {"KASUHARA_ARI__REST_LANES": "-1"}, "ari.rest_lanes"),
        ("[mqtt]\nlinger_ms = 5000\n", {}, "mqtt.linger_ms"),
        ("[mqtt]\nlinger_ms = -1\n", {}, "mqtt.linger_ms"),
        ("[recording]\ncompletion = 'poll'\n", {}, "recording.completion"),
        ("[routing]\non_stop = 'drop'\n", {}, "routing.on_stop"),
        ("[ari]\nmode = 'serve'\n", {}, "ari.mode"),
        ("[ari]\nmode = 'listen'\nlisten = '127.0.0.1'\n", {}, "ari.listen"),
        ("[ari]\nmode = 'listen'\nlisten = '0.0.0.0:8765'\n", {}, "ari.listen_allow_remote"),
        ("", {"KASUHARA_ROUTING__HANDOVER_WAIT_S": "600"}, "routing.handover_wait_s"),
        ("not toml [", {}, "not valid TOML"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        load(write(tmp_path, text), env=env)
    assert names in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.toml", env={})


def test_config_env_var_is_the_fallback(tmp_path: Path) -> None:
    path = write(tmp_path, "[ari]\napp = 'other'\n")
    assert load(env={"KASUHARA_CONFIG": str(path)}).ari.app == "other"


def test_secrets_never_in_repr_or_redacted(tmp_path: Path) -> None:
    cfg = load(
        env={
            "KASUHARA_ARI__PASSWORD": "pw-ari-123",
            "KASUHARA_AMI__SECRET": "pw-ami-456",
            "KASUHARA_STORAGE__SECRET_KEY": "pw-s3-789",
        }
    )
    shown = repr(cfg) + str(cfg.redacted())
    for secret in ("pw-ari-123", "pw-ami-456", "pw-s3-789"):
        assert secret not in shown
    assert cfg.redacted()["ari"]["password"] == "(set)"


@pytest.mark.parametrize(
    ("text", "env", "names"),
    [
        ("[agi]\nmax_sessions_per_peer = 0\n", {}, "agi.max_sessions_per_peer"),
        ("", {"KASUHARA_AGI__MAX_SESSIONS_PER_PEER": "-3"}, "agi.max_sessions_per_peer"),
        ("[agi]\nmax_env_bytes = 10\n", {}, "agi.max_env_bytes"),
        ("[agi]\nmax_env_bytes = 'big'\n", {}, "agi.max_env_bytes"),
        ("[agi]\nallowed_peers = ['10.0.0.0/33']\n", {}, "agi.allowed_peers"),
        ("[agi]\nallowed_peers = '127.0.0.1'\n", {}, "agi.allowed_peers"),
        ("", {"KASUHARA_AGI__ALLOWED_PEERS": "127.0.0.1,asterisk.example"}, "agi.allowed_peers"),
        ("[agi]\nenv_timeout_s = 0\n", {}, "agi.env_timeout_s"),
    ],
)
def test_agi_trust_keys_are_checked(tmp_path: Path, text: str, env: dict[str, str], names: str) -> None:
    """``kasuhara agi``'s per-peer limit, environment size and allow-list: a bad value names its key."""
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text), env=env)
    assert names in str(info.value)


def test_agi_trust_keys_defaults_and_env_list(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, ""), env={"KASUHARA_AGI__ALLOWED_PEERS": "127.0.0.1, 10.1.0.0/16,::1"})
    assert cfg.agi.allowed_peers == ("127.0.0.1", "10.1.0.0/16", "::1")
    assert (cfg.agi.max_sessions_per_peer, cfg.agi.max_env_bytes) == (20, 16384)

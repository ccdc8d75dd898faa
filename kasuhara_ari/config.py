"""Configuration: one TOML file plus ``KASUHARA_<SECTION>__<KEY>`` environment overrides.

The environment may set keys the file does not contain, so secrets can live in the environment alone.
Unknown keys and wrong types are errors that name the key; secrets never appear in ``repr`` or logs.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .callerid import TemplateError, check_template
from .node import is_safe_node_name

ENV_PREFIX = "KASUHARA_"
CONFIG_ENV = "KASUHARA_CONFIG"
ESCALATION_ACTIONS = frozenset({"supervisor", "flag", "warn", "warn_and_hangup"})
DTMF_CHARS = frozenset("0123456789*#ABCD")


class ConfigError(ValueError):
    """The configuration is unusable; the message names the key or file at fault."""


def secret() -> Any:
    """A field whose value is never printed."""
    return field(default="", repr=False, metadata={"secret": True})


@dataclass(frozen=True)
class AriConfig:
    url: str = "http://127.0.0.1:8088"
    username: str = "kasuhara"
    password: str = secret()
    app: str = "kasuhara"
    request_timeout_s: float = 5.0
    reconnect_max_s: float = 10.0
    #: REST requests over the event websocket when Asterisk answers there (20.12/21.7/22.2+), else HTTP.
    rest_over_websocket: bool = True
    #: Websockets for REST besides the event one (Asterisk answers each websocket's requests in turn).
    rest_lanes: int = 3
    #: ``connect``: the app connects to Asterisk's ARI at ``url``. ``listen``: Asterisk connects to the app
    #: (its outbound websocket, Asterisk 20.15/21.10/22.5+) at ``listen``, with ``username``/``password``.
    mode: str = "connect"
    listen: str = "127.0.0.1:8765"
    #: Listen on a non-loopback address although the websocket is plain (credentials in clear text).
    listen_allow_remote: bool = False


@dataclass(frozen=True)
class AmiConfig:
    host: str = "127.0.0.1"
    port: int = 5038
    username: str = "kasuhara"
    secret: str = secret()
    action_timeout_s: float = 5.0


@dataclass(frozen=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    topic_prefix: str = "kasuhara"
    username: str = ""
    password: str = secret()
    buffer_size: int = 10000
    enabled: bool = True
    #: After a quiet spell, wait this long so the events of a burst go out in one window (0: at once).
    linger_ms: int = 20
    #: TLS to the broker (caller numbers and the broker password travel in every session).
    tls: bool = False
    #: CA bundle (PEM) that signed the broker's certificate; empty = the system's trust store.
    ca_file: str = ""
    #: Client certificate and key (PEM) for brokers that require one; both or neither.
    cert_file: str = ""
    key_file: str = ""
    #: Skip the broker's hostname check (the chain is still verified). Never in production.
    tls_insecure: bool = False


@dataclass(frozen=True)
class StorageConfig:
    endpoint: str = "127.0.0.1:9000"
    access_key: str = secret()
    secret_key: str = secret()
    bucket: str = "kasuhara-recordings"
    secure: bool = False
    region: str = "us-east-1"
    queue_dir: str = ""
    sse_c_key: str = secret()
    enabled: bool = True
    #: Audio without metadata, unchanged this long, is adopted as an orphan and uploaded with minimal
    #: metadata (a crash mid-call, or the dialplan fallback's recordings while the app was down). Shorter
    #: than a live call's longest spell without audio frames would adopt a live call's file.
    orphan_after_s: float = 3600.0


@dataclass(frozen=True)
class RoutingConfig:
    default_target: str = "PJSIP/agent"
    dial_timeout_s: int = 30
    #: What a stopping ``serve`` (SIGTERM: a restart, an upgrade) does with calls in progress: ``handover``
    #: leaves talking calls up, bridged and recording for the next ``serve`` to take over; ``hangup`` ends
    #: them. Calls not yet talking get ``handover_wait_s`` to get there, then are ended.
    on_stop: str = "handover"
    handover_wait_s: float = 10.0


#: How the app learns that MixMonitor closed a file (``recording.completion``).
COMPLETION_MODES = ("watch", "command")
#: What a recording holds (``recording.mode``): "mixed" (one mono channel, both sides summed) or "stereo"
#: (MixMonitor's ``D``: channel 1 = what the caller says, channel 2 = what the caller hears).
RECORDING_MODES = ("mixed", "stereo")


@dataclass(frozen=True)
class RecordingConfig:
    asterisk_dir: str = "/var/spool/asterisk/monitor/kasuhara"
    local_dir: str = ""
    #: How a closed recording is noticed: "watch" (inotify + WAV header; no fork in Asterisk) or
    #: "command" (MixMonitor runs ``touch <id>.done``: Asterisk forks a shell per call).
    completion: str = "watch"
    #: "mixed" (default) or "stereo": the caller and what the caller hears on separate channels (training
    #: clips' voice anonymisation and after-call analysis need it).
    mode: str = "mixed"

    @property
    def host_dir(self) -> Path:
        """Where this host reads what Asterisk writes into ``asterisk_dir``."""
        return Path(self.local_dir or self.asterisk_dir)


@dataclass(frozen=True)
class AnnouncementConfig:
    sound: str = "kasuhara/recording-notice"
    language: str = "ja"
    apology_sound: str = "kasuhara/agent-unavailable"


@dataclass(frozen=True)
class EscalationConfig:
    supervisors: tuple[str, ...] = ("PJSIP/supervisor",)
    ring_timeout_s: int = 20
    inter_digit_timeout_s: float = 2.0
    keys: Mapping[str, str] = field(
        default_factory=lambda: {"*9": "supervisor", "*1": "flag", "*2": "warn", "*3": "warn_and_hangup"}
    )
    warning_sound: str = "kasuhara/warning"
    final_sound: str = "kasuhara/final-notice"
    supervisor_intro_sound: str = "kasuhara/escalated-call"
    unavailable_sound: str = "kasuhara/supervisor-unavailable"
    #: The agent alone hears these the moment ``flag``/``supervisor`` is accepted; "" = no tone.
    flag_ack_sound: str = "kasuhara/flag-accepted"
    supervisor_ack_sound: str = "kasuhara/escalation-accepted"


@dataclass(frozen=True)
class CallerIdConfig:
    """What the phones of the legs the app originates show (see callerid.py for the fields).

    An empty name and number for ``outbound`` keep what Asterisk presents today: the agent's own caller ID.
    """

    escalation_name: str = "{key} 応援要請 {agent}"
    escalation_number: str = "{caller_number}"
    supervise_name: str = "{mode_label} {agent}"
    supervise_number: str = "{caller_number}"
    outbound_name: str = ""
    outbound_number: str = ""


@dataclass(frozen=True)
class PolicyConfig:
    """Call rules recommended by the MHLW manual and Tokyo's guideline: a time budget and caller lists."""

    time_budget_s: int = 1800
    time_budget_mode: str = "off"  # off | warn | enforce
    warn_before_s: int = 60
    long_call_sound: str = "kasuhara/long-call"
    time_limit_sound: str = "kasuhara/call-ending-time-limit"
    repeat_calls: int = 0  # mark callers who called this many times within repeat_window_days; 0 = off
    repeat_window_days: int = 7
    state_dir: str = "/var/lib/kasuhara"
    caller_list_refresh_s: int = 30
    strong_notice_sound: str = "kasuhara/stronger-notice"
    refused_sound: str = "kasuhara/refused"


@dataclass(frozen=True)
class DetectionConfig:
    """Live detection of abusive talk patterns from Asterisk's own talk detection (TALK_DETECT):
    ``off`` (not even switched on), ``observe`` (events and the call's timeline), ``act`` (also flags the
    call as evidence, as the agent's ``*1`` would)."""

    mode: str = "observe"  # off | observe | act
    #: TALK_DETECT(set)=<silence_ms>,<talk_threshold>: silence that ends a stretch of talk, and the
    #: energy above which a frame counts as talk (Asterisk's dsp_talking_threshold; its default 256).
    silence_ms: int = 1200
    talk_threshold: int = 256
    #: The caller talks this long without a pause of silence_ms: a monologue.
    monologue_s: float = 60.0
    #: The agent tries to take the floor (starts while the caller talks, gives up within back_off_s while
    #: the caller goes on) this many times within window_s: the agent is talked over.
    talk_over_attempts: int = 3
    talk_over_window_s: float = 60.0
    talk_over_back_off_s: float = 1.5
    #: The same detection is reported again at most this often in one call.
    repeat_s: float = 300.0
    #: Signal 2, the caller's loudness (kasuhara_ari/detection/loudness.py): the caller's audio only (a
    #: snoop ``spy=in`` bridged with an ARI externalMedia channel) streamed over RTP to one UDP socket of
    #: the app for every call. ``media_host`` is where Asterisk sends it (empty: ``media_bind``);
    #: ``media_port`` 0 = any free port. Off by default: its Asterisk cost (a snoop, an externalMedia channel
    #: and a bridge per call) was measured above the issue's +10 % at 10 calls (README, docs/benchmarks.md).
    loudness: bool = False
    media_bind: str = "127.0.0.1"
    media_host: str = ""
    media_port: int = 0
    #: Frame length of the level measurement.
    frame_ms: int = 100
    #: The caller's first seconds of speech make their baseline level; quieter frames are no speech.
    baseline_s: float = 3.0
    speech_floor_dbfs: float = -45.0
    #: A shout: for at least shout_min_s, most frames this far above the caller's baseline and above the
    #: absolute floor (overdriven, clipping speech needs half the rise). shout_gap_s of calm between two.
    shout_over_baseline_db: float = 10.0
    shout_floor_dbfs: float = -20.0
    shout_min_s: float = 1.0
    shout_gap_s: float = 10.0
    #: More detectors (the plug-in point, kasuhara_ari/detection/base.py): "package.module:Factory".
    detectors: tuple[str, ...] = ()
    #: ``act`` mode: alert the supervisors (event detection_alert); ring the first free supervisor of
    #: escalation.supervisors to listen in (the agent hears a tone); flag the call as evidence after
    #: act_flag_after detections (0 = never). Each action once per call unless act_repeat.
    act_alert: bool = True
    act_listen: bool = False
    act_flag_after: int = 1
    act_repeat: bool = False


@dataclass(frozen=True)
class AgiConfig:
    bind: str = "127.0.0.1"
    port: int = 4573
    max_sessions: int = 200
    command_timeout_s: float = 5.0
    notice_timeout_s: float = 60.0
    env_timeout_s: float = 5.0
    max_line_bytes: int = 16384
    reconcile_interval_s: float = 60.0
    #: The whole FastAGI environment of one session (Asterisk's own is under 1 KiB).
    max_env_bytes: int = 16384
    #: Sessions per peer address that have not yet proved (through AMI) to be a real channel.
    max_sessions_per_peer: int = 20
    #: Addresses or CIDR networks that may connect to ``kasuhara agi``; empty = every peer.
    allowed_peers: tuple[str, ...] = ()


@dataclass(frozen=True)
class RetentionConfig:
    days: int = 90
    access_key: str = secret()
    secret_key: str = secret()
    daily_at: str = "03:00"
    #: The sweep's lease (kasuhara_ari/lease.py): a holder silent this long may be taken over by another
    #: node; it renews at a third of it, and stops deleting a margin (30 s, at most a fifth) before it.
    lease_ttl_s: float = 600.0


@dataclass(frozen=True)
class AdminConfig:
    name: str = ""
    access_key: str = secret()
    secret_key: str = secret()
    #: The Ed25519 key that signs export manifests (a local file, mode 600, never in the bucket);
    #: empty = ~/.config/kasuhara/export-signing.key of the admin running the CLI.
    signing_key: str = ""


@dataclass(frozen=True)
class GeneralConfig:
    timezone: str = "Asia/Tokyo"
    log_level: str = "INFO"
    #: ``text`` (``2026-12-03 ... INFO kasuhara_ari.web web event=login ...``) or ``json`` (one object per
    #: line, each ``key=value`` a field: for Loki, Elasticsearch, Fluent Bit). Services only, like log_level.
    log_format: str = "text"
    #: This node's name in metadata and events (``node``); empty = this host's short name. Set it to the
    #: node's Asterisk ``systemname`` (which makes call ids unique across nodes): README, *Several nodes*.
    node: str = ""


@dataclass(frozen=True)
class TrainingConfig:
    """The training library (``kasuhara training``)."""

    #: How far ``--anonymise`` shifts the caller's voice, in cents (-400: four semitones down).
    pitch_cents: int = -400


@dataclass(frozen=True)
class WebConfig:
    """``kasuhara web``, the browser console (see kasuhara_ari/web)."""

    bind: str = "127.0.0.1"
    port: int = 8090
    #: A session ends after this long without a request, and in any case this long after login.
    session_idle_s: int = 1800
    session_max_s: int = 43200
    #: Served through a TLS reverse proxy: cookies are Secure, the expected origin is https, and the
    #: client address comes from X-Forwarded-For sent by ``trusted_proxies`` (default 127.0.0.1).
    behind_tls_proxy: bool = False
    #: Serve plain http on a non-loopback address anyway (passwords and cookies in clear text).
    allow_insecure_bind: bool = False
    #: Addresses or CIDR networks of the reverse proxies whose forwarding headers are believed.
    trusted_proxies: tuple[str, ...] = ()
    #: Failed logins per account and per client address within the window before 429.
    login_max_failures: int = 5
    login_window_s: int = 900
    #: Single sign-on: the request header in which the reverse proxy names the user it authenticated
    #: (e.g. ``X-Forwarded-User``); believed only from ``trusted_proxies`` (which must then be set), and
    #: only for an enabled local account (its role is the local one). Empty: off.
    sso_header: str = ""
    #: Host names (``Host`` header, without port) the console answers to, e.g. ``["console.example.jp"]``;
    #: others get 400 (DNS rebinding, a proxy forwarding the wrong site). Empty: any.
    allowed_hosts: tuple[str, ...] = ()
    #: The console's search and audit index (SQLite, a cache rebuilt from S3; see evidence/index.py).
    #: Empty: ``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/kasuhara/index-<hash of endpoint and bucket>.sqlite``.
    index_path: str = ""
    #: Seconds between re-listings of the two most recent UTC days (new recordings, holds, audit records).
    index_refresh_s: int = 30
    #: Seconds between full reconciliations with the bucket (LISTs only for what did not change).
    index_reconcile_s: int = 3600


#: What ends a call into an agent's cool-down (``[care]`` ``<trigger>_s``; 0 = not a trigger).
CARE_TRIGGERS = ("flag", "warn", "warn_and_hangup", "supervisor", "detected")


@dataclass(frozen=True)
class CareConfig:
    """Care for agents (kasuhara_ari/care): a recovery pause after a harassment call, the monthly report."""

    #: Pause the agent after a call with one of the triggers (queue members: AMI QueuePause; everyone:
    #: the ``Custom:kasuhara-care-<endpoint>`` device state the dialplan honours).
    cooldown: bool = True
    #: Seconds of pause per trigger; the longest of the call's triggers wins; 0 = that trigger is off.
    flag_s: int = 300
    warn_s: int = 300
    warn_and_hangup_s: int = 300
    supervisor_s: int = 300
    detected_s: int = 0
    #: The queue the pause applies to (QueuePause ``Queue``); empty = every queue the member is in.
    queue: str = ""
    #: QueuePause reason (``<reason> until=<UTC ISO time>``): how a sweep finds pauses that are ours.
    pause_reason: str = "kasuhara-care"
    #: ``care report``: an agent with this many harassment calls in the month, or this many minutes in
    #: them, needs a manager's follow-up (0 = that measure is off).
    follow_up_calls: int = 3
    follow_up_minutes: float = 30.0


@dataclass(frozen=True)
class AgentsConfig:
    """``[agents]``: endpoint name = the person (``agent1 = "佐藤 花子"``); read as ``agents.people``."""

    people: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NodesConfig:
    """``[nodes]``: node name = its ARI url (``pbx2 = "http://10.0.0.12:8088"``); read as ``nodes.ari``.
    Where ``kasuhara supervise`` and the console reach the node a call id names (kasuhara_ari/nodes.py);
    every node has the same ARI user (``ari.username``/``ari.password``)."""

    ari: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus ``/metrics`` (kasuhara_ari/metrics.py). Off by default: every long-running command
    needs a port of its own, and a PBX host should not grow a listening port nobody asked for."""

    enabled: bool = False
    #: Loopback unless ``allow_remote``: the endpoint has no authentication and shows call volumes.
    bind: str = "127.0.0.1"
    serve_port: int = 9464
    agi_port: int = 9465
    retention_port: int = 9466
    web_port: int = 9467
    allow_remote: bool = False


@dataclass(frozen=True)
class Config:
    ari: AriConfig = field(default_factory=AriConfig)
    ami: AmiConfig = field(default_factory=AmiConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    recording: RecordingConfig = field(default_factory=RecordingConfig)
    announcement: AnnouncementConfig = field(default_factory=AnnouncementConfig)
    escalation: EscalationConfig = field(default_factory=EscalationConfig)
    callerid: CallerIdConfig = field(default_factory=CallerIdConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    agi: AgiConfig = field(default_factory=AgiConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    general: GeneralConfig = field(default_factory=GeneralConfig)
    web: WebConfig = field(default_factory=WebConfig)
    care: CareConfig = field(default_factory=CareConfig)
    agents: AgentsConfig = field(default_factory=AgentsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    nodes: NodesConfig = field(default_factory=NodesConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    source: str = field(default="", compare=False)

    def redacted(self) -> dict[str, dict[str, Any]]:
        """The configuration as plain data with every secret replaced, for display."""
        out: dict[str, dict[str, Any]] = {}
        for sec in dataclasses.fields(self):
            if sec.name == "source":
                continue
            section = getattr(self, sec.name)
            shown: dict[str, Any] = {}
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                if f.metadata.get("secret"):
                    value = "(set)" if value else "(empty)"
                elif isinstance(value, tuple):
                    value = list(value)
                elif isinstance(value, Mapping):
                    value = dict(value)
                shown[f.name] = value
            out[sec.name] = shown
        return out


_SECTIONS: dict[str, type[Any]] = {
    f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config) if f.name != "source"
}


def _convert(key: str, value: Any, hint: Any, *, from_env: bool) -> Any:
    """Check ``value`` against the field's type (parsing it if it came from the environment)."""
    origin = typing.get_origin(hint)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__}")
        return value
    if hint is bool:
        if from_env and isinstance(value, str):
            low = value.strip().lower()
            if low in {"1", "true", "yes", "on"}:
                return True
            if low in {"0", "false", "no", "off"}:
                return False
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {type(value).__name__}")
        return value
    if hint is int or hint is float:
        if from_env and isinstance(value, str):
            try:
                return hint(value.strip())
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__}")
        if hint is int and not isinstance(value, int):
            raise ConfigError(f"{key}: expected a whole number, got {value!r}")
        return hint(value)
    if origin is tuple:
        if from_env and isinstance(value, str):
            stripped = value.strip()
            if stripped.startswith("["):
                try:
                    value = json.loads(stripped)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{key}: not a JSON list: {exc}") from None
            else:
                value = [part.strip() for part in stripped.split(",") if part.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings")
        return tuple(value)
    if origin is Mapping or origin is dict or (isinstance(origin, type) and issubclass(origin, Mapping)):
        if from_env and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{key}: not a JSON object: {exc}") from None
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ConfigError(f"{key}: expected a table of strings")
        return types.MappingProxyType(dict(value))
    raise ConfigError(f"{key}: unsupported type {hint!r}")  # pragma: no cover - a bug in this module


def _validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    if cfg.ari.mode not in ("connect", "listen"):
        raise ConfigError(f"ari.mode: {cfg.ari.mode[:40]!r} is not connect or listen")
    if cfg.ari.mode == "listen":
        host, port = ari_listen_address(cfg.ari)
        if not (is_loopback(host) or cfg.ari.listen_allow_remote):
            raise ConfigError(
                f"ari.listen = {cfg.ari.listen!r} is not a loopback address, and the websocket is plain "
                "(the ARI password crosses the network in clear text): keep Asterisk and the app on one "
                "host or a private link, and set ari.listen_allow_remote = true"
            )
    if not 1 <= cfg.storage.orphan_after_s <= 7 * 86400:
        raise ConfigError("storage.orphan_after_s: between 1 and 604800 (a week)")
    if cfg.routing.on_stop not in ("handover", "hangup"):
        raise ConfigError(f"routing.on_stop: {cfg.routing.on_stop[:40]!r} is not handover or hangup")
    if not 0 <= cfg.routing.handover_wait_s <= 60:
        raise ConfigError("routing.handover_wait_s: between 0 and 60 (systemd's stop timeout is longer)")
    for seq, action in cfg.escalation.keys.items():
        if not seq or any(ch not in DTMF_CHARS for ch in seq):
            raise ConfigError(f"escalation.keys: {seq!r} is not a DTMF sequence (0-9, *, #, A-D)")
        if action not in ESCALATION_ACTIONS:
            raise ConfigError(
                f"escalation.keys.{seq!r}: unknown action {action!r} "
                f"(one of {', '.join(sorted(ESCALATION_ACTIONS))})"
            )
    seqs = list(cfg.escalation.keys)
    for a in seqs:
        for b in seqs:
            if a != b and b.startswith(a):
                raise ConfigError(f"escalation.keys: {a!r} is a prefix of {b!r}; one could never be pressed")
    det = cfg.detection
    if det.mode not in ("off", "observe", "act"):
        raise ConfigError(f"detection.mode: {det.mode!r} is not off, observe or act")
    if not 100 <= det.silence_ms <= 10000:
        raise ConfigError(f"detection.silence_ms: {det.silence_ms} is not between 100 and 10000")
    if not 1 <= det.talk_threshold <= 32767:
        raise ConfigError(f"detection.talk_threshold: {det.talk_threshold} is not between 1 and 32767")
    for name in ("monologue_s", "talk_over_window_s", "talk_over_back_off_s", "repeat_s"):
        if not getattr(det, name) > 0:
            raise ConfigError(f"detection.{name}: must be more than 0, got {getattr(det, name)}")
    if det.talk_over_attempts < 1:
        raise ConfigError(f"detection.talk_over_attempts: must be at least 1, got {det.talk_over_attempts}")
    if not 20 <= det.frame_ms <= 500 or det.frame_ms % 20:
        raise ConfigError(f"detection.frame_ms: {det.frame_ms} is not a multiple of 20 between 20 and 500")
    if not 0 <= det.media_port < 65536:
        raise ConfigError(f"detection.media_port: {det.media_port} is not a UDP port (0 = any)")
    for name in ("baseline_s", "shout_over_baseline_db", "shout_min_s"):
        if not getattr(det, name) > 0:
            raise ConfigError(f"detection.{name}: must be more than 0, got {getattr(det, name)}")
    if det.act_flag_after < 0:
        raise ConfigError(f"detection.act_flag_after: must be 0 (never) or more, got {det.act_flag_after}")
    for path in det.detectors:
        if path.count(":") != 1 or not all(path.split(":")):
            raise ConfigError(f"detection.detectors: {path!r} is not 'package.module:Factory'")
    if cfg.general.log_format not in ("text", "json"):
        raise ConfigError(f"general.log_format: {cfg.general.log_format!r} is not text or json")
    if cfg.general.node and not is_safe_node_name(cfg.general.node):
        raise ConfigError(
            f"general.node: {cfg.general.node[:40]!r} is not a node name "
            "(letters, digits, _ and -, at most 32)"
        )
    lang = cfg.announcement.language
    if not lang or not all(ch.isascii() and (ch.isalnum() or ch in "_-") for ch in lang):
        raise ConfigError(f"announcement.language: {lang!r} is not a language code like ja or en")
    for name, port in (("ami.port", cfg.ami.port), ("mqtt.port", cfg.mqtt.port), ("agi.port", cfg.agi.port)):
        if not 0 < port < 65536:
            raise ConfigError(f"{name}: {port} is not a TCP port")
    pol = cfg.policy
    if pol.time_budget_mode not in ("off", "warn", "enforce"):
        raise ConfigError(f"policy.time_budget_mode: {pol.time_budget_mode!r} is not off, warn or enforce")
    if pol.time_budget_mode != "off" and pol.time_budget_s < 1:
        raise ConfigError("policy.time_budget_s: must be at least 1 when the time budget is on")
    if pol.warn_before_s < 0 or (pol.time_budget_mode != "off" and pol.warn_before_s >= pol.time_budget_s):
        raise ConfigError("policy.warn_before_s: must be between 0 and policy.time_budget_s")
    if pol.repeat_calls < 0 or pol.repeat_window_days < 1:
        raise ConfigError("policy.repeat_calls / repeat_window_days: repeat_calls >= 0, window >= 1 day")
    if not 0 <= cfg.ari.rest_lanes <= 16:
        raise ConfigError(f"ari.rest_lanes: must be between 0 and 16, got {cfg.ari.rest_lanes}")
    if not 0 <= cfg.mqtt.linger_ms <= 1000:
        raise ConfigError(f"mqtt.linger_ms: must be between 0 and 1000, got {cfg.mqtt.linger_ms}")
    if cfg.retention.days < 1:
        raise ConfigError(f"retention.days: must be at least 1, got {cfg.retention.days}")
    if not 1 <= cfg.retention.lease_ttl_s <= 86400:
        raise ConfigError(f"retention.lease_ttl_s: must be 1..86400 seconds, got {cfg.retention.lease_ttl_s}")
    if not cfg.ari.url.startswith(("http://", "https://")):
        raise ConfigError(f"ari.url: must start with http:// or https://, got {cfg.ari.url!r}")
    if not cfg.recording.asterisk_dir.startswith("/"):
        raise ConfigError("recording.asterisk_dir: must be an absolute path")
    if cfg.recording.completion not in COMPLETION_MODES:
        raise ConfigError(
            f"recording.completion: must be 'watch' or 'command', got {cfg.recording.completion!r}"
        )
    if cfg.recording.mode not in RECORDING_MODES:
        raise ConfigError(f"recording.mode: must be 'mixed' or 'stereo', got {cfg.recording.mode!r}")
    _validate_agi(cfg.agi)
    _validate_callerid(cfg.callerid)
    _validate_mqtt_tls(cfg.mqtt)
    _validate_web(cfg.web)
    _validate_care(cfg.care, cfg.agents)
    _validate_metrics(cfg.metrics)
    if not 100 <= abs(cfg.training.pitch_cents) <= 1200:
        raise ConfigError(
            "training.pitch_cents: must be between 100 and 1200 cents up or down, "
            f"got {cfg.training.pitch_cents}"
        )
    _validate_nodes(cfg.nodes)
    if any(ch in cfg.recording.asterisk_dir for ch in ",'\"\\ \n|;&$`"):
        raise ConfigError(
            "recording.asterisk_dir: must not contain commas, quotes, spaces or shell characters "
            "(MixMonitor's arguments and its completion command use it)"
        )


def _validate_metrics(metrics: MetricsConfig) -> None:
    """Ports and a bind address; whether a non-loopback bind is allowed is the command's call."""
    for name in ("serve_port", "agi_port", "retention_port", "web_port"):
        port = getattr(metrics, name)
        if not 0 < port < 65536:
            raise ConfigError(f"metrics.{name}: {port} is not a TCP port")
    if not metrics.bind.strip():
        raise ConfigError("metrics.bind: must not be empty (127.0.0.1 keeps /metrics on this host)")


def _validate_callerid(callerid: CallerIdConfig) -> None:
    """Templates may name only their leg's fields (a typo would otherwise show as an empty display)."""
    for f in dataclasses.fields(callerid):
        kind = f.name.rsplit("_", 1)[0]
        try:
            check_template(getattr(callerid, f.name), kind)
        except TemplateError as exc:
            raise ConfigError(f"callerid.{f.name}: {exc}") from None


def _validate_mqtt_tls(mqtt: MqttConfig) -> None:
    """TLS files must exist when named, and only with ``mqtt.tls`` on (a CA set with TLS off would
    look protected and be clear text)."""
    files = {"ca_file": mqtt.ca_file, "cert_file": mqtt.cert_file, "key_file": mqtt.key_file}
    if not mqtt.tls:
        named = sorted(k for k, v in files.items() if v)
        if named or mqtt.tls_insecure:
            raise ConfigError(f"mqtt.{(named or ['tls_insecure'])[0]}: set only with mqtt.tls = true")
        return
    if bool(mqtt.cert_file) != bool(mqtt.key_file):
        raise ConfigError(
            "mqtt.cert_file / mqtt.key_file: give both (client certificate and its key) or neither"
        )
    for name, value in files.items():
        if value and not Path(value).is_file():
            raise ConfigError(f"mqtt.{name}: {value!r} is not a readable file")


def ari_listen_address(ari: AriConfig) -> tuple[str, int]:
    """``ari.listen`` as (host, port); ConfigError when it is not ``HOST:PORT``."""
    host, sep, port = ari.listen.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"ari.listen: {ari.listen[:60]!r} is not HOST:PORT (e.g. 127.0.0.1:8765)")
    return host, int(port)


def is_loopback(bind: str) -> bool:
    """Whether only this host can reach ``bind`` (``localhost`` counts; any other name does not)."""
    host = bind.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def web_bind_refusal(web: WebConfig) -> str | None:
    """Why the console must not start on ``web.bind``, or None: passwords and session cookies would
    cross the network in clear text unless TLS is in front or the operator says otherwise."""
    if is_loopback(web.bind) or web.behind_tls_proxy or web.allow_insecure_bind:
        return None
    return (
        f"web.bind = {web.bind!r} is not a loopback address, and the console speaks plain http: "
        "put it behind a TLS reverse proxy (web.behind_tls_proxy = true) or set "
        "web.allow_insecure_bind = true to accept passwords in clear text"
    )


def console_keys(cfg: Config) -> tuple[str, str]:
    """The S3 key pair of ``kasuhara web``: the [admin] keys when both are set (the console reads audio
    and performs its admins' actions), else the [storage] keys (accounts and metadata only)."""
    if cfg.admin.access_key and cfg.admin.secret_key:
        return cfg.admin.access_key, cfg.admin.secret_key
    return cfg.storage.access_key, cfg.storage.secret_key


#: Headers a browser or the HTTP layer sets: naming the user in one of them would let anyone sign in.
_NOT_SSO_HEADERS = frozenset(
    {"cookie", "host", "origin", "referer", "user-agent", "content-type", "content-length", "x-forwarded-for"}
)


def _validate_web(web: WebConfig) -> None:
    """The console's limits and proxy list (``kasuhara web``); whether its bind is safe is the CLI's call."""
    if not 0 < web.port < 65536:
        raise ConfigError(f"web.port: {web.port} is not a TCP port")
    if not web.bind.strip():
        raise ConfigError("web.bind: must be an address such as 127.0.0.1")
    for name in ("session_idle_s", "session_max_s", "login_max_failures", "login_window_s"):
        if getattr(web, name) < 1:
            raise ConfigError(f"web.{name}: must be at least 1, got {getattr(web, name)}")
    if web.session_idle_s > web.session_max_s:
        raise ConfigError("web.session_idle_s: must not exceed web.session_max_s")
    _check_networks("web.trusted_proxies", web.trusted_proxies)
    for host in web.allowed_hosts:
        if not re.fullmatch(r"(\*\.)?[A-Za-z0-9.:\[\]-]{1,253}", host):
            raise ConfigError(f"web.allowed_hosts: {host[:64]!r} is not a host name")
    if web.sso_header:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}", web.sso_header):
            raise ConfigError(f"web.sso_header: {web.sso_header!r} is not an HTTP header name")
        if web.sso_header.lower() in _NOT_SSO_HEADERS:
            raise ConfigError(f"web.sso_header: {web.sso_header!r} is not a header a proxy can own")
        if not web.trusted_proxies:
            raise ConfigError(
                "web.sso_header needs web.trusted_proxies: the addresses of the reverse proxies that set "
                "it (from anywhere else the header is ignored)"
            )
    for name in ("index_refresh_s", "index_reconcile_s"):
        if getattr(web, name) < 1:
            raise ConfigError(f"web.{name}: must be at least 1, got {getattr(web, name)}")


def _validate_care(care: CareConfig, agents: AgentsConfig) -> None:
    """Pause lengths are seconds (0 = off); endpoint names become S3 keys and device-state names."""
    for trigger in CARE_TRIGGERS:
        if not 0 <= getattr(care, f"{trigger}_s") <= 86400:
            value = getattr(care, f"{trigger}_s")
            raise ConfigError(f"care.{trigger}_s: must be between 0 and 86400, got {value}")
    if care.follow_up_calls < 0 or care.follow_up_minutes < 0:
        raise ConfigError("care.follow_up_calls / follow_up_minutes: must not be negative")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", care.pause_reason):
        raise ConfigError(f"care.pause_reason: {care.pause_reason[:64]!r} must be letters, digits, . _ -")
    for endpoint in agents.people:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", endpoint):
            raise ConfigError(f"agents: {endpoint[:64]!r} is not an endpoint name (letters, digits, . _ -)")


def _validate_nodes(nodes: NodesConfig) -> None:
    """Each ``[nodes]`` entry a node name (as ``general.node``) and an ARI url without credentials in it."""
    for name, url in nodes.ari.items():
        if not is_safe_node_name(name):
            raise ConfigError(
                f"nodes: {name[:40]!r} is not a node name (letters, digits, _ and -, at most 32)"
            )
        if not url.startswith(("http://", "https://")) or "@" in url.split("/", 3)[2]:
            raise ConfigError(
                f"nodes.{name}: must be an http:// or https:// ARI url without credentials "
                "(they are ari.username/ari.password)"
            )


def _validate_agi(agi: AgiConfig) -> None:
    """The FastAGI server's limits and allow-list (``kasuhara agi``)."""
    for name in ("max_sessions", "max_sessions_per_peer"):
        if getattr(agi, name) < 1:
            raise ConfigError(f"agi.{name}: must be at least 1, got {getattr(agi, name)}")
    for name in ("max_env_bytes", "max_line_bytes"):
        if not 256 <= getattr(agi, name) <= 1 << 20:
            raise ConfigError(f"agi.{name}: must be between 256 and 1048576, got {getattr(agi, name)}")
    for name in ("env_timeout_s", "command_timeout_s", "notice_timeout_s", "reconcile_interval_s"):
        if not getattr(agi, name) > 0:
            raise ConfigError(f"agi.{name}: must be positive, got {getattr(agi, name)}")
    _check_networks("agi.allowed_peers", agi.allowed_peers)


def _check_networks(key: str, values: tuple[str, ...]) -> None:
    """Each value an IP address or CIDR network, or a ConfigError that shows it safely."""
    for value in values:
        try:
            ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            shown = value if value.isprintable() and len(value) <= 64 else repr(value[:64])
            raise ConfigError(f"{key}: {shown!r} is not an IP address or network") from None


def load(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read the config file (``path`` or ``$KASUHARA_CONFIG``; none is fine) and apply env overrides."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    source = ""
    chosen = path if path is not None else env.get(CONFIG_ENV) or None
    if chosen is not None:
        p = Path(chosen)
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"config file {p}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {p}: not valid TOML: {exc}") from None
        source = str(p)

    # [agents] is a free table (endpoint = person): kept whole as agents.people.
    if isinstance(raw.get("agents"), dict) and "people" not in raw["agents"]:
        raw["agents"] = {"people": raw["agents"]}
    # [nodes] likewise (node name = ARI url): kept whole as nodes.ari.
    if isinstance(raw.get("nodes"), dict) and not isinstance(raw["nodes"].get("ari", ""), dict):
        raw["nodes"] = {"ari": raw["nodes"]}
    values: dict[str, dict[str, Any]] = {}
    for sec_name, sec_value in raw.items():
        if sec_name not in _SECTIONS:
            raise ConfigError(f"unknown section [{sec_name}] (known: {', '.join(_SECTIONS)})")
        if not isinstance(sec_value, dict):
            raise ConfigError(f"{sec_name}: expected a [{sec_name}] table")
        hints = typing.get_type_hints(_SECTIONS[sec_name])
        for key, value in sec_value.items():
            if key not in hints:
                raise ConfigError(f"unknown key {sec_name}.{key}")
            values.setdefault(sec_name, {})[key] = _convert(
                f"{sec_name}.{key}", value, hints[key], from_env=False
            )

    for var, value in env.items():
        if not var.startswith(ENV_PREFIX) or "__" not in var[len(ENV_PREFIX) :]:
            continue
        sec_name, _, key = var[len(ENV_PREFIX) :].lower().partition("__")
        if sec_name not in _SECTIONS:
            raise ConfigError(f"{var}: unknown section {sec_name!r}")
        hints = typing.get_type_hints(_SECTIONS[sec_name])
        if key not in hints:
            raise ConfigError(f"{var}: unknown key {sec_name}.{key}")
        values.setdefault(sec_name, {})[key] = _convert(var, value, hints[key], from_env=True)

    sections = {name: cls(**values.get(name, {})) for name, cls in _SECTIONS.items()}
    cfg = Config(**sections, source=source)
    _validate(cfg)
    return cfg

"""``kasuhara serve``: wires the Stasis app to ARI, AMI, the event publisher and the uploader."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from . import metrics
from .ami import AmiClient, AmiError
from .ari import AriClient
from .callers import CallerPolicy
from .care.cooldown import CooldownKeeper
from .config import Config, ari_listen_address
from .events import EventSink, MqttEvents, NullEvents
from .node import node_name
from .recording import CompletionWatcher, Recorder
from .stasis import STASIS_EVENTS, StasisApp
from .storage import MinioStore
from .uploader import Uploader, build_uploader

log = logging.getLogger(__name__)


class Runtime:
    """What every long-running command (``serve``, ``agi``) shares: an AMI connection, an event publisher,
    an uploader, and background runners owned by one TaskGroup with their closers."""

    def __init__(self, cfg: Config, ami: AmiClient, *, events: EventSink | None) -> None:
        self.cfg = cfg
        self.ami = ami
        self.recorder = Recorder(
            ami,
            cfg.recording.asterisk_dir,
            cfg.recording.host_dir,
            completion=cfg.recording.completion,
            mode=cfg.recording.mode,
        )
        self._runners: list[Callable[[], Coroutine[Any, Any, Any]]] = []
        self._closers: list[Callable[[], Awaitable[Any]]] = []
        self.events: EventSink = events if events is not None else self._default_events()
        self.uploader: Uploader | None = None
        self.completion: CompletionWatcher | None = None
        if cfg.recording.completion == "watch":
            self.completion = CompletionWatcher(cfg.recording.host_dir, self._recording_closed)
            self._runners.append(self.completion.run)

    async def _recording_closed(self, call_id: str) -> None:
        if self.uploader is not None:
            await self.uploader.notify(call_id)

    def _default_events(self) -> EventSink:
        if not self.cfg.mqtt.enabled:
            return NullEvents()
        # The service's publisher keeps each live call's snapshot retained (<prefix>/live/<call_id>).
        publisher = MqttEvents(self.cfg.mqtt, live_snapshots=True, node=node_name(self.cfg.general.node))
        self._runners.append(publisher.run)
        self._closers.append(lambda: publisher.close(timeout=3))
        return publisher

    def _start_uploader(self) -> Uploader:
        self.uploader = build_uploader(self.cfg, self.events)
        self._runners.append(self.uploader.run)
        return self.uploader

    async def _run_with(self, *main: tuple[Callable[[], Coroutine[Any, Any, Any]], str]) -> None:
        """Connect AMI (it keeps retrying on its own), then run ``main`` and every runner until cancelled.

        Stopping goes in order: ``main`` first (calls are torn down, which emits their last events),
        then the closers (the publisher flushes those events while it still runs), then the runners.
        Cancelled all at once, the publisher would stop before the calls' ``ended`` events reached it."""
        self.ami.connect()
        with contextlib.suppress(AmiError):
            await self.ami.wait_ready(timeout=3)
        detach_metrics = metrics.RUNTIME.attach(self._metric_sources())
        runners = [
            asyncio.create_task(runner(), name=getattr(runner, "__qualname__", "runner"))
            for runner in self._runners
        ]
        try:
            async with asyncio.TaskGroup() as tasks:
                for factory, name in main:
                    tasks.create_task(factory(), name=name)
                if runners:
                    tasks.create_task(_fail_with(runners), name="runners")
        finally:
            try:
                await self.aclose()
            finally:
                for task in runners:
                    task.cancel()
                await asyncio.gather(*runners, return_exceptions=True)
                detach_metrics()

    def _metric_sources(self) -> metrics.RuntimeSources:
        """What ``/metrics`` reads at scrape time: the spool the uploader empties, the MQTT publisher."""
        events = self.events
        return metrics.RuntimeSources(
            spool=Path(self.cfg.recording.host_dir) if self.uploader is not None else None,
            mqtt_stats=(lambda: events.stats) if isinstance(events, MqttEvents) else None,
        )

    async def aclose(self) -> None:
        for closer in self._closers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(closer(), 6)
        self.ami.close()


async def _fail_with(tasks: list[asyncio.Task[Any]]) -> None:
    """Wait while the runners run; the first that fails ends the service, as in one TaskGroup."""
    pending = set(tasks)
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            error = None if task.cancelled() else task.exception()
            if error is not None:
                raise error
    await asyncio.Event().wait()  # all of them returned: nothing to watch, the service goes on


class Service(Runtime):
    """Everything ``serve`` runs, owned by one TaskGroup. Tests run it in-process with their own sinks."""

    def __init__(
        self,
        cfg: Config,
        *,
        events: EventSink | None = None,
        on_metadata: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.ari = AriClient(
            cfg.ari.url,
            cfg.ari.username,
            cfg.ari.password,
            cfg.ari.app,
            timeout=cfg.ari.request_timeout_s,
            reconnect_max_s=cfg.ari.reconnect_max_s,
            rest_over_websocket=cfg.ari.rest_over_websocket,
            rest_lanes=cfg.ari.rest_lanes,
            event_types=STASIS_EVENTS,
            listen=ari_listen_address(cfg.ari) if cfg.ari.mode == "listen" else None,
        )
        ami = AmiClient(
            cfg.ami.host,
            cfg.ami.port,
            cfg.ami.username,
            cfg.ami.secret,
            action_timeout_s=cfg.ami.action_timeout_s,
        )
        super().__init__(cfg, ami, events=events)
        notify = on_metadata
        hold = None
        if on_metadata is None and cfg.storage.enabled:
            uploader = self._start_uploader()
            notify = uploader.notify

            async def hold(call_id: str, reason: str, by: str, started_at: str) -> object:
                return await uploader.hold(call_id, reason, by, started_at=started_at)

        self.callers = self._caller_policy()
        self.care: CooldownKeeper | None = None
        if cfg.care.cooldown:  # the agent's recovery pause after a harassment call (kasuhara_ari/care)
            self.care = CooldownKeeper(cfg, ami, self.events)
            self._runners.append(self.care.run)
        self.app = StasisApp(
            cfg,
            self.ari,
            self.recorder,
            self.events,
            on_metadata=notify,
            hold=hold,
            callers=self.callers,
            care=self.care,
        )

    def _caller_policy(self) -> CallerPolicy | None:
        """Repeat callers (local history) and the caller list (in the bucket), when either can apply."""
        if not self.cfg.storage.enabled and not self.cfg.policy.repeat_calls:
            return None
        store = MinioStore.from_config(self.cfg.storage) if self.cfg.storage.enabled else None
        policy = CallerPolicy.from_config(self.cfg.policy, store)
        if store is not None:
            self._runners.append(policy.run)
        return policy

    async def _watch_ami(self) -> None:
        """Log AMI's state changes so an operator sees why recordings would fail."""
        was_ready: bool | None = None
        while True:
            if self.ami.ready != was_ready:
                was_ready = self.ami.ready
                if was_ready:
                    log.info("ami event=connected address=%s", self.ami.address)
                else:
                    log.warning("ami event=not_connected address=%s (retrying)", self.ami.address)
            await asyncio.sleep(1.0)

    def _metric_sources(self) -> metrics.RuntimeSources:
        sources = super()._metric_sources()
        ari = self.ari
        sources.ari_connected = lambda: ari.events_connected
        return sources

    async def run(self) -> None:
        await self._run_with((self.app.run, "stasis"), (self._watch_ami, "ami-watch"))

    async def aclose(self) -> None:
        await super().aclose()
        await self.ari.aclose()

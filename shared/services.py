"""The services bundle every use case receives, and the one cached factory handlers get it from.

Tests swap the factory (``set_services_factory``), not SDK internals.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, cast

from shared.domain import utc_now
from shared.errors import ConfigurationError
from shared.ports import MarketplaceApi, OutboxStore, SubscriptionStore
from shared.settings import Settings

if TYPE_CHECKING:
    from shared.events import EventRelay
    from shared.publisher import OperationFollower
    from shared.publisher_store import PublisherOperationStore
    from shared.usage_store import UsageStore

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Services:
    settings: Settings
    marketplace: MarketplaceApi
    repository: SubscriptionStore
    clock: Callable[[], datetime] = utc_now
    #: the event relay's storage (build_services: the repository's sibling); None: no relay here
    outbox_factory: Callable[[], OutboxStore] | None = None
    #: publisher operations (build_services: on the repository's tables); None: no publisher API here
    publisher_store: PublisherOperationStore | None = None
    #: metered usage (build_services: on the repository's storage); None: no metering here
    usage_store: UsageStore | None = None
    _lazy: dict[str, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def once(self, name: str, build: Callable[[], T]) -> T:
        """``build()`` on first use, the same object afterwards (per bundle, thread-safe)."""
        with self._lock:
            if name not in self._lazy:
                self._lazy[name] = build()
            return cast(T, self._lazy[name])

    @property
    def webhook_authenticator(self):
        """Built on first use: only the webhook needs PyJWT and the signing keys."""
        from shared.webhook_auth import WebhookAuthenticator

        return self.once(
            "webhook_authenticator",
            lambda: WebhookAuthenticator.from_settings(self.settings, clock=lambda: self.clock().timestamp()),
        )

    @property
    def policy(self):
        from shared.policy import load_policy

        return self.once("policy", lambda: load_policy(self.settings.publisher_policy))

    @property
    def events(self) -> EventRelay:
        from shared.events import EventRelay

        def build() -> EventRelay:
            if self.outbox_factory is None:
                raise ConfigurationError(["this services bundle has no outbox to relay events from"])
            return EventRelay.from_settings(self.settings, self.outbox_factory(), clock=lambda: self.clock())

        return self.once("events", build)

    @property
    def follower(self) -> OperationFollower:
        """Follows publisher operations to their end through the operations work queue."""
        from shared.publisher import OperationFollower

        return self.once("follower", lambda: OperationFollower(self))

    def close(self) -> None:
        follower = self._lazy.get("follower")
        if follower is not None:
            follower.close()
        self.marketplace.close()


def build_services(settings: Settings | None = None) -> Services:
    from shared.marketplace import MarketplaceClient
    from shared.observability import install_log_filter
    from shared.publisher_store import PublisherOperationStore
    from shared.repository import SubscriptionRepository, table_service_from_settings
    from shared.usage_store import UsageStore

    install_log_filter()
    # Each function checks the settings only it needs (Settings.require), so one missing name does
    # not stop the others.
    settings = settings or Settings.from_env(require=())
    repository = SubscriptionRepository(table_service_from_settings(settings), settings.tables_prefix)
    services = Services(
        settings=settings,
        marketplace=MarketplaceClient.from_settings(settings),
        repository=repository,
        outbox_factory=repository.sibling,
        publisher_store=PublisherOperationStore(repository),
        usage_store=UsageStore(repository),
    )
    # One clock: the repository reads the bundle's, so a clock swapped in (tests, tools) applies to
    # what it writes as well as to what the use cases decide.
    repository.clock = lambda: services.clock()
    # Right after the change that wrote an event, a "deliver subscription X" job goes on the work
    # queue, before the handler answers; the event_delivery queue trigger delivers it.
    repository.on_event_written = lambda subscription_id: services.events.enqueue_delivery(subscription_id)
    return services


_factory: Callable[[], Services] = build_services
_cached: Services | None = None
_cache_lock = threading.Lock()


def get_services() -> Services:
    """The process-wide services (built once; a ConfigurationError is raised again on every call)."""
    global _cached
    with _cache_lock:
        if _cached is None:
            _cached = _factory()
        return _cached


def set_services_factory(factory: Callable[[], Services] | None) -> None:
    """Replace the factory (tests, dev tools); None restores the default. Drops the cached bundle."""
    global _factory, _cached
    with _cache_lock:
        _factory = factory or build_services
        _cached = None

"""The Litestar application of the agent API and the native API."""

from __future__ import annotations

from litestar import Litestar
from litestar.config.app import AppConfig
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.plugins import InitPluginProtocol

from virtbackup.gateway.auth import TokenAuth
from virtbackup.gateway.controllers.agent import HealthController
from virtbackup.gateway.controllers.config import ConfigController
from virtbackup.gateway.controllers.destinations import DestinationsController
from virtbackup.gateway.controllers.events import EventsController
from virtbackup.gateway.controllers.jobs import JobsController
from virtbackup.gateway.controllers.restore import RestoreController
from virtbackup.gateway.controllers.servers import ServersController
from virtbackup.gateway.controllers.system import SystemController
from virtbackup.gateway.errors import HANDLERS
from virtbackup.gateway.state import Gateway
from virtbackup.runtime import __version__

CONTROLLERS = [
    HealthController,
    ConfigController,
    EventsController,
    JobsController,
    ServersController,
    RestoreController,
    DestinationsController,
    SystemController,
]


class GatewayPlugin(InitPluginProtocol):
    """Registers the controllers, the ``gw`` dependency and the error translation."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        gw = self.gw

        def provide_gateway() -> Gateway:
            return gw

        app_config.route_handlers.extend(CONTROLLERS)
        app_config.dependencies["gw"] = Provide(provide_gateway, sync_to_thread=False)
        app_config.exception_handlers.update(HANDLERS)
        return app_config


def create_app(gw: Gateway) -> Litestar:
    """The agent API (served as written) plus the native API under ``/api/v1``."""
    from litestar.contrib.opentelemetry import OpenTelemetryConfig

    otel = OpenTelemetryConfig(tracer_provider=None)
    return Litestar(
        plugins=[GatewayPlugin(gw)],
        middleware=[otel.middleware],
        openapi_config=OpenAPIConfig(title="VirtBackup", version=__version__, path="/schema"),
        request_max_body_size=gw.settings.max_body_bytes,
        debug=False,
        logging_config=None,
    )


def create_asgi(gw: Gateway) -> TokenAuth:
    """The application behind token authentication, which covers every path, known or not."""
    return TokenAuth(create_app(gw), gw.token)  # type: ignore[arg-type]

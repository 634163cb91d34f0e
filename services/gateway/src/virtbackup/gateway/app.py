"""The Litestar application of the agent API and the native API."""

from __future__ import annotations

from typing import Any

from litestar import Litestar
from litestar.config.app import AppConfig
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.plugins import InitPluginProtocol

from virtbackup.contracts.v1.config import AgentConfig, SftpParams
from virtbackup.gateway.agent_auth import AgentKeyAuth
from virtbackup.gateway.audit_log import OperationLog
from virtbackup.gateway.console import Console
from virtbackup.gateway.controllers.admin_auth import AdminAuthController
from virtbackup.gateway.controllers.admin_login_logs import LoginLogsController
from virtbackup.gateway.controllers.admin_logs import OperaLogsController
from virtbackup.gateway.controllers.admin_monitor import AdminMonitorController
from virtbackup.gateway.controllers.admin_oauth2 import OAuth2Controller
from virtbackup.gateway.controllers.admin_sys import AdminSysController
from virtbackup.gateway.controllers.agent import HealthController
from virtbackup.gateway.controllers.backend_agents import BackendAgentsController
from virtbackup.gateway.controllers.backend_copy import CopyController
from virtbackup.gateway.controllers.backend_jobs import BackendJobsController
from virtbackup.gateway.controllers.backend_plans import PLAN_CONTROLLERS
from virtbackup.gateway.controllers.backend_system import BackendSystemController
from virtbackup.gateway.controllers.backend_vault import VaultController
from virtbackup.gateway.controllers.backupagent import BackupAgentController
from virtbackup.gateway.controllers.config import ConfigController
from virtbackup.gateway.controllers.destinations import DestinationsController, GoogleTokensBody
from virtbackup.gateway.controllers.events import EventsController
from virtbackup.gateway.controllers.exports import ExportsController
from virtbackup.gateway.controllers.jobs import JobsController
from virtbackup.gateway.controllers.lifecycle_gc import LifecycleGcController
from virtbackup.gateway.controllers.lifecycle_points import (
    POINT_BODIES,
    RestorePointsController,
)
from virtbackup.gateway.controllers.migrations import MigrationsController
from virtbackup.gateway.controllers.notify import NotifyController
from virtbackup.gateway.controllers.restore import RestoreController
from virtbackup.gateway.controllers.servers import ServersController
from virtbackup.gateway.controllers.system import SystemController
from virtbackup.gateway.controllers.task_schedulers import TaskSchedulersController
from virtbackup.gateway.controllers.webhooks_api import ApiWebhooksController
from virtbackup.gateway.edge import check_request
from virtbackup.gateway.errors import HANDLERS
from virtbackup.gateway.identity_auth import IdentityAuth, answer_refusal
from virtbackup.gateway.openapi import finish_document
from virtbackup.gateway.state import Gateway
from virtbackup.runtime import __version__

CONTROLLERS = [
    HealthController,
    ConfigController,
    EventsController,
    JobsController,
    ServersController,
    RestoreController,
    ExportsController,
    DestinationsController,
    SystemController,
    RestorePointsController,
    LifecycleGcController,
    CopyController,
    MigrationsController,
    NotifyController,
    *PLAN_CONTROLLERS,
    BackendAgentsController,
    BackupAgentController,
    VaultController,
    BackendJobsController,
    BackendSystemController,
    OperaLogsController,
    AdminMonitorController,
    TaskSchedulersController,
    ApiWebhooksController,
    # agents-backend-api.md: sessions, users, roles, API tokens, login log
    AdminAuthController,
    AdminSysController,
    LoginLogsController,
    OAuth2Controller,
]


#: Bodies that handlers decode themselves (masked secrets, ``expiresAt``'s three forms).
RAW_BODIES: dict[tuple[str, str], type[Any]] = {
    ("POST", "/config"): AgentConfig,
    ("POST", "/sftp/test"): SftpParams,
    ("POST", "/oauth/google"): GoogleTokensBody,
    **POINT_BODIES,
}


class GatewayPlugin(InitPluginProtocol):
    """Registers the controllers, the ``gw`` dependency, the request checks
    (``edge.check_request``) and the error translation."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        gw = self.gw

        def provide_gateway() -> Gateway:
            return gw

        app_config.route_handlers.extend(CONTROLLERS)
        app_config.dependencies["gw"] = Provide(provide_gateway, sync_to_thread=False)
        app_config.exception_handlers.update(HANDLERS)
        app_config.before_request = check_request
        return app_config


def create_app(gw: Gateway) -> Litestar:
    """The agent API (served as written) plus the native API under ``/api/v1``.

    Its OpenAPI document (``/schema/openapi.json``) describes every body, success and
    error response (``openapi.finish_document``).
    """
    from litestar.contrib.opentelemetry import OpenTelemetryConfig

    # No span per ASGI ``send``: a stream (``/events``) sends a message per event, and a
    # span each cost its event loop more than the send (``sse_hub``); the request's own
    # span still gets the status.
    otel = OpenTelemetryConfig(tracer_provider=None, exclude_spans=["send"])
    app = Litestar(
        plugins=[GatewayPlugin(gw)],
        middleware=[otel.middleware],
        openapi_config=OpenAPIConfig(title="VirtBackup", version=__version__, path="/schema"),
        request_max_body_size=gw.settings.max_body_bytes,
        debug=False,
        logging_config=None,
    )
    finish_document(
        app,
        RAW_BODIES,
        {
            ("POST", "/config"): (409,),
            ("POST", "/api/v1/admin/auth/login"): (429,),
            ("GET", "/api/v1/admin/oauth2/{provider}/callback"): (502,),
        },
    )
    return app


def create_asgi(gw: Gateway) -> Console:
    """The application behind authentication and authorisation, which cover every path,
    known or not (``identity_auth``; remote agents' ``bak_`` keys open their own routes
    only: ``agent_auth``), behind the web console's pages and cookie session (``console``)."""
    app = create_app(gw)
    # The operation log sits inside authentication: it sees authenticated requests only,
    # with the actor the authentication put in the scope.
    by_user = OperationLog(app, lambda: gw.audit, listener="api", default_actor="token")  # type: ignore[arg-type]
    by_agent = OperationLog(app, lambda: gw.audit, listener="api", default_actor=None)  # type: ignore[arg-type]
    # A known identity refused a route (403) is recorded too: an attempt to escalate.
    refused = OperationLog(answer_refusal, lambda: gw.audit, listener="api", default_actor="token")
    auth = IdentityAuth(by_user, gw.token, gw.identity, "agent", refused=refused)
    return Console(AgentKeyAuth(by_agent, auth, gw.agents), auth, lambda: gw.login_log)

"""JetStream stream definitions (declarative; the runtime turns them into streams)."""

from __future__ import annotations

from typing import Final, Literal

import msgspec

from virtbackup.contracts import subjects

DAY: Final = 24 * 3600.0


class StreamSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a stream must look like. Provisioning is idempotent: create, or update to this."""

    name: str
    subjects: tuple[str, ...]
    retention: Literal["limits", "workqueue", "interest"]
    max_age_seconds: float = 0.0
    max_bytes: int = -1
    duplicate_window_seconds: float = 120.0
    description: str = ""


class ConsumerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A durable pull consumer: explicit ack, bounded redelivery."""

    durable: str
    stream: str
    filter_subject: str
    ack_wait_seconds: float
    max_deliver: int
    max_ack_pending: int = 1000


EVENTS: Final = StreamSpec(
    name="VB_EVENTS",
    subjects=(subjects.EVENTS_ALL,),
    retention="limits",
    max_age_seconds=7 * DAY,
    max_bytes=1 << 30,
    description="Every VirtBackup event: history, SSE, WebSocket, webhooks.",
)

WORK: Final = StreamSpec(
    name="VB_WORK",
    subjects=(subjects.WORK_ALL,),
    retention="workqueue",
    description="Transfer units; a unit left unacked by a dead worker is redelivered.",
)

TRANSFER_CONSUMER: Final = ConsumerSpec(
    durable="transfer-workers",
    stream=WORK.name,
    filter_subject=subjects.WORK_TRANSFER_ALL,
    # Workers signal progress every third of it; VIRTBACKUP_WORK_ACK_WAIT overrides it.
    ack_wait_seconds=30.0,
    max_deliver=5,
)

NOTIFY: Final = StreamSpec(
    name="VB_NOTIFY",
    subjects=(subjects.NOTIFY_ALL,),
    retention="workqueue",
    max_age_seconds=7 * DAY,
    description="Webhook deliveries and notifications the notifier owes, one subject each.",
)

#: The notifier's durable cursor over ``VB_EVENTS``: each event it derives deliveries
#: from is acknowledged only once they are stored in ``VB_NOTIFY``. The notifier's
#: consumers hold one message at a time (``max_ack_pending=1``): order is kept, also
#: when a notifier dies with a message in hand (the next waits for its redelivery).
NOTIFIER_EVENTS_CONSUMER: Final = ConsumerSpec(
    durable="notifier-events",
    stream=EVENTS.name,
    filter_subject=subjects.EVENTS_ALL,
    ack_wait_seconds=30.0,
    max_deliver=20,
    max_ack_pending=1,
)


def webhook_consumer(webhook_id: str, ack_wait_seconds: float = 30.0) -> ConsumerSpec:
    """The durable consumer of one webhook's deliveries (``vb.notify.webhook.<id>``)."""
    return ConsumerSpec(
        durable=f"webhook-{webhook_id}",
        stream=NOTIFY.name,
        filter_subject=subjects.notify_webhook(webhook_id),
        ack_wait_seconds=ack_wait_seconds,
        max_deliver=20,
        max_ack_pending=1,
    )


def ntfy_consumer(ack_wait_seconds: float = 30.0) -> ConsumerSpec:
    """The durable consumer of ntfy notifications (``vb.notify.ntfy``)."""
    return ConsumerSpec(
        durable="ntfy",
        stream=NOTIFY.name,
        filter_subject=subjects.NOTIFY_NTFY,
        ack_wait_seconds=ack_wait_seconds,
        max_deliver=20,
        max_ack_pending=1,
    )


#: Job output logs (PBS task logs): ``vb.log.job.<id>``, kept 90 days, 2 GiB at most
#: (the oldest lines go first). A job's lines are purged when the job is deleted.
JOB_LOGS: Final = StreamSpec(
    name="VB_JOB_LOGS",
    subjects=(subjects.JOB_LOGS_ALL,),
    retention="limits",
    max_age_seconds=90 * DAY,
    max_bytes=2 << 30,
    description="Every job's output log, one line per message.",
)

#: The audit trail (agents-backend-api.md's login and operation logs), written and read
#: by the gateway only: ``vb.audit.login`` and ``vb.audit.opera``, one record each; a
#: record's id is its stream sequence. Kept ``VIRTBACKUP_AUDIT_RETENTION_DAYS`` (the
#: gateway sets the max age from it when it provisions the stream; 365 days here).
AUDIT: Final = StreamSpec(
    name="VB_AUDIT",
    subjects=(subjects.AUDIT_ALL,),
    retention="limits",
    max_age_seconds=365 * DAY,
    description="Login attempts and operations: the audit trail.",
)

ALL: Final = (EVENTS, WORK, NOTIFY, JOB_LOGS, AUDIT)

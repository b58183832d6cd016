"""Where a notification goes: an SMTP server, or the log when none is configured."""

from __future__ import annotations

import asyncio
import logging
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Protocol, runtime_checkable

import aiosmtplib

from shop.notification.domain import Channel, Notification, message_id
from shop.platform import context, telemetry

__all__ = ["Announcer", "Courier", "EmailCourier", "LogCourier"]

log = logging.getLogger("shop.notification")


class Courier(Protocol):
    @property
    def channel(self) -> Channel: ...

    @property
    def timeout_s(self) -> float:
        """The longest a delivery may take: it gives up then."""

    async def deliver(self, notification: Notification) -> None:
        """Hand the notification over; raise if it could not be."""


@runtime_checkable
class Announcer(Protocol):
    """A courier that hands a notification over at once, without waiting and without
    failing (the log): the service records its notifications already done, and announces
    them inside the recording transaction, instead of a second transaction to mark them."""

    def announce(self, notification: Notification) -> None: ...


class LogCourier:
    channel: Channel = "LOG"
    timeout_s: float = 0.0  # a line handed to the log writer

    async def deliver(self, notification: Notification) -> None:
        self.announce(notification)

    def announce(self, notification: Notification) -> None:
        log.info(
            "notification %s to %s (user %s) about order %s: %s",
            notification.type,
            notification.email,
            notification.user_id,
            notification.order_number,
            notification.subject,
        )


class EmailCourier:
    channel: Channel = "EMAIL"

    def __init__(
        self,
        *,
        host: str,
        port: int,
        sender: str,
        username: str | None = None,
        password: str | None = None,
        starttls: bool = False,
        timeout_s: float = 10.0,
    ) -> None:
        self._host = host
        self._port = port
        self._sender = sender
        self._username = username
        self._password = password
        self._starttls = starttls
        self.timeout_s = timeout_s

    def message(self, notification: Notification) -> EmailMessage:
        mail = EmailMessage()
        mail["From"] = self._sender
        mail["To"] = notification.email
        mail["Subject"] = notification.subject
        mail["Date"] = format_datetime(notification.created_at)
        mail["Message-ID"] = message_id(notification.event_id, sender=self._sender)
        mail.set_content(notification.body)
        return mail

    async def deliver(self, notification: Notification) -> None:
        # One deadline for the whole conversation (aiosmtplib's is per step), so a send never
        # outlives the claim that keeps the sweeper from sending it too.
        span = None
        if context.spans_exported:  # a CLIENT span under the event's consumer span
            span = telemetry.start_process_span(
                "smtp send",
                kind="client",
                parent=context.current_trace(),
                attributes={"server.address": self._host, "server.port": self._port},
            )
        try:
            async with asyncio.timeout(self.timeout_s):
                await aiosmtplib.send(
                    self.message(notification),
                    hostname=self._host,
                    port=self._port,
                    username=self._username,
                    password=self._password,
                    start_tls=self._starttls,
                    timeout=self.timeout_s,
                )
        finally:
            if span is not None:
                span.end()

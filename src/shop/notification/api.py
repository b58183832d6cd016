"""Routes of the notification service (SPEC §3 Notification): parse, call a use case, shape."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from shop.notification.domain import Channel, Notification, NotificationType, Status, timestamp
from shop.notification.service import NotificationService
from shop.platform.security import CurrentUser

__all__ = ["NotificationView", "router"]

router = APIRouter(prefix="/api/notifications", tags=["notifications"])


class NotificationView(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, validate_by_name=True)

    id: str
    order_number: str
    type: NotificationType
    channel: Channel
    status: Status
    created_at: str

    @classmethod
    def of(cls, notification: Notification) -> NotificationView:
        return cls(
            id=notification.id,
            order_number=notification.order_number,
            type=notification.type,
            channel=notification.channel,
            status=notification.status,
            created_at=timestamp(notification.created_at),
        )


def get_notifications(request: Request) -> NotificationService:
    service: NotificationService = request.app.state.notifications
    return service


NotificationsDep = Annotated[NotificationService, Depends(get_notifications)]


@router.get("", response_model=list[NotificationView])
async def list_notifications(
    user: CurrentUser,
    service: NotificationsDep,
    order_number: Annotated[
        str | None, Query(alias="orderNumber", min_length=1, max_length=64)
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> list[NotificationView]:
    """The caller's own notifications, newest first (admins too see only their own)."""
    found = await service.notifications_of(
        user.user_id, order_number=order_number, limit=limit, offset=offset
    )
    return [NotificationView.of(n) for n in found]

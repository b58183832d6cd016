"""The notification service: tells buyers about their orders, once per order event."""

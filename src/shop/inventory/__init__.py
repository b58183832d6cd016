"""The inventory service: stock per SKU, and all-or-nothing reservations for orders."""

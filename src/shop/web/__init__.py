"""The storefront: web pages for customers and admins, built on the public API (issue 12)."""

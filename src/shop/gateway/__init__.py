"""The API gateway: one public entrance that checks tokens and proxies to the services."""

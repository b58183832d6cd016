"""The auth service: users, log-in, refresh tokens and the keys that sign access tokens."""

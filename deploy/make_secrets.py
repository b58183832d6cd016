"""Make the secret files a Shop deployment needs, in one folder; keep the ones that exist.

    python deploy/make_secrets.py deploy/secrets          # then: docker compose up
    kubectl create secret generic shop-secrets --from-file=deploy/secrets

compose.yaml runs it once in the image before anything else starts (service ``secrets``);
Kubernetes takes the same files as the keys of the Secret ``shop-secrets``. Every value is
fresh (``secrets.token_urlsafe``: URL-safe, so it goes into a URL unescaped) and written
once, so a restart keeps users' tokens and the databases' passwords valid. Needs only the
standard library and ``cryptography`` (a dependency of Shop).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

# Every application that registers, by the service that runs it (docs/registry.md).
APPLICATIONS = {
    "gateway": "api-gateway",
    "auth": "auth-service",
    "product": "product-service",
    "inventory": "inventory-service",
    "order": "order-service",
    "notification": "notification-service",
    "web": "web-service",
}
# The MySQL database of each service that has one (product's catalogue is in MongoDB).
MYSQL_DATABASES = {
    "auth": "auth",
    "inventory": "inventory",
    "order": "orders",
    "notification": "notification",
}
MYSQL_HOST = os.environ.get("SHOP_MYSQL_HOST", "mysql:3306")
REGISTRY_HOST = os.environ.get("SHOP_REGISTRY_HOST", "registry:8761")


def _signing_key() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def make(folder: Path) -> list[str]:
    """Write the missing files under ``folder``; answer the names written."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    def keep(name: str, value: str | Callable[[], str]) -> str:
        """The file's value: what it holds, else ``value`` written to it."""
        path = folder / name
        if path.exists():
            return path.read_text()
        text = value() if callable(value) else value
        path.write_text(text)
        # Readable by the other containers' users (MySQL's entrypoint reads its password as
        # `mysql`): the folder is a volume that only Shop's containers and MySQL mount.
        path.chmod(0o444)
        written.append(name)
        return text

    fresh = {app: secrets.token_urlsafe(32) for app in APPLICATIONS.values()}
    clients = json.loads(keep("registry-clients.json", json.dumps(fresh, indent=2)))
    for service, app in APPLICATIONS.items():
        keep(f"{service}-registry-url", f"http://{app}:{clients[app]}@{REGISTRY_HOST}/eureka")
    order_secret = keep("order-service-secret", secrets.token_urlsafe(32))
    keep("auth-service-clients.json", json.dumps({"order-service": order_secret}))
    keep("auth-signing-key.pem", _signing_key)
    keep("auth-admin-password", secrets.token_urlsafe(18))
    keep("mysql-root-password", secrets.token_urlsafe(24))
    password = keep("mysql-password", secrets.token_urlsafe(24))
    for service, database in MYSQL_DATABASES.items():
        keep(f"{service}-database-url", f"mysql://shop:{password}@{MYSQL_HOST}/{database}")
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} FOLDER")
    made = make(Path(sys.argv[1]))
    print(f"made {len(made)} secret files in {sys.argv[1]}: {', '.join(made) or 'none new'}")

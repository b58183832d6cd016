"""A new product's stock, seen through inventory: the product and inventory services with
their real lifespans, sharing one data folder and so the embedded event log — the product
service's outbox relay publishes ``product.created``, the inventory consumes it."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI

from shop.inventory.app import build_app as build_inventory
from shop.inventory.settings import InventorySettings
from shop.platform.settings import PlatformSettings
from shop.platform.tokens import JwksVerifier
from shop.product.app import build_app as build_product
from shop.product.settings import ProductSettings

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KID = "flow-test-key"


def _admin() -> dict[str, str]:
    platform = PlatformSettings()
    now = int(time.time())
    claims = {
        "sub": str(uuid.uuid4()),
        "email": "admin@example.com",
        "roles": ["customer", "admin"],
        "iss": platform.auth_issuer,
        "aud": platform.auth_audience,
        "iat": now,
        "exp": now + 900,
        "jti": uuid.uuid4().hex,
    }
    token = jwt.encode(claims, KEY, algorithm="RS256", headers={"kid": KID})
    return {"Authorization": f"Bearer {token}"}


ADMIN = _admin()


async def _jwks() -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key()))
    return {"keys": [{**jwk, "kid": KID, "use": "sig", "alg": "RS256"}]}


@asynccontextmanager
async def serving(app: FastAPI, platform: PlatformSettings) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        app.state.runtime.tokens = JwksVerifier(
            fetch_jwks=_jwks, issuer=platform.auth_issuer, audience=platform.auth_audience
        )
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            yield client


async def test_a_new_product_is_listed_by_inventory_with_no_stock(tmp_path: Path) -> None:
    platform = PlatformSettings(data_dir=tmp_path)
    product_app = build_product(
        platform=platform, settings=ProductSettings(_env_file=None, seed_demo_catalogue=False)
    )
    inventory_app = build_inventory(
        platform=platform, settings=InventorySettings(_env_file=None, seed_demo_stock=False)
    )
    async with (
        serving(product_app, platform) as catalogue,
        serving(inventory_app, platform) as inventory,
    ):
        assert (await inventory.get("/api/inventory", headers=ADMIN)).json() == []
        # The reference's own body: no skuCode, one is derived.
        created = await catalogue.post(
            "/api/product",
            json={"name": "Fairphone 5", "description": "Repairable.", "price": 699},
            headers=ADMIN,
        )
        assert created.status_code == 201, created.text
        sku_code = created.json()["skuCode"]
        assert sku_code == "fairphone_5"

        async with asyncio.timeout(10):
            while True:
                listed = (await inventory.get("/api/inventory", headers=ADMIN)).json()
                if listed:
                    break
                await asyncio.sleep(0.02)
        assert listed == [{"skuCode": sku_code, "quantity": 0, "isInStock": False}]
        answer = await inventory.get("/api/inventory", params={"skuCode": sku_code}, headers=ADMIN)
        assert answer.json() == [{"skuCode": sku_code, "quantity": 0, "isInStock": False}]

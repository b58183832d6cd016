"""Use cases of the product service: one method per thing a caller (or the start-up) does."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime

from shop.product.domain import (
    DEMO_CATALOGUE,
    CataloguePage,
    CatalogueQuery,
    Product,
    ProductDraft,
    ProductIds,
    ProductNotFound,
    SkuTaken,
    derive_sku_code,
    is_product_id,
    sku_code_candidates,
    truncate_to_millis,
)
from shop.product.events import PRODUCT_CREATED, PRODUCT_DELETED, PRODUCT_UPDATED, product_event
from shop.product.store import ProductStore

__all__ = ["ProductService"]

log = logging.getLogger("shop.product")

# Tries at a derived SKU code; after the first clash each is random, so racers part at once.
SKU_CODE_ATTEMPTS = 5


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _nothing() -> None:
    return None


class ProductService:
    """``on_change`` runs after each committed change (the app wakes the outbox relay)."""

    def __init__(
        self,
        *,
        store: ProductStore,
        ids: ProductIds | None = None,
        clock: Callable[[], datetime] = _utcnow,
        on_change: Callable[[], None] = _nothing,
    ) -> None:
        self._store = store
        self._ids = ids or ProductIds()
        self._clock = clock
        self._on_change = on_change

    async def add_product(self, draft: ProductDraft) -> Product:
        """Raises SkuTaken (for a SKU code the client chose; a derived one is made unique)."""
        if draft.sku_code is not None:
            return await self._add(draft)
        for attempt in range(1, SKU_CODE_ATTEMPTS + 1):
            candidates = sku_code_candidates(draft.name)
            if attempt == 1:
                taken = {p.sku_code for p in await self._store.with_sku_codes(candidates)}
            else:
                # Another create of the same name took ours between our read and our write:
                # whoever races us reads the same, so only a random suffix parts us.
                taken = set(candidates)
            code = derive_sku_code(draft.name, taken=taken)
            try:
                return await self._add(draft.with_sku_code(code))
            except SkuTaken:
                if attempt == SKU_CODE_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _add(self, draft: ProductDraft) -> Product:
        now = truncate_to_millis(self._clock())
        product = Product.new(draft, id=self._ids.new(now), created_at=now)
        await self._store.add(product, event=product_event(PRODUCT_CREATED, product))
        self._on_change()
        log.info("product %s (%s) added", product.id, product.sku_code)
        return product

    async def product(self, product_id: str) -> Product:
        """Raises ProductNotFound, also for a string that cannot be a product id."""
        found = await self._store.get(product_id) if is_product_id(product_id) else None
        if found is None:
            raise ProductNotFound(product_id)
        return found

    async def revise_product(self, product_id: str, draft: ProductDraft) -> Product:
        """Replace what a client may change. Raises ProductNotFound or SkuTaken."""
        revised = (await self.product(product_id)).revised(draft)
        if not await self._store.update(revised, event=product_event(PRODUCT_UPDATED, revised)):
            raise ProductNotFound(product_id)  # deleted since we read it
        self._on_change()
        log.info("product %s (%s) revised", revised.id, revised.sku_code)
        return revised

    async def remove_product(self, product_id: str) -> None:
        """Raises ProductNotFound."""
        removed = None
        if is_product_id(product_id):
            removed = await self._store.remove(
                product_id, announce=lambda product: product_event(PRODUCT_DELETED, product)
            )
        if removed is None:
            raise ProductNotFound(product_id)
        self._on_change()
        log.info("product %s (%s) removed", removed.id, removed.sku_code)

    async def browse(self, query: CatalogueQuery) -> CataloguePage:
        return await self._store.search(query)

    async def products_with_sku_codes(self, sku_codes: Sequence[str]) -> list[Product]:
        """The known ones among ``sku_codes``, in the order asked."""
        by_sku = {p.sku_code: p for p in await self._store.with_sku_codes(sku_codes)}
        return [by_sku[code] for code in sku_codes if code in by_sku]

    async def seed_catalogue(self, drafts: Iterable[ProductDraft] = DEMO_CATALOGUE) -> int:
        """Add ``drafts`` if the catalogue is empty; how many this call added.

        Through the same use case as a client's, so the events go out too. Two instances
        starting at once may both find it empty: the SKU constraint lets one win each.
        """
        if not await self._store.is_empty():
            return 0
        added = 0
        for draft in drafts:
            try:
                await self.add_product(draft)
            except SkuTaken:
                continue
            added += 1
        if added:
            log.info("seeded the demo catalogue: %d products", added)
        return added

"""The order service: places orders at catalogue prices, reserves their stock, cancels them."""

#!/bin/sh
# One image, every Shop process: SERVICE picks which (`python -m shop.$SERVICE`).
#
# What this script adds to the service's own settings, and only when the operator has not
# set it:
#   <PREFIX>_HOST=0.0.0.0      listen on every interface of the container
#   <PREFIX>_PORT              one known port per container (healthcheck, Service, probes):
#                              $PORT if set, else 8761 registry, 8765 gateway, 8080 the rest
#   SHOP_ADVERTISE_HOST        the container's own address: what callers dial and what
#                              service tokens are bound to (never 0.0.0.0; docs/platform.md)
#   NAME from NAME_FILE        for the secrets that Shop reads only from the environment
#                              (see docs/deploy.md): compose and Kubernetes mount files
# Then it execs the service, so SIGTERM reaches Python (uvicorn stops cleanly).
# `shop-entrypoint healthcheck` asks that port's /health/ready (the image's HEALTHCHECK).
set -eu

case "${SERVICE:-}" in
    registry | gateway | auth | product | inventory | order | notification | web) ;;
    *)
        echo "SERVICE must be one of registry gateway auth product inventory order" \
            "notification web (got '${SERVICE:-}')" >&2
        exit 2
        ;;
esac

case "$SERVICE" in
    registry) default_port=8761 ;;
    gateway) default_port=8765 ;;
    *) default_port=8080 ;;
esac
prefix=$(printf '%s' "$SERVICE" | tr '[:lower:]' '[:upper:]')
eval "export ${prefix}_HOST=\"\${${prefix}_HOST:-0.0.0.0}\""
eval "export ${prefix}_PORT=\"\${${prefix}_PORT:-\${PORT:-$default_port}}\""

if [ "${1:-}" = healthcheck ]; then
    eval "port=\$${prefix}_PORT"
    exec python -c 'import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health/ready", timeout=2)' "$port"
fi

if [ -z "${SHOP_ADVERTISE_HOST:-}" ]; then
    SHOP_ADVERTISE_HOST=$(python -c 'import socket; print(socket.gethostbyname(socket.gethostname()))')
    export SHOP_ADVERTISE_HOST
fi

# Settings that hold a secret but have no *_FILE form of their own in Shop.
for name in SHOP_SERVICE_SECRET SHOP_REGISTRY_URL AUTH_SERVICE_CLIENTS AUTH_ADMIN_PASSWORD \
    AUTH_DATABASE_URL PRODUCT_DATABASE_URL INVENTORY_DATABASE_URL ORDER_DATABASE_URL \
    NOTIFICATION_DATABASE_URL SHOP_KAFKA_SASL_PASSWORD GATEWAY_RATE_LIMIT_STORAGE_URL \
    AUTH_LOGIN_THROTTLE_STORAGE_URL; do
    eval "file=\${${name}_FILE:-}"
    if [ -n "$file" ]; then
        eval "set_already=\${${name}:+yes}"
        if [ -n "$set_already" ]; then
            echo "$SERVICE refuses to start: both $name and ${name}_FILE are set" >&2
            exit 2
        fi
        if [ ! -r "$file" ]; then
            echo "$SERVICE refuses to start: ${name}_FILE: cannot read $file" >&2
            exit 2
        fi
        # A trailing newline (echo > file, most secret stores) is not part of the value.
        value=$(cat "$file")
        export "$name=$value"
        unset "${name}_FILE"
    fi
done

exec python -m "shop.$SERVICE" "$@"

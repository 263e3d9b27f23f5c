"""``python -m kvgate.gateway``: parse the configuration and serve until SIGINT / SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import resource
import sys
from collections.abc import Sequence

from kvgate.gateway import server
from kvgate.gateway.app import ADMIN_APP_KEY, GATEWAY_KEY, build_app
from kvgate.gateway.auth import warn_exposure
from kvgate.gateway.config import GatewayConfig, load_config
from kvgate.gateway.tokenization import TokenizerError

log = logging.getLogger("kvgate.gateway")


def use_uvloop() -> bool:
    """Run on uvloop where it is installed: the relay's per-chunk cost is mostly the loop's."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve(config: GatewayConfig) -> None:
    """Build the app and serve it on ``config.host:config.port`` (the admin endpoints on
    ``admin_host:admin_listen_port`` unless ``admin_on_public_port``) until a signal stops it."""
    app = build_app(config)
    log.info(
        "kvgate on http://%s:%d  model=%s  router=%s  workers=%s",
        config.host,
        config.port,
        config.model_name,
        config.router_mode,
        ", ".join(w["id"] for w in config.workers) or "none",
    )
    warn_exposure(config, app[GATEWAY_KEY].access)
    admin_app = app[ADMIN_APP_KEY]
    raise_open_files_limit(config.max_connections)
    asyncio.run(
        server.serve(
            app,
            config.host,
            config.port,
            server.ServerLimits.from_config(config),
            admin=None
            if admin_app is None
            else server.Listener(admin_app, config.admin_host, config.admin_listen_port),
            access_log=logging.getLogger("aiohttp.access") if config.access_log else None,
        )
    )


def raise_open_files_limit(max_connections: int) -> None:
    """Make room for each client connection and its worker connection, or say there is none."""
    needed = 2 * max_connections + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            log.warning(
                "open files limit %d is below the %d that max_connections=%d needs: "
                "raise the hard limit (ulimit -Hn) or lower max_connections",
                target,
                needed,
                max_connections,
            )


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(argv)
    configure_logging(config.log_level)
    use_uvloop()
    try:
        serve(config)
    except TokenizerError as err:
        log.error("cannot load the tokenizer of %s: %s", config.model, err)
        sys.exit(2)
    except ValueError as err:
        # A key or secret file that cannot be read (the message names the file, never a key).
        log.error("%s", err)
        sys.exit(2)
    except OSError as err:
        admin = "" if config.admin_on_public_port else f" (admin {config.admin_host}:{config.admin_listen_port})"
        log.error("cannot serve on %s:%d%s: %s", config.host, config.port, admin, err)
        sys.exit(1)


if __name__ == "__main__":
    main()

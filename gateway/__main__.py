"""``python -m kvgate.gateway``: parse the configuration and serve until SIGINT / SIGTERM.

With ``processes`` > 1 this process forks that many gateway processes, before anything
is loaded, and supervises them: each builds its own gateway (tokenizer, index fed by
every KV event, router, upstream pools) and binds the public port with SO_REUSEPORT, so
the kernel spreads client connections over them and each runs on its own core; process
``i`` serves the admin endpoints on the admin port + ``i``. SIGINT / SIGTERM are passed
on to every process; when one exits on its own the others are stopped and the
supervisor exits with its status (a service manager restarts the group).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import resource
import signal
import sys
from collections.abc import Sequence

from kvgate.gateway import server
from kvgate.gateway.app import ADMIN_APP_KEY, GATEWAY_KEY, build_app
from kvgate.gateway.auth import warn_exposure
from kvgate.gateway.config import GatewayConfig, load_config
from kvgate.gateway.metrics import CallbackProbe
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


def serve(config: GatewayConfig, *, reuse_port: bool = False) -> None:
    """Build the app and serve it on ``config.host:config.port`` (the admin endpoints on
    ``admin_host:admin_listen_port`` unless ``admin_on_public_port``) until a signal stops it."""
    app = build_app(config)
    log.info(
        "kvgate on http://%s:%d  model=%s  router=%s  workers=%s%s",
        config.host,
        config.port,
        config.model_name,
        config.router_mode,
        ", ".join(w["id"] for w in config.workers) or "none",
        f"  (process pid {os.getpid()}, SO_REUSEPORT)" if reuse_port else "",
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
            reuse_port=reuse_port,
        )
    )


def process_config(config: GatewayConfig, index: int) -> GatewayConfig:
    """Process ``index``'s configuration in a ``processes`` group: its own admin port and NATS id."""
    changes: dict[str, object] = {"processes": 1}
    if not config.admin_on_public_port and config.admin_listen_port:
        changes["admin_port"] = config.admin_listen_port + index
    if config.router_id is not None:
        changes["router_id"] = f"{config.router_id}-{index}"
    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]


def supervise(config: GatewayConfig) -> int:
    """Fork ``config.processes`` gateway processes on one port and wait for them (see the module doc)."""
    children: dict[int, int] = {}
    for index in range(config.processes):
        pid = os.fork()
        if pid == 0:
            _die_with_parent()
            code = 0
            try:
                run(process_config(config, index), reuse_port=True)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except BaseException:
                log.exception("gateway process %d failed", index)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = index
    log.info("kvgate: %d gateway processes on port %d: pids %s", len(children), config.port, sorted(children))
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            _signal(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = 0
    while children:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid, None)
        if index is None:
            continue
        code = os.waitstatus_to_exitcode(wait_status)
        if not stopping:
            log.error("gateway process %d (pid %d) exited with %d: stopping the others", index, pid, code)
            status = code if code > 0 else 1
            stop(signal.SIGTERM, None)
        elif code not in (0, -signal.SIGTERM, -signal.SIGINT):
            status = code if code > 0 else 1
    return status


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when the supervisor dies, even by SIGKILL (best effort elsewhere)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:
        os._exit(1)  # the supervisor is already gone


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


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
    if config.processes > 1:
        sys.exit(supervise(config))
    run(config)


def run(config: GatewayConfig, *, reuse_port: bool = False) -> None:
    """Serve in this process; a start-up failure exits with a logged reason."""
    if config.loop_probe:
        CallbackProbe.install()
    elif config.uvloop:
        use_uvloop()
    try:
        serve(config, reuse_port=reuse_port)
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

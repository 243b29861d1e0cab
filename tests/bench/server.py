"""The API as `selfserve serve` runs it, plus one baseline route, for the benchmarks.

`python -m tests.bench.server --host 127.0.0.1 --port 8000` reads its settings from
the environment exactly like `selfserve serve` (production unless SELFSERVE_ENV says
otherwise) and runs one uvicorn process with the same options. The only addition is
`GET /bench/baseline`: a bare handler running `SELECT 1` on the app's own asyncpg
pool, through the same dependency, middleware and serialisation as every real
route. Whatever the real endpoints cost beyond it is their own work.
"""

from __future__ import annotations

import argparse
import os

import uvicorn
from litestar import Litestar, get

from selfserve.app import create_app
from selfserve.context import DbPool
from selfserve.settings import load_settings

BASELINE_PATH = "/bench/baseline"


@get(BASELINE_PATH, include_in_schema=False)
async def bench_baseline(pool: DbPool) -> dict[str, int]:
    value: int = await pool.fetchval("SELECT 1")
    return {"value": value}


def app_factory() -> Litestar:
    app = create_app(load_settings())
    app.register(bench_baseline)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    os.environ.setdefault("SELFSERVE_ENV", "production")  # as `selfserve serve`
    settings = load_settings()
    uvicorn.run(
        "tests.bench.server:app_factory",
        factory=True,
        host=args.host,
        port=args.port,
        workers=1,
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=",".join(settings.trusted_proxies) or None,
        access_log=False,
        log_level=settings.log_level.lower(),
    )


if __name__ == "__main__":
    main()

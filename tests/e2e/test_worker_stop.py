"""`selfserve worker` stopped while jobs run: the jobs are cancelled, the shutdown hook
still runs, and the process ends with status 0 and no traceback (a real process, a
real Redis, a real signal)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from arq.connections import ArqRedis

from tests.conftest import ModuleEnv

pytestmark = pytest.mark.e2e

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from arq import func
    from arq.connections import RedisSettings
    from selfserve.worker import _Worker

    async def stuck(ctx):
        Path(sys.argv[2]).write_text("started")
        await asyncio.Event().wait()

    async def shutdown(ctx):
        print("shutdown hook ran", flush=True)

    worker = _Worker(
        functions=[func(stuck, name="stuck")],
        redis_settings=RedisSettings.from_dsn(sys.argv[1]),
        on_shutdown=shutdown,
        poll_delay=0.05,
    )
    worker.run()
    print("stopped", flush=True)
    """
)


async def test_a_worker_stopped_mid_job_shuts_down_cleanly(
    module_env: ModuleEnv, redis: ArqRedis, tmp_path: Path
) -> None:
    marker = tmp_path / "started"
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, module_env.redis_url, str(marker)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        await redis.enqueue_job("stuck")
        async with asyncio.timeout(60):
            while not marker.exists():
                assert proc.poll() is None, proc.communicate()
                await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.to_thread(proc.communicate, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err, err
    assert proc.returncode == 0, err
    assert "shutdown hook ran" in out
    assert out.rstrip().endswith("stopped")

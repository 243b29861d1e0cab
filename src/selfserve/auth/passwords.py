"""Staff password hashing with argon2id.

Hashing costs tens of milliseconds of CPU and 64 MiB: the async variants run it in a
small thread pool of its own (argon2 releases the GIL), so the event loop keeps
answering while passwords are checked, and at most `threads` hashes run at once per
process whatever the number of concurrent logins.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher()  # argon2id with the library's (RFC 9106) defaults
_DUMMY_HASH = _hasher.hash("selfserve-timing-equaliser")
_executors: dict[int, ThreadPoolExecutor] = {}


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """Constant-shaped check: an unknown account still costs one verification."""
    try:
        return _hasher.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(stored_hash: str) -> bool:
    return _hasher.check_needs_rehash(stored_hash)


def _executor(threads: int) -> ThreadPoolExecutor:
    executor = _executors.get(threads)
    if executor is None:
        executor = _executors.setdefault(
            threads, ThreadPoolExecutor(max_workers=threads, thread_name_prefix="argon2")
        )
    return executor


async def verify_password_async(
    stored_hash: str | None, password: str, *, threads: int = 2
) -> bool:
    """`verify_password` off the event loop, at most `threads` at once."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor(threads), verify_password, stored_hash, password)


async def hash_password_async(password: str, *, threads: int = 2) -> str:
    """`hash_password` off the event loop, at most `threads` at once."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor(threads), hash_password, password)

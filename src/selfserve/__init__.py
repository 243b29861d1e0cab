"""selfserve: 24/7 self-service backend for service halls."""

__version__ = "0.1.0"

"""Catalogue: branches, services, resources, schedules, kiosk devices, staff accounts."""

"""Scheduling: availability (pure), holds, bookings, waitlist."""

"""Messaging: SMS templates, the outbox, the Twilio transport, inbound SMS."""

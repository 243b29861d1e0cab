"""Authentication and authorisation: tokens, passwords, guards, roles, scopes."""

"""Errors raised by the auth package.

    AuthError                 base; `code` is stable and machine-readable
    ├── NotAuthenticated      no usable credential: the caller should authenticate (401)
    └── PermissionDenied      a valid caller that may not do this (403)

Messages never contain the credential itself.
"""

from __future__ import annotations


class AuthError(Exception):
    code = "auth_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class NotAuthenticated(AuthError):
    code = "invalid_token"


class PermissionDenied(AuthError):
    code = "forbidden"
